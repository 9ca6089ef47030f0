// Output-saving LayerNorm and RMSNorm on CPU: the same per-element math as layer_norm_cuda.cu
// (tempo/norm.h), rows spread over OpenMP threads with at::parallel_for. RMSNorm is LayerNorm
// without centring and without beta, so both share every kernel through the kRms flag.
//
// Bytes kept for backward per row of N features: stock LayerNorm keeps x (N * sizeof(T)) plus mean
// and rstd; this keeps rstd only (one fp32), because the output y it also needs is kept by the
// next linear layer anyway.
//
// Determinism: dgamma / dbeta are summed per chunk of rows whose bounds depend on the row count
// only (never on the thread count or the schedule): within a chunk by a row cascade (RowCascade),
// then the chunk partials pairwise in chunk order. Two runs give bit-identical gradients on any
// machine.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "norm_host.h"
#include "tempo/core_ops.h"
#include "tempo/norm.h"

namespace tempo {
namespace cpu {
namespace {

// Pairwise summation below this many terms is a plain loop.
constexpr int64_t kPairwiseLeaf = 32;
// Bounds on the dgamma / dbeta row chunks: at most kMaxChunks partial rows of N accumulators.
constexpr int64_t kMaxChunks = 128;
constexpr int64_t kMinChunkRows = 4;

// Pairwise (cascade) summation of term(begin) ... term(end - 1): the rounding error grows with
// log2(n) instead of n, so fp32 statistics stay accurate over rows of 10^4 features, as the tree
// reductions of the CUDA kernels do.
template <typename acc_t, typename Term>
acc_t pairwise_sum(int64_t begin, int64_t end, const Term& term) {
    if (end - begin <= kPairwiseLeaf) {
        acc_t sum = 0;
        for (int64_t j = begin; j < end; ++j) sum += term(j);
        return sum;
    }
    const int64_t mid = begin + (end - begin) / 2;
    return pairwise_sum<acc_t>(begin, mid, term) + pairwise_sum<acc_t>(mid, end, term);
}

// Sums rows of N values (one chunk's dy * x_hat or dy) with an error that grows with the log of
// the row count, like pairwise_sum, without holding the rows: a leaf of kCascadeLeafRows rows is
// summed in order, and full leaves are combined as a binary counter carries (level k holds the
// sum of 2^k leaves). The order of additions depends on the row count only.
constexpr int kCascadeLeafRows = 8;

template <typename acc_t>
class RowCascade {
   public:
    explicit RowCascade(int64_t n) : n_(n), leaf_(n, acc_t(0)) {}

    // The accumulator the current row is added into; end_row() after each row.
    acc_t* leaf() { return leaf_.data(); }

    void end_row() {
        if (++leaf_rows_ < kCascadeLeafRows) return;
        size_t k = 0;
        for (; k < levels_.size() && held_[k]; ++k) {
            add_into(leaf_.data(), levels_[k].data());  // older sums first: leaf = level + leaf
            held_[k] = false;
        }
        if (k == levels_.size()) {
            levels_.emplace_back(n_);
            held_.push_back(false);
        }
        std::copy(leaf_.begin(), leaf_.end(), levels_[k].begin());
        held_[k] = true;
        std::fill(leaf_.begin(), leaf_.end(), acc_t(0));
        leaf_rows_ = 0;
    }

    // The sum of every row so far, written to out[n].
    void finish(acc_t* out) {
        for (size_t k = 0; k < levels_.size(); ++k)
            if (held_[k]) add_into(leaf_.data(), levels_[k].data());
        std::copy(leaf_.begin(), leaf_.end(), out);
    }

   private:
    void add_into(acc_t* acc, const acc_t* older) const {
        for (int64_t j = 0; j < n_; ++j) acc[j] = older[j] + acc[j];
    }

    int64_t n_;
    std::vector<acc_t> leaf_;
    int leaf_rows_ = 0;
    std::vector<std::vector<acc_t>> levels_;
    std::vector<bool> held_;
};

// Parameter j, or the neutral value (1 for gamma, 0 for beta) when the parameter is absent.
template <typename acc_t, typename param_t>
inline acc_t param_or(const param_t* p, int64_t j, acc_t neutral) {
    return p != nullptr ? static_cast<acc_t>(p[j]) : neutral;
}

template <bool kRms, typename scalar_t, typename param_t, typename acc_t>
void norm_fwd_kernel(const scalar_t* x,      // [M, N]
                     const param_t* gamma,   // [N] or null
                     const param_t* beta,    // [N] or null (always null for RMSNorm)
                     scalar_t* y,            // [M, N]
                     acc_t* rstd,            // [M]
                     int64_t M, int64_t N, acc_t eps) {
    const int64_t grain = std::max<int64_t>(1, 32768 / N);
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
            const scalar_t* xr = x + row * N;
            scalar_t* yr = y + row * N;
            acc_t centre = 0;
            if constexpr (!kRms)
                centre = pairwise_sum<acc_t>(0, N, [&](int64_t j) { return static_cast<acc_t>(xr[j]); }) / N;
            // two passes (mean, then squared deviations) avoid the cancellation of E[x^2] - E[x]^2
            const acc_t mean_square = pairwise_sum<acc_t>(0, N, [&](int64_t j) {
                const acc_t d = static_cast<acc_t>(xr[j]) - centre;
                return d * d;
            }) / N;
            const acc_t r = norm_rstd(mean_square, eps);
            rstd[row] = r;
            for (int64_t j = 0; j < N; ++j)
                yr[j] = static_cast<scalar_t>(norm_output(static_cast<acc_t>(xr[j]), centre, r,
                                                          param_or(gamma, j, acc_t(1)),
                                                          param_or(beta, j, acc_t(0))));
        }
    });
}

// dx for every row, and per-chunk partial sums of dy * x_hat and dy for dgamma / dbeta.
// x_hat is recovered with recover_gamma (norm_recover_gamma, once per feature); g = gamma * dy.
template <bool kRms, typename scalar_t, typename param_t, typename acc_t>
void norm_bwd_kernel(const scalar_t* dy,            // [M, N]
                     const scalar_t* y,             // [M, N]
                     const acc_t* rstd,             // [M]
                     const param_t* gamma,          // [N] or null
                     const param_t* beta,           // [N] or null
                     const acc_t* recover_gamma,    // [N]
                     scalar_t* dx,                  // [M, N]
                     acc_t* dgamma_part,     // [chunks, N], or null
                     acc_t* dbeta_part,      // [chunks, N], or null
                     int64_t M, int64_t N, int64_t chunk_rows, int64_t chunks) {
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
            RowCascade<acc_t> gamma_sum(dgamma_part != nullptr ? N : 0);
            RowCascade<acc_t> beta_sum(dbeta_part != nullptr ? N : 0);
            acc_t* pg = dgamma_part != nullptr ? gamma_sum.leaf() : nullptr;
            acc_t* pb = dbeta_part != nullptr ? beta_sum.leaf() : nullptr;
            const int64_t row_end = std::min(M, (c + 1) * chunk_rows);
            for (int64_t row = c * chunk_rows; row < row_end; ++row) {
                const scalar_t* dyr = dy + row * N;
                const scalar_t* yr = y + row * N;
                scalar_t* dxr = dx + row * N;
                const acc_t r = rstd[row];
                const auto g = [&](int64_t j) {
                    return param_or(gamma, j, acc_t(1)) * static_cast<acc_t>(dyr[j]);
                };
                const auto xhat = [&](int64_t j) {
                    return norm_recover_xhat(static_cast<acc_t>(yr[j]), recover_gamma[j],
                                             param_or(beta, j, acc_t(0)));
                };
                acc_t mean_g = 0;
                if constexpr (!kRms) mean_g = pairwise_sum<acc_t>(0, N, g) / N;
                const acc_t mean_g_xhat =
                    pairwise_sum<acc_t>(0, N, [&](int64_t j) { return g(j) * xhat(j); }) / N;
                for (int64_t j = 0; j < N; ++j) {
                    const acc_t xh = xhat(j);
                    dxr[j] = static_cast<scalar_t>(norm_input_grad(g(j), xh, r, mean_g, mean_g_xhat));
                    if (pg != nullptr) pg[j] += static_cast<acc_t>(dyr[j]) * xh;
                    if (pb != nullptr) pb[j] += static_cast<acc_t>(dyr[j]);
                }
                gamma_sum.end_row();
                beta_sum.end_row();
            }
            if (dgamma_part != nullptr) gamma_sum.finish(dgamma_part + c * N);
            if (dbeta_part != nullptr) beta_sum.finish(dbeta_part + c * N);
        }
    });
}

// out[j] = sum over chunks of part[c, j], pairwise in chunk order.
template <typename acc_t, typename param_t>
void sum_chunks(const acc_t* part, param_t* out, int64_t chunks, int64_t N) {
    at::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j)
            out[j] = static_cast<param_t>(pairwise_sum<acc_t>(0, chunks, [&](int64_t c) { return part[c * N + j]; }));
    });
}

template <bool kRms>
std::vector<at::Tensor> norm_fwd(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps) {
    TORCH_CHECK(x.is_cpu(), op, ": tensors must be on the CPU");  // the parameters: on x's device
    norm_host::check_norm_args(op, x, weight, bias);
    const norm_host::Rows rows = norm_host::rows_of(x);
    const int64_t M = rows.M, N = rows.N;
    auto y = empty_output(x);
    const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto rstd = empty_output({M}, x.options().dtype(acc_dtype));
    if (x.numel() == 0) return {y, rstd};
    const bool mixed = norm_host::param_dtype(x, weight, bias) != x.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tempo_norm_fwd", [&] {
        using acc_t = typename norm_acc_type<scalar_t>::type;
        const auto run = [&](auto param_tag) {
            using param_t = decltype(param_tag);
            norm_fwd_kernel<kRms>(x.data_ptr<scalar_t>(), norm_host::data_or_null<param_t>(weight),
                                  norm_host::data_or_null<param_t>(bias), y.data_ptr<scalar_t>(),
                                  rstd.data_ptr<acc_t>(), M, N, static_cast<acc_t>(eps));
        };
        if (mixed)
            run(float{});
        else
            run(scalar_t{});
    });
    return {y, rstd};
}

template <bool kRms>
std::vector<at::Tensor> norm_bwd(const char* op, const at::Tensor& dy, const at::Tensor& y, const at::Tensor& rstd,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                 bool clamp_gamma) {
    TORCH_CHECK(y.is_cpu(), op, ": tensors must be on the CPU");  // the others: on y's device
    norm_host::check_saved(op, dy, y, rstd);
    norm_host::check_norm_args(op, y, weight, bias);
    const norm_host::Rows rows = norm_host::rows_of(y);
    const int64_t M = rows.M, N = rows.N;
    auto dx = empty_output(y);
    auto dweight = norm_host::param_grad_like(weight);
    auto dbias = norm_host::param_grad_like(bias);
    const int64_t chunk_rows = std::max(kMinChunkRows, (M + kMaxChunks - 1) / kMaxChunks);
    const int64_t chunks = (M + chunk_rows - 1) / chunk_rows;
    const auto part_options = rstd.options();
    // every chunk writes its whole partial row
    auto dweight_part = dweight.defined() ? at::empty({chunks, N}, part_options) : at::Tensor();
    auto dbias_part = dbias.defined() ? at::empty({chunks, N}, part_options) : at::Tensor();
    const bool mixed = norm_host::param_dtype(y, weight, bias) != y.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "tempo_norm_bwd", [&] {
        using acc_t = typename norm_acc_type<scalar_t>::type;
        const auto run = [&](auto param_tag) {
            using param_t = decltype(param_tag);
            const param_t* gamma = norm_host::data_or_null<param_t>(weight);
            const param_t* beta = norm_host::data_or_null<param_t>(bias);
            std::vector<acc_t> recover_gamma(N);
            for (int64_t j = 0; j < N; ++j)
                recover_gamma[j] = norm_recover_gamma<scalar_t>(param_or(gamma, j, acc_t(1)),
                                                                param_or(beta, j, acc_t(0)), clamp_gamma);
            if (N > 0)
                norm_bwd_kernel<kRms>(dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(),
                                      gamma, beta, recover_gamma.data(), dx.data_ptr<scalar_t>(),
                                      dweight_part.defined() ? dweight_part.data_ptr<acc_t>() : nullptr,
                                      dbias_part.defined() ? dbias_part.data_ptr<acc_t>() : nullptr, M, N,
                                      chunk_rows, chunks);
            // with zero rows the sums are zero: sum_chunks still writes every element
            if (dweight.defined())
                sum_chunks(chunks > 0 ? dweight_part.data_ptr<acc_t>() : nullptr, dweight.data_ptr<param_t>(),
                           chunks, N);
            if (dbias.defined())
                sum_chunks(chunks > 0 ? dbias_part.data_ptr<acc_t>() : nullptr, dbias.data_ptr<param_t>(), chunks, N);
        };
        if (mixed)
            run(float{});
        else
            run(scalar_t{});
    });
    return {dx, dweight, dbias};
}

}  // namespace

TEMPO_NORM_DEFINE_ENTRY_POINTS()

}  // namespace cpu
}  // namespace tempo
