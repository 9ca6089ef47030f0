// Scale-mask-softmax math shared by the CPU and CUDA builds of the dropout op family.
//
// Semantics are Megatron-core's FusedScaleMaskSoftmax + attention_mask_func: scores are scaled in
// fp32, masked positions (mask True, or key > query for the generated causal mask) are *replaced*
// by -10000 (not -inf), then softmax runs in fp32. A fully masked row therefore gets the uniform
// distribution 1/sk, exactly as in Megatron, and never NaN. In backward the replaced positions get
// zero gradient (masked_fill's backward).
#pragma once

#include <cstdint>

#include "tempo/common.h"

namespace tempo {

constexpr float kMaskedScore = -10000.0f;

// A boolean mask broadcast to [b, heads, sq, sk] through its strides (stride 0 on broadcast
// dimensions, so a [b, 1, 1, sk] padding mask or a [1, 1, sq, sk] causal mask costs no copy),
// optionally OR-ed with the causal mask generated from indices.
struct MaskView {
    const bool* ptr;  // nullptr: no mask tensor
    int64_t heads;    // rows of scores are (batch * heads + head) * sq + query
    int64_t sq;
    int64_t stride_b, stride_h, stride_q, stride_k;
    bool causal;

    TEMPO_HD bool masked(int64_t row, int64_t key) const {
        const int64_t query = row % sq;
        if (causal && key > query) return true;
        if (ptr == nullptr) return false;
        const int64_t bh = row / sq;
        return ptr[(bh / heads) * stride_b + (bh % heads) * stride_h + query * stride_q + key * stride_k];
    }
};

}  // namespace tempo
