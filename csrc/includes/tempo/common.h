// Shared by the CPU (g++) and CUDA (nvcc) builds: everything here is plain arithmetic on
// scalars so that both builds run exactly the same math.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TEMPO_HD __host__ __device__ __forceinline__
#else
#define TEMPO_HD inline
#endif

namespace tempo {

// Overloads that resolve to the float or double libm function on host and device alike.
TEMPO_HD float t_exp(float x) { return expf(x); }
TEMPO_HD double t_exp(double x) { return exp(x); }
TEMPO_HD float t_log(float x) { return logf(x); }
TEMPO_HD double t_log(double x) { return log(x); }
TEMPO_HD float t_sqrt(float x) { return sqrtf(x); }
TEMPO_HD double t_sqrt(double x) { return sqrt(x); }
TEMPO_HD float t_erfc(float x) { return erfcf(x); }
TEMPO_HD double t_erfc(double x) { return erfc(x); }
TEMPO_HD float t_fabs(float x) { return fabsf(x); }
TEMPO_HD double t_fabs(double x) { return fabs(x); }
TEMPO_HD float t_fmax(float a, float b) { return fmaxf(a, b); }
TEMPO_HD double t_fmax(double a, double b) { return fmax(a, b); }
TEMPO_HD float t_fmin(float a, float b) { return fminf(a, b); }
TEMPO_HD double t_fmin(double a, double b) { return fmin(a, b); }
TEMPO_HD bool t_isfinite(float x) { return isfinite(x); }
TEMPO_HD bool t_isfinite(double x) { return isfinite(x); }

// The type in which per-element math runs: fp32 for 16-bit storage (fp32 already reaches the
// accuracy floor set by the rounded output), fp64 for fp32 storage (inverting near the GELU
// minimum in fp32 would lose half the digits that the saved fp32 output still holds).
template <typename storage_t>
struct compute_type { using type = float; };
template <>
struct compute_type<float> { using type = double; };
template <>
struct compute_type<double> { using type = double; };

}  // namespace tempo
