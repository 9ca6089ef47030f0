// Cross-entropy math shared by csrc/loss/cross_entropy_cpu.cpp and cross_entropy_cuda.cu.
//
// The fused linear cross-entropy (tempo_ds/ops/cross_entropy.py) never holds [tokens, V] logits:
// it computes them a chunk of tokens at a time (an ATen GEMM) and hands each chunk to two kernels:
//   cross_entropy_fwd: per row, the fp32 statistics of the local vocab shard (max, sum of
//     exp(z - max), sum of z, the target's logit); the Python side reduces them across the
//     tensor-parallel group and keeps only lse (4 bytes per token) for backward;
//   cross_entropy_bwd: the chunk, recomputed in backward, becomes its own gradient in place:
//     dz = g (1 + 2 z_loss lse) softmax(z) - g (1 - eps) onehot(target) - g eps / V.
// Stock Megatron keeps the fp32 softmax, 4 V bytes per token (201 KiB at V = 50,304).
//
// Per-token loss: lse - (1 - eps) z_target - eps mean(z) + z_loss lse^2, with
// eps = label_smoothing V / (V - 1) (Megatron's vocab-parallel label smoothing).
#pragma once

#include "tempo/common.h"

namespace tempo {

// Running (max, sum of exp(z - max)) of a row: one exp per element (in acc_t), plus one per new
// maximum; the sum adds up in sum_t (ce_sum_type).
template <typename acc_t, typename sum_t>
struct SoftmaxStats {
    acc_t max = -INFINITY;
    sum_t sum = sum_t(0);

    TEMPO_HD void push(acc_t z) {
        if (z > max) {
            // exp(-inf - z) = 0 on the first element
            sum = sum * sum_t(t_exp(max - z)) + sum_t(1);
            max = z;
        } else {
            sum += sum_t(t_exp(z - max));
        }
    }

    // The statistics of the union of two parts of a row.
    TEMPO_HD void merge(acc_t other_max, sum_t other_sum) {
        if (other_max > max) {
            sum = sum * sum_t(t_exp(max - other_max)) + other_sum;
            max = other_max;
        } else if (other_max > -INFINITY) {
            sum += other_sum * sum_t(t_exp(other_max - max));
        }
    }
};

// The per-row factors of the gradient of the logits: dz_j = p_scale p_j - (j == t) t_scale - uniform.
template <typename acc_t>
struct CrossEntropyGrad {
    acc_t lse;
    acc_t p_scale;
    acc_t t_scale;
    acc_t uniform;

    // g: the gradient of the row's loss (0 for an ignored token); eps: Megatron's smoothing
    // (label_smoothing V / (V - 1)); inv_vocab: 1 / V of the whole (global) vocab.
    TEMPO_HD CrossEntropyGrad(acc_t lse_, acc_t g, acc_t eps, acc_t z_loss, acc_t inv_vocab)
        : lse(lse_),
          p_scale(g * (acc_t(1) + acc_t(2) * z_loss * lse_)),
          t_scale(g * (acc_t(1) - eps)),
          uniform(g * eps * inv_vocab) {}

    TEMPO_HD acc_t operator()(acc_t z, bool is_target) const {
        const acc_t d = p_scale * t_exp(z - lse) - uniform;
        return is_target ? d - t_scale : d;
    }
};

// The statistics in fp32 for 16-bit and fp32 logits (as Megatron's cross-entropy computes them),
// fp64 for fp64 logits (the tests' reference precision).
template <typename scalar_t>
struct ce_acc_type { using type = float; };
template <>
struct ce_acc_type<double> { using type = double; };

// The sums over a row (of exp(z - max), of z): fp64 for fp32 and fp64 logits. Added one after
// the other in fp32, 50,000 terms would lose about sqrt(n) ulp, 20 times the error of PyTorch's
// cascaded sum that the stock path's fp32 logits get; 16-bit logits round far above either.
template <typename scalar_t>
struct ce_sum_type { using type = float; };
template <>
struct ce_sum_type<float> { using type = double; };
template <>
struct ce_sum_type<double> { using type = double; };

}  // namespace tempo
