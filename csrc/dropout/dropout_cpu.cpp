// Seeded dropout and bias-dropout-add on CPU: the same per-element math as dropout_cuda.cu
// (tempo/philox.h), OpenMP loops through at::parallel_for. One work item is one Philox group
// of four consecutive elements, so the CPU and CUDA builds draw identical masks for a seed.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "dropout_cpu.h"
#include "tempo/dropout_ops.h"
#include "tempo/philox.h"

namespace tempo {
namespace cpu {
namespace {

int64_t read_seed(const at::Tensor& seed) { return seed.item<int64_t>(); }

template <typename scalar_t>
void dropout_fwd_kernel(const scalar_t* x, scalar_t* y, int64_t n, DropoutParams d) {
    using acc_t = typename compute_type<scalar_t>::type;
    for_each_multiplier<acc_t>(n, d, [&](int64_t i, acc_t m) { y[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * m); });
}

template <typename scalar_t>
void bias_dropout_add_kernel(const scalar_t* x, const scalar_t* bias, const scalar_t* residual,
                             scalar_t* out, int64_t n, int64_t h, DropoutParams d) {
    using acc_t = typename compute_type<scalar_t>::type;
    for_each_multiplier<acc_t>(n, d, [&](int64_t i, acc_t m) {
        const acc_t v = static_cast<acc_t>(x[i]) + (bias ? static_cast<acc_t>(bias[i % h]) : acc_t(0));
        out[i] = static_cast<scalar_t>(static_cast<acc_t>(residual[i]) + v * m);
    });
}

}  // namespace

at::Tensor dropout_fwd(const at::Tensor& x, const at::Tensor& seed, double p) {
    TORCH_CHECK(x.is_cpu() && x.is_contiguous(), "dropout_fwd: x must be a contiguous CPU tensor");
    detail::check_seed(seed, x, "dropout_fwd");
    detail::check_p(p, "dropout_fwd");
    auto y = empty_output(x);
    const DropoutParams d = make_dropout_params(read_seed(seed), p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_fwd", [&] {
        dropout_fwd_kernel(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel(), d);
    });
    return y;
}

at::Tensor dropout_mask(const at::Tensor& seed, int64_t n, double p) {
    TORCH_CHECK(seed.is_cpu(), "dropout_mask: seed must be a CPU tensor");
    detail::check_seed(seed, seed, "dropout_mask");
    detail::check_p(p, "dropout_mask");
    auto mask = at::empty({n}, seed.options().dtype(at::kBool));
    bool* out = mask.data_ptr<bool>();
    const DropoutParams d = make_dropout_params(read_seed(seed), p);
    parallel_for_each_keep(n, d, [&](int64_t i, bool kept) { out[i] = kept; });
    return mask;
}

at::Tensor dropout_mask_block(const at::Tensor& seed, double p, int64_t offset, int64_t outer,
                              int64_t outer_stride, int64_t rows, int64_t row_stride, int64_t cols) {
    TORCH_CHECK(seed.is_cpu(), "dropout_mask_block: seed must be a CPU tensor");
    detail::check_mask_block(seed, p, offset, outer, outer_stride, rows, row_stride, cols);
    auto mask = at::empty({outer, rows, cols}, seed.options().dtype(at::kBool));
    bool* out = mask.data_ptr<bool>();
    const DropoutParams d = make_dropout_params(read_seed(seed), p);
    // one work item is one row; a row reuses each Philox group for its (up to) four elements
    at::parallel_for(0, outer * rows, std::max<int64_t>(1, kGroupGrain * 4 / std::max<int64_t>(cols, 1)),
                     [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
            const int64_t base = offset + (row / rows) * outer_stride + (row % rows) * row_stride;
            bool* dst = out + row * cols;
            int64_t group = -1;
            uint32_t keep = 0;
            for (int64_t c = 0; c < cols; ++c) {
                const int64_t i = base + c;
                if ((i >> 2) != group) {
                    group = i >> 2;
                    keep = dropout_keep_bits(d, group);
                }
                dst[c] = (keep >> (i & 3)) & 1u;
            }
        }
    });
    return mask;
}

at::Tensor bias_dropout_add_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                const at::Tensor& residual, const at::Tensor& seed, double p) {
    TORCH_CHECK(x.is_cpu(), "bias_dropout_add_fwd: x must be a CPU tensor");  // the others: on x's device
    const int64_t h = detail::check_bias_dropout_add(x, bias, residual, seed, p);
    auto out = empty_output(x);
    const DropoutParams d = make_dropout_params(read_seed(seed), p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_dropout_add_fwd", [&] {
        bias_dropout_add_kernel(x.data_ptr<scalar_t>(), bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                                residual.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(), h, d);
    });
    return out;
}

}  // namespace cpu
}  // namespace tempo
