// The CPU kernel's core (csrc/cpu/steer_kernel.h) as a program for another architecture (see
// tests/ops/test_arm_kernel.py): cross-compiled for aarch64 with the portable core (ATen's
// NEON Vectorized) or the SVE core, run under qemu-user, on problems read from a file; the test
// compares its outputs with the x86 kernel's bit for bit (the kernel's arithmetic contract).
//
// Compile with -DEMOKERN_ISA_DEFAULT or -DEMOKERN_ISA_SVE256. Usage: kernel_main IN OUT.
// IN: int64 [count], then per problem int64 [dtype, B, T, D, K, norm_preserving, has_mask],
// hidden (B*T*D elements of dtype), vectors (K*D float32), weights (B*K float32), mask (B*T
// bytes, when has_mask), run_sum (B*K float32), run_count (B int64), run_last (B*K float32).
// OUT: per problem hidden, proj (B*T*K float32), run_sum, run_count, run_last; first line of
// stdout: the instruction set the core was compiled for.
#include "steer_isa.h"  // before any ATen header
#include "steer_kernel.h"

#include <omp.h>

#include <cstdio>
#include <fstream>
#include <vector>

// What at::parallel_for (OpenMP build) calls in libtorch, defined here: the program links no
// libtorch (thread ids and the parallel-region guard only serve nested-parallelism checks).
namespace at {
int get_thread_num() { return omp_get_thread_num(); }
bool in_parallel_region() { return omp_in_parallel(); }
int get_num_threads() { return omp_get_max_threads(); }
void init_num_threads() {}
namespace internal {
void set_thread_num(int) {}
}  // namespace internal
}  // namespace at
namespace c10 {
ParallelGuard::ParallelGuard(bool state) : previous_state_(state) {}
ParallelGuard::~ParallelGuard() = default;
bool ParallelGuard::is_enabled() { return false; }
}  // namespace c10

namespace {

template <typename E>
std::vector<E> read(std::ifstream& in, int64_t n) {
  std::vector<E> v(static_cast<size_t>(n));
  in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(sizeof(E) * n));
  return v;
}

template <typename E>
void write(std::ofstream& out, const std::vector<E>& v) {
  out.write(reinterpret_cast<const char*>(v.data()),
            static_cast<std::streamsize>(sizeof(E) * v.size()));
}

}  // namespace

int main(int argc, char** argv) {
  using namespace emokern::cpu;
  const KernelTable& kernels = CPU_CAPABILITY::kernel_table();
  std::printf("%s\n", kernels.isa);
  if (argc != 3) return 2;
  std::ifstream in(argv[1], std::ios::binary);
  std::ofstream out(argv[2], std::ios::binary);
  const int64_t count = read<int64_t>(in, 1)[0];
  for (int64_t c = 0; c < count; ++c) {
    const std::vector<int64_t> head = read<int64_t>(in, 7);
    const int64_t dtype = head[0], B = head[1], T = head[2], D = head[3], K = head[4];
    const int64_t item = dtype == 0 ? 4 : 2;
    std::vector<char> hidden = read<char>(in, B * T * D * item);
    const std::vector<float> vectors = read<float>(in, K * D);
    const std::vector<float> weights = read<float>(in, B * K);
    std::vector<char> mask = head[6] ? read<char>(in, B * T) : std::vector<char>();
    std::vector<float> run_sum = read<float>(in, B * K);
    std::vector<int64_t> run_count = read<int64_t>(in, B);
    std::vector<float> run_last = read<float>(in, B * K);
    std::vector<float> inv_norm(static_cast<size_t>(K)), proj(static_cast<size_t>(B * T * K));
    if (!in || kernels.inv_norms(vectors.data(), K, D, inv_norm.data()) >= 0) return 3;
    Problem p{};
    p.dtype = static_cast<Dtype>(dtype);
    p.n_rows = B * T;
    p.dim = D;
    p.n_vec = K;
    p.hidden = hidden.data();
    p.seq_len = T;
    p.stride_b = T * D;
    p.stride_t = D;
    p.mask = head[6] ? reinterpret_cast<const bool*>(mask.data()) : nullptr;
    p.n_slots = B;
    p.weights = weights.data();
    p.vectors = vectors.data();
    p.inv_norm = inv_norm.data();
    p.proj_out = proj.data();
    p.run_sum = run_sum.data();
    p.run_count = run_count.data();
    p.run_last = run_last.data();
    p.norm_preserving = head[5] != 0;
    kernels.steer(p);
    write(out, hidden);
    write(out, proj);
    write(out, run_sum);
    write(out, run_count);
    write(out, run_last);
  }
  return out ? 0 : 4;
}
