// The elementwise steps of the fused linear cross-entropy on CPU (math: tempo/cross_entropy.h).
// Rows (tokens) are independent: OpenMP (at::parallel_for) over rows, one pass over a row each.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "tempo/cross_entropy.h"
#include "tempo/loss_ops.h"

namespace tempo {
namespace cpu {
namespace {

template <typename scalar_t, typename acc_t, typename sum_t = typename ce_sum_type<scalar_t>::type>
void cross_entropy_fwd_kernel(const scalar_t* logits,  // [rows, V]
                              const int64_t* target,   // [rows]
                              acc_t* stats,            // [4, rows]
                              int64_t rows, int64_t vocab) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const scalar_t* row = logits + r * vocab;
            SoftmaxStats<acc_t, sum_t> s;
            sum_t total = sum_t(0);
            for (int64_t j = 0; j < vocab; ++j) {
                const acc_t z = static_cast<acc_t>(row[j]);
                s.push(z);
                total += sum_t(z);
            }
            const int64_t t = target[r];
            stats[r] = s.max;
            stats[rows + r] = static_cast<acc_t>(s.sum);
            stats[2 * rows + r] = static_cast<acc_t>(total);
            stats[3 * rows + r] = t >= 0 && t < vocab ? static_cast<acc_t>(row[t]) : acc_t(0);
        }
    });
}

template <typename scalar_t, typename acc_t>
void cross_entropy_bwd_kernel(scalar_t* logits,        // [rows, V], in place
                              const acc_t* lse,        // [rows]
                              const acc_t* g,          // [rows]
                              const int64_t* target,   // [rows]
                              int64_t rows, int64_t vocab, acc_t eps, acc_t z_loss, acc_t inv_vocab) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            scalar_t* row = logits + r * vocab;
            const CrossEntropyGrad<acc_t> grad(lse[r], g[r], eps, z_loss, inv_vocab);
            const int64_t t = target[r];
            for (int64_t j = 0; j < vocab; ++j)
                row[j] = static_cast<scalar_t>(grad(static_cast<acc_t>(row[j]), j == t));
        }
    });
}

}  // namespace

at::Tensor cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target) {
    TORCH_CHECK(logits.is_cpu(), "cross_entropy_fwd: logits must be a CPU tensor");
    check_ce_fwd_args(logits, target);
    const int64_t rows = logits.size(0), vocab = logits.size(1);
    auto stats = empty_output({4, rows}, logits.options().dtype(ce_stats_dtype(logits)));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fwd", [&] {
        using acc_t = typename ce_acc_type<scalar_t>::type;
        cross_entropy_fwd_kernel<scalar_t, acc_t>(logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(),
                                                  stats.data_ptr<acc_t>(), rows, vocab);
    });
    return stats;
}

at::Tensor cross_entropy_bwd(at::Tensor& logits, const at::Tensor& lse, const at::Tensor& g,
                             const at::Tensor& target, double eps, double z_loss, double inv_vocab) {
    TORCH_CHECK(logits.is_cpu(), "cross_entropy_bwd: logits must be a CPU tensor");
    check_ce_bwd_args(logits, lse, g, target);
    const int64_t rows = logits.size(0), vocab = logits.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_bwd", [&] {
        using acc_t = typename ce_acc_type<scalar_t>::type;
        cross_entropy_bwd_kernel<scalar_t, acc_t>(logits.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(),
                                                  g.data_ptr<acc_t>(), target.data_ptr<int64_t>(), rows, vocab,
                                                  acc_t(eps), acc_t(z_loss), acc_t(inv_vocab));
    });
    return logits;
}

}  // namespace cpu
}  // namespace tempo
