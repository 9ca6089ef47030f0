// Host-side argument checks and dtype rules shared by the CPU and CUDA norm entry points.
// tempo_ds/ops/norm.py checks the same things with friendlier messages; these are the safety net
// for direct calls into the extension.
#pragma once

#include <ATen/ATen.h>

#include "tempo/alloc.h"

#include <optional>
#include <vector>

namespace tempo {
namespace norm_host {

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A contiguous [..., N] tensor read as M = numel / N rows of N features. Outputs are allocated
// with the input's shape, so the Python layer returns them without a view.
struct Rows {
    int64_t M, N;
};

inline Rows rows_of(const at::Tensor& t) {
    const int64_t N = t.size(-1);
    return {N > 0 ? t.numel() / N : 0, N};
}

// The dtype of gamma / beta: either the storage dtype of x, or fp32 next to 16-bit x (mixed
// precision, the layout of Megatron's fp32 residual-free norms and of apex's mixed LayerNorm).
inline at::ScalarType param_dtype(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias) {
    if (present(weight)) return weight->scalar_type();
    if (present(bias)) return bias->scalar_type();
    return x.scalar_type();
}

inline void check_param(const char* op, const char* name, const std::optional<at::Tensor>& p,
                        const at::Tensor& x, at::ScalarType dtype) {
    if (!present(p)) return;
    TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(-1), op, ": ", name, " must have shape [",
                x.size(-1), "] (the last dimension of x), got ", p->sizes());
    TORCH_CHECK(p->is_contiguous(), op, ": ", name, " must be contiguous");
    TORCH_CHECK(p->device() == x.device(), op, ": ", name, " is on ", p->device(), ", x on ", x.device());
    TORCH_CHECK(p->scalar_type() == dtype, op, ": ", name, " has dtype ", p->scalar_type(), ", expected ", dtype);
}

// x: [..., N] contiguous; weight, bias: [N] of one dtype, equal to x's or fp32 next to 16-bit x.
inline void check_norm_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias) {
    TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), op, ": x must be a contiguous [..., features] tensor");
    TORCH_CHECK(x.size(-1) > 0, op, ": x must have at least one feature");
    const at::ScalarType dtype = param_dtype(x, weight, bias);
    const bool mixed = dtype == at::kFloat &&
                       (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16);
    TORCH_CHECK(dtype == x.scalar_type() || mixed, op, ": weight and bias must have the dtype of x (",
                x.scalar_type(), ") or float32 next to 16-bit x, got ", dtype);
    check_param(op, "weight", weight, x, dtype);
    check_param(op, "bias", bias, x, dtype);
}

inline void check_saved(const char* op, const at::Tensor& dy, const at::Tensor& y, const at::Tensor& rstd) {
    TORCH_CHECK(y.dim() >= 1 && y.is_contiguous(), op, ": y must be a contiguous [..., features] tensor");
    TORCH_CHECK(dy.sizes() == y.sizes() && dy.is_contiguous() && dy.scalar_type() == y.scalar_type(), op,
                ": dy must be contiguous with the shape and dtype of y");
    TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == rows_of(y).M && rstd.is_contiguous(), op,
                ": rstd must be a contiguous [rows] tensor (rows = y.numel() / y.size(-1))");
    TORCH_CHECK(dy.device() == y.device() && rstd.device() == y.device(), op,
                ": dy and rstd must be on y's device (", y.device(), ")");
    const at::ScalarType acc = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(rstd.scalar_type() == acc, op, ": rstd must be ", acc, ", got ", rstd.scalar_type());
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
    return present(t) ? t->data_ptr<T>() : nullptr;
}

// dgamma / dbeta in the parameters' dtype, or an undefined tensor (None in Python) when the
// parameter is absent.
inline at::Tensor param_grad_like(const std::optional<at::Tensor>& p) {
    return present(p) ? empty_output(*p) : at::Tensor();
}

}  // namespace norm_host
}  // namespace tempo

// The four norm entry points of tempo/core_ops.h, defined in a build's namespace (tempo::cpu,
// tempo::cuda) over that build's norm_fwd<kRms> and norm_bwd<kRms> (kRms: RMSNorm, no centring,
// no beta). Both builds expose the same functions with the same argument names in their errors.
// clamp_gamma: recover x_hat with norm_recover_gamma's clamp (tempo/norm.h), else divide by gamma.
#define TEMPO_NORM_DEFINE_ENTRY_POINTS()                                                                   \
    std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,   \
                                           const std::optional<at::Tensor>& bias, double eps) {            \
        return norm_fwd<false>("layer_norm_fwd", x, weight, bias, eps);                                    \
    }                                                                                                      \
    std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& rstd, \
                                           const std::optional<at::Tensor>& weight,                        \
                                           const std::optional<at::Tensor>& bias, bool clamp_gamma) {      \
        return norm_bwd<false>("layer_norm_bwd", dy, y, rstd, weight, bias, clamp_gamma);                  \
    }                                                                                                      \
    std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,     \
                                         double eps) {                                                     \
        return norm_fwd<true>("rms_norm_fwd", x, weight, std::nullopt, eps);                               \
    }                                                                                                      \
    std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& rstd, \
                                         const std::optional<at::Tensor>& weight, bool clamp_gamma) {      \
        auto grads = norm_bwd<true>("rms_norm_bwd", dy, y, rstd, weight, std::nullopt, clamp_gamma);       \
        return {grads[0], grads[1]};                                                                       \
    }
