// Entry points of the "loss" op family (the elementwise steps of the fused linear cross-entropy,
// tempo/cross_entropy.h). The CPU and CUDA builds define the same functions in their own
// namespace; each binding exports one.
#pragma once

#include <torch/extension.h>

#include "tempo/alloc.h"

#define TEMPO_LOSS_DECLARE()                                                                       \
    /* logits: [rows, V] contiguous chunk of the local vocab shard; target: int64 [rows], the      \
       target's column in this shard or -1 (elsewhere or ignored). Returns stats [4, rows] in     \
       float32 (float64 for float64 logits): max, sum of exp(z - max), sum of z, target logit.  */ \
    at::Tensor cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target);              \
    /* Turns logits into their gradient in place and returns them. lse, g: [rows] in the dtype of \
       the statistics (lse of the whole vocab, the gradient of each row's loss); eps: Megatron's  \
       smoothing label_smoothing V / (V - 1); inv_vocab: 1 / V of the global vocab. */            \
    at::Tensor cross_entropy_bwd(at::Tensor& logits, const at::Tensor& lse, const at::Tensor& g,   \
                                 const at::Tensor& target, double eps, double z_loss,              \
                                 double inv_vocab);

namespace tempo {
namespace cpu {
TEMPO_LOSS_DECLARE()
}  // namespace cpu
namespace cuda {
TEMPO_LOSS_DECLARE()
}  // namespace cuda

// Shared argument checks (the Python layer checks the user's arguments; these guard the binding).
inline at::ScalarType ce_stats_dtype(const at::Tensor& logits) {
    return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_ce_fwd_args(const at::Tensor& logits, const at::Tensor& target) {
    TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "cross_entropy: logits must be a contiguous 2-D tensor");
    TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.is_contiguous() &&
                    target.size(0) == logits.size(0),
                "cross_entropy: target must be a contiguous int64 tensor of logits.size(0) elements");
    TORCH_CHECK(target.device() == logits.device(), "cross_entropy: target must be on the logits' device");
}

inline void check_ce_bwd_args(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& g,
                              const at::Tensor& target) {
    check_ce_fwd_args(logits, target);
    for (const at::Tensor* t : {&lse, &g}) {
        TORCH_CHECK(t->scalar_type() == ce_stats_dtype(logits) && t->dim() == 1 && t->is_contiguous() &&
                        t->size(0) == logits.size(0) && t->device() == logits.device(),
                    "cross_entropy_bwd: lse and g must be contiguous [rows] tensors in the statistics' dtype");
    }
}

}  // namespace tempo
