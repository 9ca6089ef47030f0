// Entry points of the "core" op family (GELU and the norms). The CPU and CUDA builds define the
// same functions in their own namespace; each build's binding file exports one of them.
#pragma once

#include <torch/extension.h>

#include "tempo/alloc.h"
#include "tempo/gelu.h"

#include <optional>
#include <vector>

#define TEMPO_CORE_DECLARE()                                                              \
    /* x: [n] contiguous. Returns {y [n], bits uint8 [ceil(n/8)]}. */                     \
    std::vector<at::Tensor> gelu_fwd(const at::Tensor& x, bool tanh_form);                \
    /* Fused bias-GELU: x [..., N] contiguous, bias [N] of x's dtype and device.           \
       Returns {y = GELU(x + bias) [x's shape], bits uint8 [ceil(n/8)]}; the backward is    \
       gelu_bwd / gelu_bwd_table on (dy, y, bits), the bias gradient dx's column sum. */    \
    std::vector<at::Tensor> bias_gelu_fwd(const at::Tensor& x, const at::Tensor& bias,    \
                                          bool tanh_form);                                \
    /* dy, y: [n] contiguous, bits from gelu_fwd. Returns dx [n]. */                      \
    at::Tensor gelu_bwd(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& bits, \
                        bool tanh_form);                                                  \
    /* As gelu_bwd for fp16/bf16 y, reading GELU'(x) from table: fp32 [2, 65536] on y's     \
       device, row = branch bit, column = the 16 bits of y. Returns dx [n]. */             \
    at::Tensor gelu_bwd_table(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& bits, \
                              const at::Tensor& table);                                   \
    /* x: [M, N] contiguous; weight, bias: [N] or None, x's dtype or fp32 next to 16-bit  \
       x. Returns {y [M, N], rstd [M] (fp32; fp64 for fp64 x)}. */                        \
    std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x,                           \
                                           const std::optional<at::Tensor>& weight,       \
                                           const std::optional<at::Tensor>& bias, double eps); \
    /* dy, y: [M, N], rstd from layer_norm_fwd. Returns {dx, dweight or None, dbias or    \
       None}; x_hat is recovered from y, with gamma clamped where it does not allow that  \
       if clamp_gamma (tempo/norm.h: norm_recover_gamma). */                              \
    std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& y,     \
                                           const at::Tensor& rstd,                        \
                                           const std::optional<at::Tensor>& weight,       \
                                           const std::optional<at::Tensor>& bias,         \
                                           bool clamp_gamma);                             \
    /* As layer_norm_fwd without centring and without bias. Returns {y, rstd}. */         \
    std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x,                             \
                                         const std::optional<at::Tensor>& weight, double eps); \
    /* As layer_norm_bwd. Returns {dx, dweight or None}. */                               \
    std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& y,       \
                                         const at::Tensor& rstd,                          \
                                         const std::optional<at::Tensor>& weight,         \
                                         bool clamp_gamma);

namespace tempo {

// What gelu_bwd and gelu_bwd_table read, checked before any kernel touches it (both builds).
inline void check_gelu_bwd_args(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& bits) {
    TORCH_CHECK(dy.is_contiguous() && y.is_contiguous() && bits.is_contiguous(),
                "gelu_bwd: inputs must be contiguous");
    TORCH_CHECK(dy.numel() == y.numel() && dy.scalar_type() == y.scalar_type(),
                "gelu_bwd: dy must match y in size and dtype");
    TORCH_CHECK(bits.scalar_type() == at::kByte && bits.numel() == (y.numel() + 7) / 8,
                "gelu_bwd: bits must be uint8 with ceil(y.numel() / 8) elements");
    TORCH_CHECK(dy.device() == y.device() && bits.device() == y.device(),
                "gelu_bwd: dy, y and bits must be on one device");
}

// What bias_gelu_fwd reads (both builds): the device check is the caller's.
inline void check_bias_gelu_args(const at::Tensor& x, const at::Tensor& bias) {
    TORCH_CHECK(x.is_contiguous() && bias.is_contiguous(), "bias_gelu_fwd: x and bias must be contiguous");
    TORCH_CHECK(x.dim() >= 1 && bias.dim() == 1 && bias.size(0) == x.size(-1),
                "bias_gelu_fwd: bias must have shape [x.size(-1)] = [", x.dim() >= 1 ? x.size(-1) : 0,
                "], got ", bias.sizes());
    TORCH_CHECK(bias.scalar_type() == x.scalar_type(), "bias_gelu_fwd: bias must have x's dtype (",
                x.scalar_type(), "), got ", bias.scalar_type());
    TORCH_CHECK(bias.device() == x.device(), "bias_gelu_fwd: bias must be on x's device (", x.device(),
                "), got ", bias.device());
}

// The derivative table of gelu_bwd_table (see TableDerivative in tempo/gelu.h).
inline void check_gelu_table(const at::Tensor& table, const at::Tensor& y) {
    TORCH_CHECK(y.scalar_type() == at::kHalf || y.scalar_type() == at::kBFloat16,
                "gelu_bwd_table: y must be float16 or bfloat16, got ", y.scalar_type());
    TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.dim() == 2 &&
                    table.size(0) == 2 && table.size(1) == kGeluTableColumns,
                "gelu_bwd_table: table must be a contiguous float32 [2, 65536] tensor, got ",
                table.scalar_type(), " ", table.sizes());
    TORCH_CHECK(table.device() == y.device(), "gelu_bwd_table: table must be on y's device (",
                y.device(), "), got ", table.device());
}

namespace cpu {
TEMPO_CORE_DECLARE()
}  // namespace cpu
namespace cuda {
TEMPO_CORE_DECLARE()
}  // namespace cuda
}  // namespace tempo
