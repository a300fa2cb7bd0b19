// Projection levels and bounds of one row: the tiny active-set solve shared by the CPU and CUDA
// kernels (the Triton kernel transcribes the same steps; the reference is
// emokern/ops/reference.py:level_coefficients). Plain C++, no torch, host and device.
//
// After the pushes (and the norm-preserving rescale), a row's projections on the unit
// directions u_k = v_k / ||v_k|| are p'_k. Per emotion the bounds lo_k <= hi_k give the target
// t_k = clip(p'_k, lo_k, hi_k) (a level is lo_k = hi_k; -inf / +inf leave a side open); the
// active set is A = {k : t_k != p'_k}. With G the Gram matrix of the unit directions, the
// correction y += sum_{k in A} a_k u_k hits every target exactly when
//
//     G_AA a_A = t_A - p'_A,     a_k = 0 for k not in A.
//
// Solved by a Cholesky factorisation of G_AA in index order, inactive rows and columns replaced
// by the identity (branch-free per row). A direction whose pivot (its squared distance from the
// span of the earlier active directions, relative to G_kk) falls below kLevelPivotEps is dropped
// from A: it gets no coefficient of its own, and its target is hit only as far as the other
// directions' corrections move it there. Every float32 operation is in a fixed order, so a row's
// coefficients depend on that row alone (never on the thread count).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define EMOKERN_HD __host__ __device__
#else
#define EMOKERN_HD
#endif

namespace emokern {

//: Relative pivot below which a clamped direction counts as dependent on earlier ones
//: (sin^2 of its angle to their span; 1e-4 is 0.57 degrees).
constexpr float kLevelPivotEps = 1e-4f;

// The target gap r_k = clip(p, lo, hi) - p (0 inside the bounds, NaN-free for finite p).
EMOKERN_HD inline float level_gap(float p, float lo, float hi) {
  const float t = p < lo ? lo : (p > hi ? hi : p);
  return t - p;
}

// Coefficients a[K] of the unit directions for one row; returns the number of active directions
// (0: the row needs no correction, a is all zeros).
//
//   gram   [K, K] row-major, G_ij = <u_i, u_j>
//   p      [K]    projections after the pushes (p')
//   lo, hi [K]    bounds of this row's slot
//   work   [K * K + K] floats of scratch (the factor L, row-major, then z)
EMOKERN_HD inline int level_coefficients(int K, const float* gram, const float* p,
                                         const float* lo, const float* hi, float* a,
                                         float* work) {
  float* L = work;          // lower-triangular factor, row-major [K, K]
  float* z = work + K * K;  // forward-substitution result
  int active = 0;
  for (int i = 0; i < K; ++i) {
    const float r = level_gap(p[i], lo[i], hi[i]);
    float* Li = L + i * K;
    for (int j = 0; j < K; ++j) Li[j] = 0.0f;
    if (r == 0.0f) {  // inside its bounds: identity row, no coefficient
      Li[i] = 1.0f;
      z[i] = 0.0f;
      a[i] = 0.0f;
      continue;
    }
    for (int j = 0; j < i; ++j) {
      const float* Lj = L + j * K;
      if (a[j] == 0.0f) continue;  // a[j] flags j active (1) until the back substitution
      float s = gram[i * K + j];
      for (int m = 0; m < j; ++m) s -= Li[m] * Lj[m];
      Li[j] = s / Lj[j];
    }
    float d = gram[i * K + i];
    for (int m = 0; m < i; ++m) d -= Li[m] * Li[m];
    if (!(d > kLevelPivotEps * gram[i * K + i])) {  // dependent (or NaN): dropped
      for (int j = 0; j < K; ++j) Li[j] = 0.0f;
      Li[i] = 1.0f;
      z[i] = 0.0f;
      a[i] = 0.0f;
      continue;
    }
    Li[i] = sqrtf(d);
    float s = r;
    for (int m = 0; m < i; ++m) s -= Li[m] * z[m];
    z[i] = s / Li[i];
    a[i] = 1.0f;
    ++active;
  }
  if (active == 0) return 0;
  for (int i = K - 1; i >= 0; --i) {
    if (a[i] == 0.0f) continue;
    float s = z[i];
    for (int m = i + 1; m < K; ++m) s -= L[m * K + i] * a[m];
    a[i] = s / L[i * K + i];
  }
  return active;
}

}  // namespace emokern
