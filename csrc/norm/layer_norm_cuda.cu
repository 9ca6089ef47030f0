// Output-saving LayerNorm and RMSNorm on CUDA (RMSNorm is LayerNorm without centring and without
// beta; every kernel serves both through the kRms flag).
//
// Bytes kept for backward per row of N features: stock LayerNorm keeps x (N * sizeof(T)) plus
// mean and rstd (8 bytes); this keeps rstd only (4 bytes), because the output y it also needs is
// kept by the next linear layer anyway. In bf16 at hidden size h: 2h + 8 -> 4 bytes per token.
//
// Layout:
//   norm_fwd_kernel / norm_bwd_kernel: one block per row (grid-stride over rows), 16-byte
//     vectorised loads when every row start is aligned, fp32 statistics from tree reductions
//     (warp shuffles, then across warps in a fixed order). Each pass re-reads the row from global
//     memory rather than staging it: one row per block (N * sizeof(T) bytes) is live at a time,
//     which stays in L1/L2, and any N works without a shared-memory limit.
//   norm_param_grad_partial_kernel: dgamma / dbeta as per-(column tile, row chunk) partials
//     summed in a fixed order, no atomics; sum_chunks_kernel adds the chunks in chunk order.
//     Chunk bounds depend on the row count only, so two runs are bit-identical.
// Offsets are int64: tensors over 2^31 elements are supported.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "norm_host.h"
#include "tempo/core_ops.h"
#include "tempo/norm.h"

namespace tempo {
namespace cuda {
namespace {

constexpr int kMaxThreads = 512;
constexpr int64_t kMaxRowBlocks = int64_t(1) << 30;
// Parameter-gradient tiles: 32 columns (one warp, coalesced) x 8 row lanes.
constexpr int kColTile = 32;
constexpr int kRowLanes = 8;
// At most kMaxChunks row chunks of at least kMinChunkRows rows: enough blocks to fill the GPU
// for small hidden sizes, and a partial buffer of at most kMaxChunks x N fp32 values.
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinChunkRows = 32;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
    T v[VEC];
};

template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void load_vec(const T* p, acc_t (&out)[VEC]) {
    const Vec<T, VEC> packed = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = static_cast<acc_t>(packed.v[k]);
}

template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void store_vec(T* p, const acc_t (&in)[VEC]) {
    Vec<T, VEC> packed;
#pragma unroll
    for (int k = 0; k < VEC; ++k) packed.v[k] = static_cast<T>(in[k]);
    *reinterpret_cast<Vec<T, VEC>*>(p) = packed;
}

// Parameter j, or the neutral value (1 for gamma, 0 for beta) when the parameter is absent.
template <typename acc_t, typename param_t>
__device__ __forceinline__ acc_t param_or(const param_t* p, int64_t j, acc_t neutral) {
    return p != nullptr ? static_cast<acc_t>(p[j]) : neutral;
}

// Sums NV values over the block (blockDim.x a multiple of 32); every thread gets the totals.
// The order of additions is fixed by blockDim, so the result is reproducible.
template <int NV, typename acc_t>
__device__ __forceinline__ void block_sum(acc_t (&v)[NV], acc_t* smem /* [32 * NV] */) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
    if (lane == 0)
#pragma unroll
        for (int k = 0; k < NV; ++k) smem[warp * NV + k] = v[k];
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            v[k] = lane < warps ? smem[lane * NV + k] : acc_t(0);
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
        }
        // every lane of warp 0 has read smem above (the shuffles synchronise the warp)
        if (lane == 0)
#pragma unroll
            for (int k = 0; k < NV; ++k) smem[k] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < NV; ++k) v[k] = smem[k];
    // smem is reused by the next reduction
    __syncthreads();
}

template <bool kRms, int VEC, typename scalar_t, typename param_t,
          typename acc_t = typename norm_acc_type<scalar_t>::type>
__global__ void norm_fwd_kernel(const scalar_t* __restrict__ x,     // [M, N]
                                const param_t* __restrict__ gamma,  // [N] or null
                                const param_t* __restrict__ beta,   // [N] or null
                                scalar_t* __restrict__ y,           // [M, N]
                                acc_t* __restrict__ rstd,           // [M]
                                int64_t M, int64_t N, acc_t eps) {
    __shared__ acc_t smem[32];
    const int64_t start = int64_t(threadIdx.x) * VEC;
    const int64_t stride = int64_t(blockDim.x) * VEC;
    for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
        const scalar_t* xr = x + row * N;
        scalar_t* yr = y + row * N;
        acc_t centre = 0;
        if constexpr (!kRms) {
            acc_t sum[1] = {0};
            for (int64_t j = start; j < N; j += stride) {
                acc_t v[VEC];
                load_vec<VEC>(xr + j, v);
#pragma unroll
                for (int k = 0; k < VEC; ++k) sum[0] += v[k];
            }
            block_sum(sum, smem);
            centre = sum[0] / N;
        }
        // two passes (mean, then squared deviations) avoid the cancellation of E[x^2] - E[x]^2
        acc_t square[1] = {0};
        for (int64_t j = start; j < N; j += stride) {
            acc_t v[VEC];
            load_vec<VEC>(xr + j, v);
#pragma unroll
            for (int k = 0; k < VEC; ++k) square[0] += (v[k] - centre) * (v[k] - centre);
        }
        block_sum(square, smem);
        const acc_t r = norm_rstd(square[0] / N, eps);
        if (threadIdx.x == 0) rstd[row] = r;
        for (int64_t j = start; j < N; j += stride) {
            acc_t v[VEC];
            load_vec<VEC>(xr + j, v);
#pragma unroll
            for (int k = 0; k < VEC; ++k)
                v[k] = norm_output(v[k], centre, r, param_or(gamma, j + k, acc_t(1)), param_or(beta, j + k, acc_t(0)));
            store_vec<VEC>(yr + j, v);
        }
    }
}

// dx only; dgamma / dbeta come from norm_param_grad_partial_kernel.
template <bool kRms, int VEC, typename scalar_t, typename param_t,
          typename acc_t = typename norm_acc_type<scalar_t>::type>
__global__ void norm_bwd_kernel(const scalar_t* __restrict__ dy,    // [M, N]
                                const scalar_t* __restrict__ y,     // [M, N]
                                const acc_t* __restrict__ rstd,     // [M]
                                const param_t* __restrict__ gamma,  // [N] or null
                                const param_t* __restrict__ beta,   // [N] or null
                                scalar_t* __restrict__ dx,          // [M, N]
                                int64_t M, int64_t N) {
    __shared__ acc_t smem[64];
    const int64_t start = int64_t(threadIdx.x) * VEC;
    const int64_t stride = int64_t(blockDim.x) * VEC;
    for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
        const scalar_t* dyr = dy + row * N;
        const scalar_t* yr = y + row * N;
        scalar_t* dxr = dx + row * N;
        const acc_t r = rstd[row];
        // sums[0] = sum(g), sums[1] = sum(g * x_hat), g = gamma * dy
        acc_t sums[2] = {0, 0};
        for (int64_t j = start; j < N; j += stride) {
            acc_t d[VEC], v[VEC];
            load_vec<VEC>(dyr + j, d);
            load_vec<VEC>(yr + j, v);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const acc_t w = param_or(gamma, j + k, acc_t(1));
                const acc_t g = w * d[k];
                if constexpr (!kRms) sums[0] += g;
                sums[1] += g * norm_recover_xhat(v[k], w, param_or(beta, j + k, acc_t(0)));
            }
        }
        block_sum(sums, smem);
        const acc_t mean_g = kRms ? acc_t(0) : sums[0] / N;
        const acc_t mean_g_xhat = sums[1] / N;
        for (int64_t j = start; j < N; j += stride) {
            acc_t d[VEC], v[VEC];
            load_vec<VEC>(dyr + j, d);
            load_vec<VEC>(yr + j, v);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const acc_t w = param_or(gamma, j + k, acc_t(1));
                const acc_t xhat = norm_recover_xhat(v[k], w, param_or(beta, j + k, acc_t(0)));
                v[k] = norm_input_grad(w * d[k], xhat, r, mean_g, mean_g_xhat);
            }
            store_vec<VEC>(dxr + j, v);
        }
    }
}

// Block (kColTile, kRowLanes) sums dy * x_hat and dy over rows [chunk * chunk_rows, ...) of
// kColTile columns: each thread walks every kRowLanes-th row, then lane sums are added in lane order.
template <typename scalar_t, typename param_t, typename acc_t = typename norm_acc_type<scalar_t>::type>
__global__ void norm_param_grad_partial_kernel(const scalar_t* __restrict__ dy,    // [M, N]
                                               const scalar_t* __restrict__ y,     // [M, N]
                                               const param_t* __restrict__ gamma,  // [N] or null
                                               const param_t* __restrict__ beta,   // [N] or null
                                               acc_t* __restrict__ dgamma_part,    // [chunks, N] or null
                                               acc_t* __restrict__ dbeta_part,     // [chunks, N] or null
                                               int64_t M, int64_t N, int64_t chunk_rows) {
    __shared__ acc_t tile[2][kRowLanes][kColTile + 1];
    const int64_t col = int64_t(blockIdx.x) * kColTile + threadIdx.x;
    const int64_t chunk = blockIdx.y;
    const int64_t row_end = M < (chunk + 1) * chunk_rows ? M : (chunk + 1) * chunk_rows;
    acc_t sum_gamma = 0, sum_beta = 0;
    if (col < N) {
        const acc_t w = param_or(gamma, col, acc_t(1));
        const acc_t b = param_or(beta, col, acc_t(0));
        for (int64_t row = chunk * chunk_rows + threadIdx.y; row < row_end; row += kRowLanes) {
            const int64_t i = row * N + col;
            const acc_t d = static_cast<acc_t>(dy[i]);
            sum_gamma += d * norm_recover_xhat(static_cast<acc_t>(y[i]), w, b);
            sum_beta += d;
        }
    }
    tile[0][threadIdx.y][threadIdx.x] = sum_gamma;
    tile[1][threadIdx.y][threadIdx.x] = sum_beta;
    __syncthreads();
    if (threadIdx.y == 0 && col < N) {
        acc_t g = 0, b = 0;
#pragma unroll
        for (int lane = 0; lane < kRowLanes; ++lane) {
            g += tile[0][lane][threadIdx.x];
            b += tile[1][lane][threadIdx.x];
        }
        if (dgamma_part != nullptr) dgamma_part[chunk * N + col] = g;
        if (dbeta_part != nullptr) dbeta_part[chunk * N + col] = b;
    }
}

// out[j] = sum over chunks of part[c, j], in chunk order (zero when there are no rows).
template <typename acc_t, typename param_t>
__global__ void sum_chunks_kernel(const acc_t* __restrict__ part,  // [chunks, N] or null
                                  param_t* __restrict__ out,       // [N]
                                  int64_t chunks, int64_t N) {
    for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < N; j += int64_t(gridDim.x) * blockDim.x) {
        acc_t sum = 0;
        for (int64_t c = 0; c < chunks; ++c) sum += part[c * N + j];
        out[j] = static_cast<param_t>(sum);
    }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls fn(param_tag, vec_tag): param_t is float for mixed precision (16-bit x, fp32 gamma/beta)
// and scalar_t otherwise; VEC is 16 bytes' worth of scalar_t when every row start is aligned.
template <typename scalar_t, typename Fn>
void with_param_and_vec(bool mixed, bool vectorised, const Fn& fn) {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if constexpr (sizeof(scalar_t) == 2) {
        if (mixed) {
            if (vectorised)
                fn(float{}, std::integral_constant<int, kVec>{});
            else
                fn(float{}, std::integral_constant<int, 1>{});
            return;
        }
    }
    if (vectorised)
        fn(scalar_t{}, std::integral_constant<int, kVec>{});
    else
        fn(scalar_t{}, std::integral_constant<int, 1>{});
}

int row_threads(int64_t N, int vec) {
    const int64_t per_row = (N + vec - 1) / vec;
    return static_cast<int>(std::clamp<int64_t>((per_row + 31) / 32 * 32, 32, kMaxThreads));
}

unsigned row_blocks(int64_t M) { return static_cast<unsigned>(std::min(M, kMaxRowBlocks)); }

void check_cuda(const char* op, const at::Tensor& t) {
    TORCH_CHECK(t.is_cuda(), op, ": tensors must be on a CUDA device");
}

template <bool kRms>
std::vector<at::Tensor> norm_fwd(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps) {
    check_cuda(op, x);
    norm_host::check_norm_args(op, x, weight, bias);
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t M = x.size(0), N = x.size(1);
    auto y = empty_output(x);
    const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto rstd = empty_output({M}, x.options().dtype(acc_dtype));
    if (M == 0) return {y, rstd};
    const bool mixed = norm_host::param_dtype(x, weight, bias) != x.scalar_type();
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tempo_norm_fwd", [&] {
        using acc_t = typename norm_acc_type<scalar_t>::type;
        constexpr int kVec = 16 / sizeof(scalar_t);
        const bool vectorised = N % kVec == 0 && aligned16(x.data_ptr()) && aligned16(y.data_ptr());
        with_param_and_vec<scalar_t>(mixed, vectorised, [&](auto param_tag, auto vec_tag) {
            using param_t = decltype(param_tag);
            constexpr int VEC = decltype(vec_tag)::value;
            norm_fwd_kernel<kRms, VEC><<<row_blocks(M), row_threads(N, VEC), 0, stream>>>(
                x.data_ptr<scalar_t>(), norm_host::data_or_null<param_t>(weight),
                norm_host::data_or_null<param_t>(bias), y.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(), M, N,
                static_cast<acc_t>(eps));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    });
    return {y, rstd};
}

template <bool kRms>
std::vector<at::Tensor> norm_bwd(const char* op, const at::Tensor& dy, const at::Tensor& y, const at::Tensor& rstd,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
    check_cuda(op, y);
    check_cuda(op, dy);
    check_cuda(op, rstd);
    norm_host::check_saved(op, dy, y, rstd);
    norm_host::check_norm_args(op, y, weight, bias);
    const c10::cuda::CUDAGuard guard(y.device());
    const int64_t M = y.size(0), N = y.size(1);
    auto dx = empty_output(y);
    auto dweight = norm_host::param_grad_like(weight);
    auto dbias = norm_host::param_grad_like(bias);
    const int64_t chunk_rows = std::max(kMinChunkRows, (M + kMaxChunks - 1) / kMaxChunks);
    const int64_t chunks = (M + chunk_rows - 1) / chunk_rows;
    auto dweight_part = dweight.defined() ? at::empty({chunks, N}, rstd.options()) : at::Tensor();
    auto dbias_part = dbias.defined() ? at::empty({chunks, N}, rstd.options()) : at::Tensor();
    const bool mixed = norm_host::param_dtype(y, weight, bias) != y.scalar_type();
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "tempo_norm_bwd", [&] {
        using acc_t = typename norm_acc_type<scalar_t>::type;
        constexpr int kVec = 16 / sizeof(scalar_t);
        const bool vectorised = N % kVec == 0 && aligned16(dy.data_ptr()) && aligned16(y.data_ptr()) &&
                                aligned16(dx.data_ptr());
        with_param_and_vec<scalar_t>(mixed, vectorised, [&](auto param_tag, auto vec_tag) {
            using param_t = decltype(param_tag);
            constexpr int VEC = decltype(vec_tag)::value;
            const param_t* gamma = norm_host::data_or_null<param_t>(weight);
            const param_t* beta = norm_host::data_or_null<param_t>(bias);
            if (M > 0) {
                norm_bwd_kernel<kRms, VEC><<<row_blocks(M), row_threads(N, VEC), 0, stream>>>(
                    dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(), gamma, beta,
                    dx.data_ptr<scalar_t>(), M, N);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
            if (!dweight.defined() && !dbias.defined()) return;
            acc_t* gamma_part = dweight.defined() ? dweight_part.data_ptr<acc_t>() : nullptr;
            acc_t* beta_part = dbias.defined() ? dbias_part.data_ptr<acc_t>() : nullptr;
            if (chunks > 0) {
                const dim3 grid(static_cast<unsigned>((N + kColTile - 1) / kColTile), static_cast<unsigned>(chunks));
                norm_param_grad_partial_kernel<<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
                    dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), gamma, beta, gamma_part, beta_part, M, N,
                    chunk_rows);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
            const unsigned sum_blocks = static_cast<unsigned>(std::min<int64_t>((N + 255) / 256, 4096));
            if (dweight.defined()) {
                sum_chunks_kernel<<<sum_blocks, 256, 0, stream>>>(gamma_part, dweight.data_ptr<param_t>(), chunks, N);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
            if (dbias.defined()) {
                sum_chunks_kernel<<<sum_blocks, 256, 0, stream>>>(beta_part, dbias.data_ptr<param_t>(), chunks, N);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
        });
    });
    return {dx, dweight, dbias};
}

}  // namespace

std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias, double eps) {
    return norm_fwd<false>("layer_norm_fwd", x, weight, bias, eps);
}

std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& rstd,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias) {
    return norm_bwd<false>("layer_norm_bwd", dy, y, rstd, weight, bias);
}

std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
    return norm_fwd<true>("rms_norm_fwd", x, weight, std::nullopt, eps);
}

std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& rstd,
                                     const std::optional<at::Tensor>& weight) {
    auto grads = norm_bwd<true>("rms_norm_bwd", dy, y, rstd, weight, std::nullopt);
    return {grads[0], grads[1]};
}

}  // namespace cuda
}  // namespace tempo
