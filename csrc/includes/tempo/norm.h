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
// away all of x_hat_j, the caller keeps the input instead (tempo_ds/ops/norm.py checks this on
// the host before the forward; the bound uses kNormRecoverMargin below).
#pragma once

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
