// Entry points of the "dropout" op family: dropout, bias-dropout-add and the attention
// scale-mask-softmax-dropout, all of which keep a 64-bit seed instead of a mask. The CPU and
// CUDA builds define the same functions in their own namespace; each binding exports one.
//
// `seed` is an int64 tensor of one element on the op's device (drawn from the torch generator
// of that device), read by the kernels themselves so that the GPU path never syncs the host.
#pragma once

#include <torch/extension.h>

#include "tempo/alloc.h"
#include "tempo/attention.h"

#include <optional>
#include <vector>

#define TEMPO_DROPOUT_DECLARE()                                                                    \
    /* x: [n] contiguous. Returns x * keep / (1 - p); with the same seed it is also the backward. */ \
    at::Tensor dropout_fwd(const at::Tensor& x, const at::Tensor& seed, double p);                 \
    /* Returns the keep mask, bool [n] on seed's device (debugging and tests only). */             \
    at::Tensor dropout_mask(const at::Tensor& seed, int64_t n, double p);                          \
    /* The keep mask of a block of a larger tensor, bool [outer, rows, cols]: entry (o, r, c) is   \
       element offset + o * outer_stride + r * row_stride + c of dropout_mask(seed, ., p), so a   \
       chunked op regenerates exactly the mask of the whole tensor (recompute_attention). */      \
    at::Tensor dropout_mask_block(const at::Tensor& seed, double p, int64_t offset, int64_t outer,  \
                                  int64_t outer_stride, int64_t rows, int64_t row_stride,          \
                                  int64_t cols);                                                   \
    /* x, residual: [n]; bias: [h] with n % h == 0. Returns residual + dropout(x + bias). */       \
    at::Tensor bias_dropout_add_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias,    \
                                    const at::Tensor& residual, const at::Tensor& seed, double p); \
    /* scores: [B, sq, sk] contiguous, B = b * heads; mask: bool [b, heads, sq, sk] (any strides). \
       Returns {probs (fp32 if keep_fp32, else scores' dtype), dropout(probs) in scores' dtype}. */ \
    std::vector<at::Tensor> softmax_dropout_fwd(const at::Tensor& scores,                          \
                                                const std::optional<at::Tensor>& mask, bool causal, \
                                                double scale, const at::Tensor& seed, double p,    \
                                                bool keep_fp32);                                   \
    /* probs: [B, sq, sk] from softmax_dropout_fwd. Returns dropout(probs) as out_dtype. */        \
    at::Tensor softmax_dropout_regen(const at::Tensor& probs, const at::Tensor& seed, double p,     \
                                     at::ScalarType out_dtype);                                    \
    /* grad: [B, sq, sk], gradient of dropout(probs). Returns the gradient of scores (out_dtype). */ \
    at::Tensor softmax_dropout_bwd(const at::Tensor& grad, const at::Tensor& probs,                \
                                   const std::optional<at::Tensor>& mask, bool causal,             \
                                   double scale, const at::Tensor& seed, double p,                 \
                                   at::ScalarType out_dtype);

namespace tempo {
namespace cpu {
TEMPO_DROPOUT_DECLARE()
}  // namespace cpu
namespace cuda {
TEMPO_DROPOUT_DECLARE()
}  // namespace cuda

// Argument checks and the MaskView shared by both builds (host code only).
namespace detail {

inline void check_seed(const at::Tensor& seed, const at::Tensor& like, const char* op) {
    TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, op,
                ": seed must be an int64 tensor of one element");
    TORCH_CHECK(seed.device() == like.device(), op, ": seed must be on the device of the input");
}

inline void check_p(double p, const char* op) {
    TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
}

// The arguments of bias_dropout_add_fwd (both builds; the caller checks the device type).
// Returns h, the bias length (1 without bias): element i gets bias[i % h].
inline int64_t check_bias_dropout_add(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& residual, const at::Tensor& seed, double p) {
    const char* op = "bias_dropout_add_fwd";
    TORCH_CHECK(x.is_contiguous() && residual.is_contiguous(), op, ": x and residual must be contiguous");
    TORCH_CHECK(residual.numel() == x.numel() && residual.scalar_type() == x.scalar_type() &&
                    residual.device() == x.device(),
                op, ": residual must match x in size, dtype and device");
    check_seed(seed, x, op);
    check_p(p, op);
    if (!bias.has_value()) return 1;
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == x.scalar_type() && bias->numel() > 0 &&
                    x.numel() % bias->numel() == 0 && bias->device() == x.device(),
                op, ": bias must be contiguous, of x's dtype and device, and divide x's size");
    return bias->numel();
}

// The arguments of softmax_dropout_bwd besides the mask (both builds; the caller checks the
// device type).
inline void check_softmax_dropout_bwd(const at::Tensor& grad, const at::Tensor& probs, const at::Tensor& seed,
                                      double p, at::ScalarType out_dtype) {
    const char* op = "softmax_dropout_bwd";
    TORCH_CHECK(grad.device() == probs.device(), op, ": grad is on ", grad.device(), ", probs on ", probs.device());
    TORCH_CHECK(grad.is_contiguous() && grad.sizes() == probs.sizes(), op, ": grad must be contiguous, shaped like probs");
    TORCH_CHECK(probs.scalar_type() == grad.scalar_type() || probs.scalar_type() == at::kFloat, op,
                ": probs must be fp32 or of grad's dtype");
    check_seed(seed, probs, op);
    check_p(p, op);
    TORCH_CHECK(out_dtype == grad.scalar_type(), op, ": out_dtype must be grad's dtype");
}

// The arguments of dropout_mask_block (both builds).
inline void check_mask_block(const at::Tensor& seed, double p, int64_t offset, int64_t outer,
                             int64_t outer_stride, int64_t rows, int64_t row_stride, int64_t cols) {
    check_seed(seed, seed, "dropout_mask_block");
    check_p(p, "dropout_mask_block");
    TORCH_CHECK(offset >= 0 && outer >= 0 && rows >= 0 && cols >= 0 && outer_stride >= 0 && row_stride >= 0,
                "dropout_mask_block: offset, sizes and strides must be non-negative");
}

// scores: [B, sq, sk]; mask: bool [b, heads, sq, sk] with b * heads == B, any strides.
inline MaskView make_mask_view(const std::optional<at::Tensor>& mask, const at::Tensor& scores,
                               bool causal, const char* op) {
    TORCH_CHECK(scores.dim() == 3 && scores.is_contiguous(), op, ": scores must be contiguous [B, sq, sk]");
    MaskView view{nullptr, 1, scores.size(1), 0, 0, 0, 0, causal};
    if (mask.has_value()) {
        const at::Tensor& m = *mask;
        TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4, op, ": mask must be bool [b, heads, sq, sk]");
        TORCH_CHECK(m.size(0) * m.size(1) == scores.size(0) && m.size(2) == scores.size(1) &&
                        m.size(3) == scores.size(2),
                    op, ": mask shape ", m.sizes(), " does not match scores ", scores.sizes());
        TORCH_CHECK(m.device() == scores.device(), op, ": mask must be on the device of scores");
        view.ptr = m.data_ptr<bool>();
        view.heads = m.size(1);
        view.stride_b = m.stride(0);
        view.stride_h = m.stride(1);
        view.stride_q = m.stride(2);
        view.stride_k = m.stride(3);
    }
    return view;
}

}  // namespace detail
}  // namespace tempo
