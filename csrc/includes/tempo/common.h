// Shared by the CPU (g++) and CUDA (nvcc) builds: everything here is plain arithmetic on
// scalars so that both builds run the same math. Where a helper below says so, the device fuses a
// multiply-add or takes its hardware reciprocal, and the results agree to rounding.
#pragma once

#include <math.h>  // the unqualified expf, isfinite, ... below (<cmath> only promises std::)

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define TEMPO_HD __host__ __device__ __forceinline__
#else
#define TEMPO_HD inline
#endif

namespace tempo {

// Overloads that resolve to the float or double libm function on host and device alike.
TEMPO_HD float t_exp(float x) { return expf(x); }
TEMPO_HD double t_exp(double x) { return exp(x); }
TEMPO_HD float t_exp2(float x) { return exp2f(x); }
TEMPO_HD double t_exp2(double x) { return exp2(x); }
TEMPO_HD float t_log(float x) { return logf(x); }
TEMPO_HD double t_log(double x) { return log(x); }
TEMPO_HD float t_sqrt(float x) { return sqrtf(x); }
TEMPO_HD double t_sqrt(double x) { return sqrt(x); }
TEMPO_HD double t_erfc(double x) { return erfc(x); }
TEMPO_HD float t_fabs(float x) { return fabsf(x); }
TEMPO_HD double t_fabs(double x) { return fabs(x); }
TEMPO_HD float t_fmax(float a, float b) { return fmaxf(a, b); }
TEMPO_HD double t_fmax(double a, double b) { return fmax(a, b); }
TEMPO_HD float t_fmin(float a, float b) { return fminf(a, b); }
TEMPO_HD double t_fmin(double a, double b) { return fmin(a, b); }
// a * b + c: one fused instruction on the device. The host build targets baseline x86-64, where
// fmaf is a library call, so it multiplies and adds (one more rounding).
TEMPO_HD float t_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return fmaf(a, b, c);
#else
    return a * b + c;
#endif
}

// c ? a : b without a jump. The device selects in one instruction either way; the host compiler
// turns a float ternary into a branch, which mispredicts on the random signs of activations.
template <typename T>
TEMPO_HD T t_select(bool c, T a, T b) {
#if defined(__CUDA_ARCH__)
    return c ? a : b;
#else
    using bits_t = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    const bits_t mask = bits_t(0) - static_cast<bits_t>(c);
    return std::bit_cast<T>((std::bit_cast<bits_t>(a) & mask) | (std::bit_cast<bits_t>(b) & ~mask));
#endif
}

// 1/x to within 1 ulp: the device's reciprocal without the IEEE-rounding slow path (the host
// divides). For factors of results that are rounded further, not for exact quotients.
TEMPO_HD float t_rcp_approx(float x) {
#if defined(__CUDA_ARCH__)
    return __fdividef(1.0f, x);
#else
    return 1.0f / x;
#endif
}
TEMPO_HD double t_rcp_approx(double x) { return 1.0 / x; }
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
