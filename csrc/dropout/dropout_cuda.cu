// Seeded dropout and bias-dropout-add on CUDA.
//
// Bytes kept for backward per element: stock dropout keeps a 1-byte mask (torch's native_dropout,
// and Megatron's bias_dropout_add on top of it); these keep nothing per element, only an 8-byte
// seed per call. The mask is regenerated from (seed, element index) by Philox (tempo/philox.h).
// The seed lives on the device and is read by the kernel, so no call syncs the host.
// One thread owns one Philox group (4 consecutive elements); offsets are int64.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "tempo/dropout_ops.h"
#include "tempo/philox.h"

namespace tempo {
namespace cuda {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t work_items) {
    const int64_t max_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
    const int64_t blocks = (work_items + kThreads - 1) / kThreads;
    return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, max_blocks)));
}

template <typename scalar_t>
__global__ void dropout_fwd_kernel(const scalar_t* __restrict__ x,  // [n]
                                   scalar_t* __restrict__ y,        // [n]
                                   const int64_t* __restrict__ seed,  // [1]
                                   double p, int64_t n) {
    using acc_t = typename compute_type<scalar_t>::type;
    const DropoutParams d = make_dropout_params(*seed, p);
    const acc_t scale = static_cast<acc_t>(d.scale);
    for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < (n + 3) / 4;
         g += int64_t(gridDim.x) * blockDim.x) {
        const uint32_t keep = dropout_keep_bits(d, g);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int64_t i = 4 * g + k;
            // multiply rather than select so that NaN/Inf propagate as in torch's dropout
            if (i < n) y[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * ((keep >> k) & 1 ? scale : acc_t(0)));
        }
    }
}

__global__ void dropout_mask_kernel(bool* __restrict__ mask,  // [n]
                                    const int64_t* __restrict__ seed, double p, int64_t n) {
    const DropoutParams d = make_dropout_params(*seed, p);
    for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < (n + 3) / 4;
         g += int64_t(gridDim.x) * blockDim.x) {
        const uint32_t keep = dropout_keep_bits(d, g);
#pragma unroll
        for (int k = 0; k < 4; ++k)
            if (4 * g + k < n) mask[4 * g + k] = (keep >> k) & 1;
    }
}

// mask: [outer, rows, cols]; entry (o, r, c) is element offset + o * outer_stride + r * row_stride + c.
__global__ void dropout_mask_block_kernel(bool* __restrict__ mask, const int64_t* __restrict__ seed, double p,
                                          int64_t offset, int64_t rows, int64_t outer_stride, int64_t row_stride,
                                          int64_t cols, int64_t n) {
    const DropoutParams d = make_dropout_params(*seed, p);
    for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
        const int64_t row = e / cols, c = e % cols;
        mask[e] = dropout_keep(d, offset + (row / rows) * outer_stride + (row % rows) * row_stride + c);
    }
}

template <typename scalar_t>
__global__ void bias_dropout_add_kernel(const scalar_t* __restrict__ x,         // [n]
                                        const scalar_t* __restrict__ bias,      // [h] or nullptr
                                        const scalar_t* __restrict__ residual,  // [n]
                                        scalar_t* __restrict__ out,             // [n]
                                        const int64_t* __restrict__ seed, double p, int64_t n, int64_t h) {
    using acc_t = typename compute_type<scalar_t>::type;
    const DropoutParams d = make_dropout_params(*seed, p);
    const acc_t scale = static_cast<acc_t>(d.scale);
    for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < (n + 3) / 4;
         g += int64_t(gridDim.x) * blockDim.x) {
        const uint32_t keep = dropout_keep_bits(d, g);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int64_t i = 4 * g + k;
            if (i >= n) continue;
            const acc_t v = static_cast<acc_t>(x[i]) + (bias ? static_cast<acc_t>(bias[i % h]) : acc_t(0));
            out[i] = static_cast<scalar_t>(static_cast<acc_t>(residual[i]) + v * ((keep >> k) & 1 ? scale : acc_t(0)));
        }
    }
}

}  // namespace

at::Tensor dropout_fwd(const at::Tensor& x, const at::Tensor& seed, double p) {
    TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "dropout_fwd: x must be a contiguous CUDA tensor");
    detail::check_seed(seed, x, "dropout_fwd");
    detail::check_p(p, "dropout_fwd");
    const c10::cuda::CUDAGuard guard(x.device());
    auto y = empty_output(x);
    const int64_t n = x.numel();
    if (n == 0) return y;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_fwd", [&] {
        dropout_fwd_kernel<<<grid_for((n + 3) / 4), kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), seed.data_ptr<int64_t>(), p, n);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
}

at::Tensor dropout_mask(const at::Tensor& seed, int64_t n, double p) {
    TORCH_CHECK(seed.is_cuda(), "dropout_mask: seed must be a CUDA tensor");
    detail::check_seed(seed, seed, "dropout_mask");
    detail::check_p(p, "dropout_mask");
    const c10::cuda::CUDAGuard guard(seed.device());
    auto mask = at::empty({n}, seed.options().dtype(at::kBool));
    if (n == 0) return mask;
    dropout_mask_kernel<<<grid_for((n + 3) / 4), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        mask.data_ptr<bool>(), seed.data_ptr<int64_t>(), p, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return mask;
}

at::Tensor dropout_mask_block(const at::Tensor& seed, double p, int64_t offset, int64_t outer,
                              int64_t outer_stride, int64_t rows, int64_t row_stride, int64_t cols) {
    TORCH_CHECK(seed.is_cuda(), "dropout_mask_block: seed must be a CUDA tensor");
    detail::check_mask_block(seed, p, offset, outer, outer_stride, rows, row_stride, cols);
    const c10::cuda::CUDAGuard guard(seed.device());
    auto mask = at::empty({outer, rows, cols}, seed.options().dtype(at::kBool));
    const int64_t n = mask.numel();
    if (n == 0) return mask;
    dropout_mask_block_kernel<<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        mask.data_ptr<bool>(), seed.data_ptr<int64_t>(), p, offset, rows, outer_stride, row_stride, cols, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return mask;
}

at::Tensor bias_dropout_add_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                const at::Tensor& residual, const at::Tensor& seed, double p) {
    TORCH_CHECK(x.is_cuda(), "bias_dropout_add_fwd: x must be a CUDA tensor");  // the others: on x's device
    const int64_t h = detail::check_bias_dropout_add(x, bias, residual, seed, p);
    const c10::cuda::CUDAGuard guard(x.device());
    auto out = empty_output(x);
    const int64_t n = x.numel();
    if (n == 0) return out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_dropout_add_fwd", [&] {
        bias_dropout_add_kernel<<<grid_for((n + 3) / 4), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.data_ptr<scalar_t>(), bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
            residual.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), seed.data_ptr<int64_t>(), p, n, h);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
}

}  // namespace cuda
}  // namespace tempo
