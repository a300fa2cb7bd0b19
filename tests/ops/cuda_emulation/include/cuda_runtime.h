// CPU emulation of the CUDA runtime subset used by csrc/cuda/steer_cuda.cu (tests only).
// Every CUDA thread of a block is a fiber on one OS thread; __syncthreads and warp shuffles
// are barriers at which fibers yield; blocks run one after another.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl emu_switch
.type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
)");

namespace emu {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSharedBytes = 1 << 20;

struct Fiber {
  void* sp = nullptr;
  dim3 thread_idx;
  bool done = false;
  std::vector<unsigned char> stack = std::vector<unsigned char>(kStackBytes);
};

struct Barrier {
  unsigned arrived = 0, size = 0, generation = 0;
};

inline void* scheduler_sp = nullptr;
inline Fiber* current = nullptr;
inline std::vector<Fiber>* fibers = nullptr;
inline std::vector<Barrier> warp_barriers;
inline Barrier block_barrier;
inline float shuffle_slots[1024];
inline int or_flag = 0;
inline dim3 block_idx, block_dim;
inline void (*run_thread)(void*) = nullptr;  // the kernel call of the current launch
inline void* run_arg = nullptr;
inline unsigned exited = 0;  // threads of the current block that have returned
// The kernel's `extern __shared__` array (defined and set by the harness).
inline unsigned char* shared_memory = nullptr;

inline void yield() { emu_switch(&current->sp, scheduler_sp); }

inline void wait(Barrier& b) {
  const unsigned generation = b.generation;
  if (++b.arrived == b.size) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) {
    if (exited != 0) {
      std::fputs("emulated CUDA: a barrier waits for threads that have exited\n", stderr);
      std::abort();
    }
    yield();
  }
}

[[noreturn]] inline void trampoline() {
  run_thread(run_arg);
  current->done = true;
  ++exited;
  yield();
  std::abort();
}

}  // namespace emu

#define threadIdx (::emu::current->thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)

inline void __syncthreads() { emu::wait(emu::block_barrier); }
inline int __syncthreads_or(int predicate) {
  if (predicate) emu::or_flag = 1;
  __syncthreads();
  const int result = emu::or_flag;
  __syncthreads();
  if (threadIdx.x == 0) emu::or_flag = 0;
  __syncthreads();
  return result;
}
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const unsigned t = threadIdx.x;
  emu::shuffle_slots[t] = value;
  emu::wait(emu::warp_barriers[t / 32]);
  const float other = emu::shuffle_slots[t ^ unsigned(lane_mask)];
  emu::wait(emu::warp_barriers[t / 32]);
  return other;
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float atomicAdd(float* p, float v) { const float old = *p; *p = old + v; return old; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p; *p = old + v; return old;
}

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int value) {
  return size_t(value) <= emu::kSharedBytes ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

template <typename Arg>
inline cudaError_t cudaLaunchKernel(void (*kernel)(Arg), dim3 grid, dim3 block, void** args,
                                    size_t shared_bytes, cudaStream_t) {
  if (shared_bytes > emu::kSharedBytes || block.x % 32 != 0 || block.x > 1024 ||
      grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1) {
    return cudaErrorInvalidValue;
  }
  static Arg arg;
  arg = *static_cast<Arg*>(args[0]);
  static void (*launch)(Arg);
  launch = kernel;
  emu::run_thread = [](void*) { launch(arg); };
  std::vector<emu::Fiber> fibers(block.x);
  emu::fibers = &fibers;
  emu::block_dim = block;
  // Blocks in a scrambled order (a GPU gives no order), fibers scheduled adversarially: each
  // pass visits them from a random start and lets each run with probability 1/2, so a thread
  // can lag many barrier steps behind the others of its block, exposing missing barriers.
  uint64_t rng = 0x9E3779B97F4A7C15ull ^ grid.x ^ (uint64_t(block.x) << 32);
  auto next_random = [&rng] {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
  };
  const unsigned stride = [&] {  // coprime with grid.x: visits every block once
    unsigned s = unsigned(next_random() % grid.x) | 1u;
    auto gcd = [](unsigned a, unsigned b) {
      while (b) {
        const unsigned t = a % b;
        a = b;
        b = t;
      }
      return a;
    };
    while (gcd(s, grid.x) != 1) s += 2;
    return s;
  }();
  for (unsigned i = 0; i < grid.x; ++i) {
    emu::block_idx = dim3(unsigned((uint64_t(i) * stride + grid.x - 1) % grid.x));
    // Uninitialised shared memory reads as NaN (0xFF bytes).
    std::memset(emu::shared_memory, 0xFF, shared_bytes);
    emu::block_barrier = {0, block.x, 0};
    emu::exited = 0;
    emu::warp_barriers.assign(block.x / 32, emu::Barrier{0, 32, 0});
    for (unsigned t = 0; t < block.x; ++t) {
      emu::Fiber& f = fibers[t];
      f.thread_idx = dim3(t);
      f.done = false;
      // Entered by `ret`: the return slot sits 16-byte aligned, as after a call.
      auto top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size()) & ~uintptr_t(15);
      auto* slot = reinterpret_cast<void**>(top - 16);
      slot[0] = reinterpret_cast<void*>(&emu::trampoline);
      for (int r = 1; r <= 6; ++r) slot[-r] = nullptr;
      f.sp = slot - 6;
    }
    for (unsigned live = block.x; live > 0;) {
      live = 0;
      const unsigned start = unsigned(next_random() % block.x);
      const uint64_t coins = next_random();
      for (unsigned j = 0; j < block.x; ++j) {
        emu::Fiber& f = fibers[(start + j) % block.x];
        if (f.done) continue;
        ++live;
        if ((coins >> (j % 64)) & 1u) continue;  // this fiber lags behind for a pass
        emu::current = &f;
        emu_switch(&emu::scheduler_sp, f.sp);
      }
    }
  }
  return cudaSuccess;
}
