// Attention scale-mask-softmax with seeded dropout on CPU: the same math as
// softmax_dropout_cuda.cu (tempo/attention.h, tempo/philox.h). One work item is one row of the
// [B * sq, sk] scores; rows are independent, so at::parallel_for splits over rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <limits>

#include "dropout_cpu.h"
#include "tempo/dropout_ops.h"
#include "tempo/philox.h"

namespace tempo {
namespace cpu {
namespace {

// Rows per task: enough elements per task to amortise the scheduling.
int64_t row_grain(int64_t sk) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(sk, 1)); }

// The probability as the matmul sees it: rounded to the activation dtype, as Megatron casts the
// fp32 softmax to bf16/fp16 before dropout and the @v matmul.
template <typename scalar_t, typename acc_t, typename prob_t>
inline acc_t as_activation(prob_t y) {
    return static_cast<acc_t>(static_cast<scalar_t>(y));
}

template <typename scalar_t, typename prob_t>
void softmax_dropout_fwd_kernel(const scalar_t* scores, prob_t* probs, scalar_t* dropped, MaskView mask,
                                int64_t rows, int64_t sk, double scale, DropoutParams d) {
    using acc_t = typename compute_type<scalar_t>::type;
    const acc_t s = static_cast<acc_t>(scale), d_scale = static_cast<acc_t>(d.scale);
    at::parallel_for(0, rows, row_grain(sk), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
            const int64_t base = row * sk;
            acc_t row_max = -std::numeric_limits<acc_t>::infinity();
            for (int64_t k = 0; k < sk; ++k) {
                const acc_t v = mask.masked(row, k) ? acc_t(kMaskedScore) : static_cast<acc_t>(scores[base + k]) * s;
                row_max = t_fmax(row_max, v);
            }
            acc_t sum = 0;
            for (int64_t k = 0; k < sk; ++k) {
                const acc_t v = mask.masked(row, k) ? acc_t(kMaskedScore) : static_cast<acc_t>(scores[base + k]) * s;
                sum += t_exp(v - row_max);
            }
            const acc_t inv = acc_t(1) / sum;
            for (int64_t k = 0; k < sk; ++k) {
                const acc_t v = mask.masked(row, k) ? acc_t(kMaskedScore) : static_cast<acc_t>(scores[base + k]) * s;
                probs[base + k] = static_cast<prob_t>(t_exp(v - row_max) * inv);
            }
            if (dropped == nullptr) continue;
            // Philox groups are over the flat [B * sq * sk] index, so rows may start mid-group.
            for_each_keep(d, base, base + sk, [&](int64_t i, bool kept) {
                const acc_t y = as_activation<scalar_t, acc_t>(probs[i]);
                dropped[i] = static_cast<scalar_t>(y * (kept ? d_scale : acc_t(0)));
            });
        }
    });
}

template <typename out_t, typename prob_t>
void softmax_dropout_regen_kernel(const prob_t* probs, out_t* dropped, int64_t n, DropoutParams d) {
    using acc_t = typename compute_type<out_t>::type;
    for_each_multiplier<acc_t>(n, d, [&](int64_t i, acc_t m) {
        dropped[i] = static_cast<out_t>(as_activation<out_t, acc_t>(probs[i]) * m);
    });
}

// grad_scores = scale * y * (g' - sum(g' * y)), g' = grad * keep / (1 - p); zero where masked.
template <typename out_t, typename grad_t, typename prob_t>
void softmax_dropout_bwd_kernel(const grad_t* grad, const prob_t* probs, out_t* grad_scores, MaskView mask,
                                int64_t rows, int64_t sk, double scale, DropoutParams d) {
    using acc_t = typename compute_type<grad_t>::type;
    const acc_t s = static_cast<acc_t>(scale), d_scale = static_cast<acc_t>(d.scale);
    at::parallel_for(0, rows, row_grain(sk), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
            const int64_t base = row * sk;
            acc_t dot = 0;
            for (int pass = 0; pass < 2; ++pass) {
                for_each_keep(d, base, base + sk, [&](int64_t i, bool kept) {
                    const acc_t gp = static_cast<acc_t>(grad[i]) * (kept ? d_scale : acc_t(0));
                    const acc_t y = static_cast<acc_t>(probs[i]);
                    if (pass == 0) {
                        dot += gp * y;
                    } else {
                        grad_scores[i] = mask.masked(row, i - base) ? out_t(0) : static_cast<out_t>(s * y * (gp - dot));
                    }
                });
            }
        }
    });
}

}  // namespace

std::vector<at::Tensor> softmax_dropout_fwd(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                                            bool causal, double scale, const at::Tensor& seed, double p,
                                            bool keep_fp32) {
    TORCH_CHECK(scores.is_cpu(), "softmax_dropout_fwd: scores must be a CPU tensor");
    const MaskView view = detail::make_mask_view(mask, scores, causal, "softmax_dropout_fwd");
    detail::check_seed(seed, scores, "softmax_dropout_fwd");
    detail::check_p(p, "softmax_dropout_fwd");
    const bool half = scores.scalar_type() == at::kHalf || scores.scalar_type() == at::kBFloat16;
    const bool fp32_probs = keep_fp32 && half;
    auto probs = empty_output(scores.sizes(), scores.options().dtype(fp32_probs ? at::kFloat : scores.scalar_type()));
    // Without dropout the matmul consumes the probabilities themselves (when they are stored in
    // the activation dtype); otherwise the dropped copy is a transient the caller frees after @v.
    const bool need_dropped = p > 0.0 || fp32_probs;
    at::Tensor dropped = need_dropped ? empty_output(scores) : probs;
    const DropoutParams d = make_dropout_params(seed.item<int64_t>(), p);
    const int64_t rows = scores.size(0) * scores.size(1), sk = scores.size(2);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "softmax_dropout_fwd", [&] {
        scalar_t* drop_ptr = need_dropped ? dropped.data_ptr<scalar_t>() : nullptr;
        if (fp32_probs)
            softmax_dropout_fwd_kernel(scores.data_ptr<scalar_t>(), probs.data_ptr<float>(), drop_ptr, view, rows, sk,
                                       scale, d);
        else
            softmax_dropout_fwd_kernel(scores.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>(), drop_ptr, view, rows,
                                       sk, scale, d);
    });
    return {probs, dropped};
}

at::Tensor softmax_dropout_regen(const at::Tensor& probs, const at::Tensor& seed, double p, at::ScalarType out_dtype) {
    TORCH_CHECK(probs.is_cpu() && probs.is_contiguous(), "softmax_dropout_regen: probs must be a contiguous CPU tensor");
    detail::check_seed(seed, probs, "softmax_dropout_regen");
    detail::check_p(p, "softmax_dropout_regen");
    TORCH_CHECK(probs.scalar_type() == out_dtype || probs.scalar_type() == at::kFloat,
                "softmax_dropout_regen: probs must be fp32 or of the output dtype");
    auto dropped = empty_output(probs.sizes(), probs.options().dtype(out_dtype));
    const DropoutParams d = make_dropout_params(seed.item<int64_t>(), p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "softmax_dropout_regen", [&] {
        if (probs.scalar_type() == out_dtype)
            softmax_dropout_regen_kernel(probs.data_ptr<scalar_t>(), dropped.data_ptr<scalar_t>(), probs.numel(), d);
        else
            softmax_dropout_regen_kernel(probs.data_ptr<float>(), dropped.data_ptr<scalar_t>(), probs.numel(), d);
    });
    return dropped;
}

at::Tensor softmax_dropout_bwd(const at::Tensor& grad, const at::Tensor& probs, const std::optional<at::Tensor>& mask,
                               bool causal, double scale, const at::Tensor& seed, double p, at::ScalarType out_dtype) {
    TORCH_CHECK(grad.is_cpu() && probs.is_cpu(), "softmax_dropout_bwd: inputs must be CPU tensors");
    detail::check_softmax_dropout_bwd(grad, probs, seed, p, out_dtype);
    const MaskView view = detail::make_mask_view(mask, probs, causal, "softmax_dropout_bwd");
    auto grad_scores = empty_output(grad);
    const DropoutParams d = make_dropout_params(seed.item<int64_t>(), p);
    const int64_t rows = probs.size(0) * probs.size(1), sk = probs.size(2);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "softmax_dropout_bwd", [&] {
        if (probs.scalar_type() == grad.scalar_type())
            softmax_dropout_bwd_kernel(grad.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>(),
                                       grad_scores.data_ptr<scalar_t>(), view, rows, sk, scale, d);
        else
            softmax_dropout_bwd_kernel(grad.data_ptr<scalar_t>(), probs.data_ptr<float>(),
                                       grad_scores.data_ptr<scalar_t>(), view, rows, sk, scale, d);
    });
    return grad_scores;
}

}  // namespace cpu
}  // namespace tempo
