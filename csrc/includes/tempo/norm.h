// Output-saving LayerNorm and RMSNorm math, shared by layer_norm_cpu.cpp and layer_norm_cuda.cu.
//
// Stock LayerNorm keeps its input x (M x N elements) and per-row mean and rstd for backward.
// Tempo keeps its output y, which the next linear layer keeps anyway, plus rstd (M fp32 values):
// the normalised input is recovered element by element as x_hat = (y - beta) / gamma.
//
//   LayerNorm: x_hat = (x - mean) * rstd,  y = x_hat * gamma + beta,  rstd = 1 / sqrt(var + eps)
//              dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)),  g = gamma * dy
//   RMSNorm:   x_hat = x * rstd,           y = x_hat * gamma,         rstd = 1 / sqrt(mean(x^2) + eps)
//              dx = rstd * (g - x_hat * mean(g * x_hat))
//   both:      dgamma = sum over rows of dy * x_hat,  dbeta = sum over rows of dy
//
// Recovery divides by gamma: where gamma_j is zero, or so small against beta_j that y_j rounds
// away x_hat_j, the backward divides by gamma_j clamped by magnitude instead
// (norm_recover_gamma below), so the gradients stay finite (docs/norm.md, "When gamma does not
// allow recovery"). tempo_ds/ops/norm.py counts those features on the device and can instead
// keep the input for the call (recover_check="exact").
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "tempo/common.h"

namespace tempo {

// Row statistics and every accumulation run in fp32 for 16-bit and fp32 storage and in fp64 for
// fp64 storage. The saved rstd has this type.
template <typename storage_t>
struct norm_acc_type { using type = float; };
template <>
struct norm_acc_type<double> { using type = double; };

// Feature j is recoverable from y when |gamma_j| * R > max(|beta_j|, tiny), R = 1 /
// (kNormRecoverMargin * eps(output dtype)), tiny = its smallest normal number: the rounding of
// y_j, normal or subnormal, then costs x_hat_j at most 1/16 of an absolute unit.
constexpr double kNormRecoverMargin = 16.0;

// Machine epsilon and smallest normal number of each output (storage) dtype, as
// torch.finfo(dtype).eps / .tiny: the bound R and the floor of the rule above.
template <typename storage_t>
struct norm_output_limits;
template <>
struct norm_output_limits<c10::Half> {
    static constexpr double eps = 0x1p-10, tiny = 0x1p-14;
};
template <>
struct norm_output_limits<c10::BFloat16> {
    static constexpr double eps = 0x1p-7, tiny = 0x1p-126;
};
template <>
struct norm_output_limits<float> {
    static constexpr double eps = 0x1p-23, tiny = 0x1p-126;
};
template <>
struct norm_output_limits<double> {
    static constexpr double eps = 0x1p-52, tiny = 0x1p-1022;
};

// The recovery clamps gamma_j by magnitude (as apex's memory-efficient LayerNorm does) only where
// it is below c_j = eps * max(|beta_j|, tiny), one step of y_j's values near beta_j: there
// gamma_j * x_hat_j moves y_j by less than a step for |x_hat_j| < 1/2, so y_j holds almost nothing
// of x_hat_j, and gamma_j == 0 would make the gradients non-finite. Between c_j and the bound
// of the rule (16 c_j) the plain division is kept: its error, at most eps * limit / (2 |gamma_j|),
// lies between 1/32 and 1/2 there, well below the clamp's (docs/norm.md).
constexpr double kNormClampMargin = 1.0;

// The gamma that x_hat_j is recovered with from an output of storage_t: gamma_j itself, or, where
// |gamma_j| <= c_j and clamp is set, c_j with gamma_j's sign (+ for zero). Then
// (y_j - beta_j) / c_j is x_hat_j * |gamma_j| / c_j plus at most 1/2 of rounding: 0 for
// gamma_j == 0 with beta_j in y's dtype, and continuous in gamma_j at c_j. |gamma_j| / eps is
// exact (eps is a power of two), as in tempo_ds/ops/reference.py (recovery_gamma), which this matches.
// NaN gamma or beta is never clamped, so NaN reaches the gradients.
template <typename storage_t, typename T>
TEMPO_HD T norm_recover_gamma(T gamma, T beta, bool clamp) {
    constexpr double kBound = 1.0 / (kNormClampMargin * norm_output_limits<storage_t>::eps);
    const T bound = T(kBound);
    const T floor = T(norm_output_limits<storage_t>::tiny);
    const T beta_mag = t_fabs(beta);
    const T limit = t_select(beta_mag < floor, floor, beta_mag);
    const bool clamped = clamp && t_fabs(gamma) * bound <= limit;
    // a division by a power of two: exact unless subnormal, and never 0 (tiny * eps is a
    // subnormal of T at worst)
    const T c = limit / bound;
    return t_select(clamped, t_select(gamma < T(0), -c, c), gamma);
}

template <typename T>
TEMPO_HD T norm_rstd(T mean_square, T eps) {
    return T(1) / t_sqrt(mean_square + eps);
}

// centre = mean for LayerNorm and 0 for RMSNorm; absent gamma / beta are passed as 1 / 0, which
// leaves both formulas exact.
template <typename T>
TEMPO_HD T norm_output(T x, T centre, T rstd, T gamma, T beta) {
    return (x - centre) * rstd * gamma + beta;
}

// gamma: from norm_recover_gamma.
template <typename T>
TEMPO_HD T norm_recover_xhat(T y, T gamma, T beta) {
    return (y - beta) / gamma;
}

// mean_g is mean(gamma * dy) over the row for LayerNorm and 0 for RMSNorm (no centring);
// mean_g_xhat is mean(gamma * dy * x_hat).
template <typename T>
TEMPO_HD T norm_input_grad(T g, T xhat, T rstd, T mean_g, T mean_g_xhat) {
    return rstd * (g - mean_g - xhat * mean_g_xhat);
}

}  // namespace tempo
