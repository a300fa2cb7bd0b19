// The runtime API header the launchers' declarations include (csrc/cuda/steer_cuda_launch.h):
// in the emulation, the whole runtime is cuda_runtime.h.
#pragma once
#include "cuda_runtime.h"
