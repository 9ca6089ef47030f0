// Attention scale-mask-softmax with seeded dropout on CUDA: Tempo's sub-layer dropout
// recomputation (the math is in tempo/attention.h and tempo/philox.h, shared with the CPU build).
//
// Bytes kept for backward per score element (bf16 activations): Megatron's unfused attention
// keeps the fp32 softmax output (4), the dropout mask (1) and the dropped bf16 probabilities that
// the @v matmul saves (2): 7 bytes. This keeps the bf16 softmax output only (2 bytes; 4 if the
// caller asks for fp32) plus an 8-byte seed per call: backward regenerates the dropped
// probabilities (softmax_dropout_regen, for the gradient of v) and folds the regenerated mask
// into the softmax backward (softmax_dropout_bwd).
//
// One warp owns one row of the [B * sq, sk] scores; statistics are fp32 (fp64 for fp32 scores)
// and reduced with warp shuffles. Element loops walk Philox groups of 4 (rows may start
// mid-group: groups follow the flat index, as on CPU), so each lane draws one Philox call per
// group. Offsets are int64.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "tempo/dropout_ops.h"
#include "tempo/philox.h"

namespace tempo {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;
constexpr int kThreads = kWarp * kRowsPerBlock;

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v = t_fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t masked_score(const scalar_t* scores, const MaskView& mask, int64_t row,
                                              int64_t base, int64_t k, acc_t scale) {
    return mask.masked(row, k) ? acc_t(kMaskedScore) : static_cast<acc_t>(scores[base + k]) * scale;
}

template <typename scalar_t, typename prob_t>
__global__ void softmax_dropout_fwd_kernel(const scalar_t* __restrict__ scores,  // [rows, sk]
                                           prob_t* __restrict__ probs,           // [rows, sk]
                                           scalar_t* __restrict__ dropped,       // [rows, sk] or nullptr
                                           MaskView mask, int64_t rows, int64_t sk, double scale,
                                           const int64_t* __restrict__ seed,  // [1]
                                           double p) {
    using acc_t = typename compute_type<scalar_t>::type;
    const DropoutParams d = make_dropout_params(*seed, p);
    const acc_t s = static_cast<acc_t>(scale), d_scale = static_cast<acc_t>(d.scale);
    const int lane = threadIdx.x % kWarp;
    for (int64_t row = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp; row < rows;
         row += int64_t(gridDim.x) * kRowsPerBlock) {
        const int64_t base = row * sk;
        acc_t row_max = -std::numeric_limits<acc_t>::infinity();
        for (int64_t k = lane; k < sk; k += kWarp) row_max = t_fmax(row_max, masked_score(scores, mask, row, base, k, s));
        row_max = warp_max(row_max);
        acc_t sum = 0;
        for (int64_t k = lane; k < sk; k += kWarp) sum += t_exp(masked_score(scores, mask, row, base, k, s) - row_max);
        const acc_t inv = acc_t(1) / warp_sum(sum);
        for (int64_t g = base / 4 + lane; g * 4 < base + sk; g += kWarp) {
            const uint32_t keep = dropped ? dropout_keep_bits(d, g) : 0u;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int64_t i = 4 * g + j;
                if (i < base || i >= base + sk) continue;
                const prob_t y = static_cast<prob_t>(t_exp(masked_score(scores, mask, row, base, i - base, s) - row_max) * inv);
                probs[i] = y;
                // the matmul sees the probability rounded to the activation dtype, as in Megatron
                if (dropped)
                    dropped[i] = static_cast<scalar_t>(static_cast<acc_t>(static_cast<scalar_t>(y)) *
                                                       ((keep >> j) & 1 ? d_scale : acc_t(0)));
            }
        }
    }
}

template <typename out_t, typename prob_t>
__global__ void softmax_dropout_regen_kernel(const prob_t* __restrict__ probs,  // [n]
                                             out_t* __restrict__ dropped,       // [n]
                                             const int64_t* __restrict__ seed, double p, int64_t n) {
    using acc_t = typename compute_type<out_t>::type;
    const DropoutParams d = make_dropout_params(*seed, p);
    const acc_t d_scale = static_cast<acc_t>(d.scale);
    for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < (n + 3) / 4;
         g += int64_t(gridDim.x) * blockDim.x) {
        const uint32_t keep = dropout_keep_bits(d, g);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int64_t i = 4 * g + j;
            if (i < n)
                dropped[i] = static_cast<out_t>(static_cast<acc_t>(static_cast<out_t>(probs[i])) *
                                                ((keep >> j) & 1 ? d_scale : acc_t(0)));
        }
    }
}

// grad_scores = scale * y * (g' - sum(g' * y)), g' = grad * keep / (1 - p); zero where masked.
template <typename grad_t, typename prob_t>
__global__ void softmax_dropout_bwd_kernel(const grad_t* __restrict__ grad,   // [rows, sk]
                                           const prob_t* __restrict__ probs,  // [rows, sk]
                                           grad_t* __restrict__ grad_scores,  // [rows, sk]
                                           MaskView mask, int64_t rows, int64_t sk, double scale,
                                           const int64_t* __restrict__ seed, double p) {
    using acc_t = typename compute_type<grad_t>::type;
    const DropoutParams d = make_dropout_params(*seed, p);
    const acc_t s = static_cast<acc_t>(scale), d_scale = static_cast<acc_t>(d.scale);
    const int lane = threadIdx.x % kWarp;
    for (int64_t row = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp; row < rows;
         row += int64_t(gridDim.x) * kRowsPerBlock) {
        const int64_t base = row * sk;
        acc_t dot = 0;
        for (int64_t g = base / 4 + lane; g * 4 < base + sk; g += kWarp) {
            const uint32_t keep = dropout_keep_bits(d, g);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int64_t i = 4 * g + j;
                if (i < base || i >= base + sk) continue;
                dot += static_cast<acc_t>(grad[i]) * ((keep >> j) & 1 ? d_scale : acc_t(0)) * static_cast<acc_t>(probs[i]);
            }
        }
        dot = warp_sum(dot);
        for (int64_t g = base / 4 + lane; g * 4 < base + sk; g += kWarp) {
            const uint32_t keep = dropout_keep_bits(d, g);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int64_t i = 4 * g + j;
                if (i < base || i >= base + sk) continue;
                const acc_t gp = static_cast<acc_t>(grad[i]) * ((keep >> j) & 1 ? d_scale : acc_t(0));
                grad_scores[i] = mask.masked(row, i - base)
                                     ? grad_t(0)
                                     : static_cast<grad_t>(s * static_cast<acc_t>(probs[i]) * (gp - dot));
            }
        }
    }
}

unsigned row_grid(int64_t rows) {
    const int64_t max_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 64;
    return static_cast<unsigned>(std::max<int64_t>(1, std::min((rows + kRowsPerBlock - 1) / kRowsPerBlock, max_blocks)));
}

unsigned flat_grid(int64_t groups) {
    const int64_t max_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
    return static_cast<unsigned>(std::max<int64_t>(1, std::min((groups + 255) / 256, max_blocks)));
}

}  // namespace

std::vector<at::Tensor> softmax_dropout_fwd(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                                            bool causal, double scale, const at::Tensor& seed, double p,
                                            bool keep_fp32) {
    TORCH_CHECK(scores.is_cuda(), "softmax_dropout_fwd: scores must be a CUDA tensor");
    const MaskView view = detail::make_mask_view(mask, scores, causal, "softmax_dropout_fwd");
    detail::check_seed(seed, scores, "softmax_dropout_fwd");
    detail::check_p(p, "softmax_dropout_fwd");
    const c10::cuda::CUDAGuard guard(scores.device());
    const bool half = scores.scalar_type() == at::kHalf || scores.scalar_type() == at::kBFloat16;
    const bool fp32_probs = keep_fp32 && half;
    auto probs = empty_output(scores.sizes(), scores.options().dtype(fp32_probs ? at::kFloat : scores.scalar_type()));
    // Without dropout the matmul consumes the probabilities themselves (when they are stored in
    // the activation dtype); otherwise the dropped copy is a transient the caller frees after @v.
    const bool need_dropped = p > 0.0 || fp32_probs;
    at::Tensor dropped = need_dropped ? empty_output(scores) : probs;
    const int64_t rows = scores.size(0) * scores.size(1), sk = scores.size(2);
    if (rows == 0 || sk == 0) return {probs, dropped};
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "softmax_dropout_fwd", [&] {
        scalar_t* drop_ptr = need_dropped ? dropped.data_ptr<scalar_t>() : nullptr;
        if (fp32_probs)
            softmax_dropout_fwd_kernel<<<row_grid(rows), kThreads, 0, stream>>>(
                scores.data_ptr<scalar_t>(), probs.data_ptr<float>(), drop_ptr, view, rows, sk, scale,
                seed.data_ptr<int64_t>(), p);
        else
            softmax_dropout_fwd_kernel<<<row_grid(rows), kThreads, 0, stream>>>(
                scores.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>(), drop_ptr, view, rows, sk, scale,
                seed.data_ptr<int64_t>(), p);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {probs, dropped};
}

at::Tensor softmax_dropout_regen(const at::Tensor& probs, const at::Tensor& seed, double p, at::ScalarType out_dtype) {
    TORCH_CHECK(probs.is_cuda() && probs.is_contiguous(), "softmax_dropout_regen: probs must be a contiguous CUDA tensor");
    detail::check_seed(seed, probs, "softmax_dropout_regen");
    detail::check_p(p, "softmax_dropout_regen");
    TORCH_CHECK(probs.scalar_type() == out_dtype || probs.scalar_type() == at::kFloat,
                "softmax_dropout_regen: probs must be fp32 or of the output dtype");
    const c10::cuda::CUDAGuard guard(probs.device());
    auto dropped = empty_output(probs.sizes(), probs.options().dtype(out_dtype));
    const int64_t n = probs.numel();
    if (n == 0) return dropped;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "softmax_dropout_regen", [&] {
        if (probs.scalar_type() == out_dtype)
            softmax_dropout_regen_kernel<<<flat_grid((n + 3) / 4), 256, 0, stream>>>(
                probs.data_ptr<scalar_t>(), dropped.data_ptr<scalar_t>(), seed.data_ptr<int64_t>(), p, n);
        else
            softmax_dropout_regen_kernel<<<flat_grid((n + 3) / 4), 256, 0, stream>>>(
                probs.data_ptr<float>(), dropped.data_ptr<scalar_t>(), seed.data_ptr<int64_t>(), p, n);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return dropped;
}

at::Tensor softmax_dropout_bwd(const at::Tensor& grad, const at::Tensor& probs, const std::optional<at::Tensor>& mask,
                               bool causal, double scale, const at::Tensor& seed, double p, at::ScalarType out_dtype) {
    TORCH_CHECK(grad.is_cuda() && probs.is_cuda(), "softmax_dropout_bwd: inputs must be CUDA tensors");
    detail::check_softmax_dropout_bwd(grad, probs, seed, p, out_dtype);
    const MaskView view = detail::make_mask_view(mask, probs, causal, "softmax_dropout_bwd");
    const c10::cuda::CUDAGuard guard(grad.device());
    auto grad_scores = empty_output(grad);
    const int64_t rows = probs.size(0) * probs.size(1), sk = probs.size(2);
    if (rows == 0 || sk == 0) return grad_scores;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "softmax_dropout_bwd", [&] {
        if (probs.scalar_type() == grad.scalar_type())
            softmax_dropout_bwd_kernel<<<row_grid(rows), kThreads, 0, stream>>>(
                grad.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>(), grad_scores.data_ptr<scalar_t>(), view, rows,
                sk, scale, seed.data_ptr<int64_t>(), p);
        else
            softmax_dropout_bwd_kernel<<<row_grid(rows), kThreads, 0, stream>>>(
                grad.data_ptr<scalar_t>(), probs.data_ptr<float>(), grad_scores.data_ptr<scalar_t>(), view, rows, sk,
                scale, seed.data_ptr<int64_t>(), p);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return grad_scores;
}

}  // namespace cuda
}  // namespace tempo
