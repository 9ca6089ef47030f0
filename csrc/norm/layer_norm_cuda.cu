// Output-saving LayerNorm and RMSNorm on CUDA (RMSNorm is LayerNorm without centring and without
// beta; every kernel serves both through the kRms flag).
//
// Bytes kept for backward per row of N features: stock LayerNorm keeps x (N * sizeof(T)) plus
// mean and rstd (8 bytes); this keeps rstd only (4 bytes), because the output y it also needs is
// kept by the next linear layer anyway. In bf16 at hidden size h: 2h + 8 -> 4 bytes per token.
//
// Layout. Statistics are fp32, from tree reductions (warp shuffles, then across warps in a fixed
// order). Offsets are int64: tensors over 2^31 elements are supported.
//   Rows held in registers (16-bit and fp32 storage, rows of 16-byte vectors, up to 2048 vectors
//   forward and 1024 backward: hidden 16384 / 8192 in bf16):
//     norm_fwd_kernel: one block per row; each thread keeps up to kFwdItems 16-byte vectors of the
//       row in registers, so x is read once and y written once.
//     norm_bwd_kernel: one block per chunk of rows. Per row, dy and y are read once and dx written
//       once; each thread also adds dy * x_hat and dy into registers for the columns it owns,
//       which are the same in every row, and writes them as the chunk's dgamma / dbeta partials.
//   Other rows (longer, not whole 16-byte vectors or not aligned, fp64) stream from global
//   memory, one pass per step:
//     norm_fwd_streaming_kernel / norm_bwd_streaming_kernel, with the partials from a separate
//     norm_param_grad_partial_kernel that reads dy and y again.
//   column_sum_kernel adds the partials of all chunks in chunk order. Chunk bounds depend on the
//   row count only, never on the GPU, so dgamma / dbeta are bit-identical from run to run.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <iterator>
#include <type_traits>

#include "norm_host.h"
#include "tempo/core_ops.h"
#include "tempo/norm.h"

namespace tempo {
namespace cuda {
namespace {

// Streaming kernels: threads per row.
constexpr int kMaxThreads = 512;
constexpr int64_t kMaxRowBlocks = int64_t(1) << 30;
// Register-held rows. A thread keeps kFwdItems 16-byte vectors forward and kBwdItems backward,
// where dy, y and the dgamma / dbeta accumulators make four arrays of that size. The block size
// is a compile-time choice among kFwdThreads / kBwdThreads (the smallest that holds the row), and
// every kernel is bounded to 64 registers so that 1024 threads stay resident per SM. These shapes
// are the fastest of a sweep on an H100 (docs/norm.md): a thread with more vectors backward spills,
// and fewer resident threads leave memory idle.
constexpr int kFwdItems = 4;
constexpr int kBwdItems = 1;
constexpr int kFwdThreads[] = {128, 512};
constexpr int kBwdThreads[] = {128, 512, 1024};
constexpr int kResidentThreads = 1024;
// Parameter-gradient tiles: 32 columns (one warp, coalesced) x 8 row lanes.
constexpr int kColTile = 32;
constexpr int kRowLanes = 8;
// column_sum_kernel: 32 columns x 16 chunk lanes.
constexpr int kSumLanes = 16;
// Row chunks of the parameter-gradient partials. Register-held rows: up to 512 chunks of at
// least 16 rows, so there are blocks for about two waves of an H100 (the sweep's best against
// 1024 and 2048), while writing and re-reading the partials (8 bytes per column per chunk) costs
// about 1% of the rows' traffic at 128 rows per chunk. Streaming rows: at most 64 chunks of at
// least 32 rows, which bounds the partial buffer to 64 x N fp32 values for rows of any length.
constexpr int64_t kMaxCachedChunks = 512;
constexpr int64_t kMinCachedChunkRows = 16;
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

// VEC parameters from column j, or the neutral value when the parameter is absent. Vector loads
// need the parameter aligned to VEC elements (`vec_ok`), which a view into a flat parameter buffer
// (ZeRO) need not be.
template <int VEC, typename param_t, typename acc_t>
__device__ __forceinline__ void load_params(const param_t* p, int64_t j, bool vec_ok, acc_t neutral,
                                            acc_t (&out)[VEC]) {
    if (p == nullptr) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = neutral;
    } else if (vec_ok) {
        load_vec<VEC>(p + j, out);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = static_cast<acc_t>(p[j + k]);
    }
}

// gamma and beta at columns [j, j + VEC): 1 and 0 where absent.
template <int VEC, typename param_t, typename acc_t>
__device__ __forceinline__ void load_gamma_beta(const param_t* gamma, const param_t* beta, int64_t j, bool vec_ok,
                                                acc_t (&w)[VEC], acc_t (&b)[VEC]) {
    load_params<VEC>(gamma, j, vec_ok, acc_t(1), w);
    load_params<VEC>(beta, j, vec_ok, acc_t(0), b);
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

// One block per row; thread t keeps vectors t, t + THREADS, ... (at most ITEMS) of the row.
template <bool kRms, int VEC, int ITEMS, int THREADS, typename scalar_t, typename param_t,
          typename acc_t = typename norm_acc_type<scalar_t>::type>
__global__ void __launch_bounds__(THREADS, kResidentThreads / THREADS)
norm_fwd_kernel(const scalar_t* __restrict__ x,     // [M, N], N a multiple of VEC
                const param_t* __restrict__ gamma,  // [N] or null
                const param_t* __restrict__ beta,   // [N] or null
                scalar_t* __restrict__ y,           // [M, N]
                acc_t* __restrict__ rstd,           // [M]
                int64_t M, int64_t N, acc_t eps, bool params_vec) {
    __shared__ acc_t smem[32];
    const int64_t vecs = N / VEC;
    for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
        const scalar_t* xr = x + row * N;
        scalar_t* yr = y + row * N;
        // every load is issued before the first reduction; absent vectors are zeros
        acc_t v[ITEMS][VEC];
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const int64_t c = threadIdx.x + int64_t(i) * THREADS;
            if (c < vecs) {
                load_vec<VEC>(xr + c * VEC, v[i]);
            } else {
#pragma unroll
                for (int k = 0; k < VEC; ++k) v[i][k] = 0;
            }
        }
        acc_t centre = 0;
        if constexpr (!kRms) {
            acc_t sum[1] = {0};
#pragma unroll
            for (int i = 0; i < ITEMS; ++i)
#pragma unroll
                for (int k = 0; k < VEC; ++k) sum[0] += v[i][k];
            block_sum(sum, smem);
            centre = sum[0] / N;
        }
        // two passes over the registers (mean, then squared deviations), as in the streaming kernel
        acc_t square[1] = {0};
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            if (threadIdx.x + int64_t(i) * THREADS >= vecs) continue;
#pragma unroll
            for (int k = 0; k < VEC; ++k) square[0] += (v[i][k] - centre) * (v[i][k] - centre);
        }
        block_sum(square, smem);
        const acc_t r = norm_rstd(square[0] / N, eps);
        if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const int64_t c = threadIdx.x + int64_t(i) * THREADS;
            if (c >= vecs) continue;
            acc_t w[VEC], b[VEC];
            load_gamma_beta<VEC>(gamma, beta, c * VEC, params_vec, w, b);
#pragma unroll
            for (int k = 0; k < VEC; ++k) v[i][k] = norm_output(v[i][k], centre, r, w[k], b[k]);
            store_vec<VEC>(yr + c * VEC, v[i]);
        }
    }
}

// One block per chunk of rows (blockIdx.x = chunk), the row layout of norm_fwd_kernel. dx row by
// row; the chunk's dgamma / dbeta partials from per-thread register sums over its rows.
template <bool kRms, int VEC, int ITEMS, int THREADS, typename scalar_t, typename param_t,
          typename acc_t = typename norm_acc_type<scalar_t>::type>
__global__ void __launch_bounds__(THREADS, kResidentThreads / THREADS)
norm_bwd_kernel(const scalar_t* __restrict__ dy,    // [M, N], N a multiple of VEC
                const scalar_t* __restrict__ y,     // [M, N]
                const acc_t* __restrict__ rstd,     // [M]
                const param_t* __restrict__ gamma,  // [N] or null
                const param_t* __restrict__ beta,   // [N] or null
                scalar_t* __restrict__ dx,          // [M, N]
                acc_t* __restrict__ dgamma_part,    // [chunks, N] or null
                acc_t* __restrict__ dbeta_part,     // [chunks, N] or null
                int64_t M, int64_t N, int64_t chunk_rows, bool params_vec, bool clamp_gamma) {
    __shared__ acc_t smem[64];
    const int64_t vecs = N / VEC;
    const int64_t chunk = blockIdx.x;
    const int64_t row_end = M < (chunk + 1) * chunk_rows ? M : (chunk + 1) * chunk_rows;
    acc_t dgamma[ITEMS][VEC], dbeta[ITEMS][VEC];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
        for (int k = 0; k < VEC; ++k) dgamma[i][k] = dbeta[i][k] = 0;
    for (int64_t row = chunk * chunk_rows; row < row_end; ++row) {
        const scalar_t* dyr = dy + row * N;
        const scalar_t* yr = y + row * N;
        scalar_t* dxr = dx + row * N;
        // g = gamma * dy and x_hat, both loads issued before the first use
        acc_t g[ITEMS][VEC], xhat[ITEMS][VEC];
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const int64_t c = threadIdx.x + int64_t(i) * THREADS;
            if (c < vecs) {
                load_vec<VEC>(dyr + c * VEC, g[i]);
                load_vec<VEC>(yr + c * VEC, xhat[i]);
            } else {
#pragma unroll
                for (int k = 0; k < VEC; ++k) g[i][k] = xhat[i][k] = 0;
            }
        }
        const acc_t r = rstd[row];
        // sums[0] = sum(g), sums[1] = sum(g * x_hat)
        acc_t sums[2] = {0, 0};
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const int64_t c = threadIdx.x + int64_t(i) * THREADS;
            if (c >= vecs) continue;
            acc_t w[VEC], b[VEC];
            load_gamma_beta<VEC>(gamma, beta, c * VEC, params_vec, w, b);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const acc_t d = g[i][k];
                const acc_t xh =
                    norm_recover_xhat(xhat[i][k], norm_recover_gamma<scalar_t>(w[k], b[k], clamp_gamma), b[k]);
                dgamma[i][k] += d * xh;
                if constexpr (!kRms) dbeta[i][k] += d;
                g[i][k] = w[k] * d;
                xhat[i][k] = xh;
                if constexpr (!kRms) sums[0] += g[i][k];
                sums[1] += g[i][k] * xh;
            }
        }
        block_sum(sums, smem);
        const acc_t mean_g = kRms ? acc_t(0) : sums[0] / N;
        const acc_t mean_g_xhat = sums[1] / N;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const int64_t c = threadIdx.x + int64_t(i) * THREADS;
            if (c >= vecs) continue;
#pragma unroll
            for (int k = 0; k < VEC; ++k) g[i][k] = norm_input_grad(g[i][k], xhat[i][k], r, mean_g, mean_g_xhat);
            store_vec<VEC>(dxr + c * VEC, g[i]);
        }
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const int64_t c = threadIdx.x + int64_t(i) * THREADS;
        if (c >= vecs) continue;
        if (dgamma_part != nullptr) store_vec<VEC>(dgamma_part + chunk * N + c * VEC, dgamma[i]);
        if (dbeta_part != nullptr) store_vec<VEC>(dbeta_part + chunk * N + c * VEC, dbeta[i]);
    }
}

template <bool kRms, int VEC, typename scalar_t, typename param_t,
          typename acc_t = typename norm_acc_type<scalar_t>::type>
__global__ void norm_fwd_streaming_kernel(const scalar_t* __restrict__ x,     // [M, N]
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

// dx only, for streaming rows; their dgamma / dbeta partials come from
// norm_param_grad_partial_kernel.
template <bool kRms, int VEC, typename scalar_t, typename param_t,
          typename acc_t = typename norm_acc_type<scalar_t>::type>
__global__ void norm_bwd_streaming_kernel(const scalar_t* __restrict__ dy,    // [M, N]
                                          const scalar_t* __restrict__ y,     // [M, N]
                                          const acc_t* __restrict__ rstd,     // [M]
                                          const param_t* __restrict__ gamma,  // [N] or null
                                          const param_t* __restrict__ beta,   // [N] or null
                                          scalar_t* __restrict__ dx,          // [M, N]
                                          int64_t M, int64_t N, bool clamp_gamma) {
    __shared__ acc_t smem[64];
    const int64_t start = int64_t(threadIdx.x) * VEC;
    const int64_t stride = int64_t(blockDim.x) * VEC;
    // x_hat of column j (in v), recovered with the gamma norm_recover_gamma gives
    const auto recover = [&](acc_t v, acc_t w, int64_t j) {
        const acc_t b = param_or(beta, j, acc_t(0));
        return norm_recover_xhat(v, norm_recover_gamma<scalar_t>(w, b, clamp_gamma), b);
    };
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
                sums[1] += g * recover(v[k], w, j + k);
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
                const acc_t xhat = recover(v[k], w, j + k);
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
                                               int64_t M, int64_t N, int64_t chunk_rows, bool clamp_gamma) {
    __shared__ acc_t tile[2][kRowLanes][kColTile + 1];
    const int64_t col = int64_t(blockIdx.x) * kColTile + threadIdx.x;
    const int64_t chunk = blockIdx.y;
    const int64_t row_end = M < (chunk + 1) * chunk_rows ? M : (chunk + 1) * chunk_rows;
    acc_t sum_gamma = 0, sum_beta = 0;
    if (col < N) {
        const acc_t b = param_or(beta, col, acc_t(0));
        const acc_t w = norm_recover_gamma<scalar_t>(param_or(gamma, col, acc_t(1)), b, clamp_gamma);
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

// out[j] = sum over chunks of part[c, j] (zero when there are no chunks). Block (kColTile,
// kSumLanes): lane l adds chunks l, l + kSumLanes, ... in order, then the lanes are added in lane
// order, so the result is the same in every run.
template <typename acc_t, typename param_t>
__global__ void column_sum_kernel(const acc_t* __restrict__ part,  // [chunks, N]
                                  param_t* __restrict__ out,       // [N]
                                  int64_t chunks, int64_t N) {
    __shared__ acc_t tile[kSumLanes][kColTile + 1];
    const int64_t col = int64_t(blockIdx.x) * kColTile + threadIdx.x;
    acc_t sum = 0;
    if (col < N)
        for (int64_t c = threadIdx.y; c < chunks; c += kSumLanes) sum += part[c * N + col];
    tile[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && col < N) {
        acc_t total = 0;
#pragma unroll
        for (int lane = 0; lane < kSumLanes; ++lane) total += tile[lane][threadIdx.x];
        out[col] = static_cast<param_t>(total);
    }
}

bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }
bool aligned16(const void* p) { return aligned_to(p, 16); }

// Parameters can be read VEC at a time (absent ones trivially can).
template <typename param_t, int VEC>
bool params_aligned(const param_t* gamma, const param_t* beta) {
    return aligned_to(gamma, sizeof(param_t) * VEC) && aligned_to(beta, sizeof(param_t) * VEC);
}

// Elements per 16-byte vector.
int vec_width(const at::Tensor& t) { return 16 / static_cast<int>(t.element_size()); }

// Calls fn(std::integral_constant<int, T>) with the smallest block size T of kChoices whose
// threads hold a row of `vecs` vectors at ITEMS vectors each. Callers have checked with
// rows_cached that the largest one does.
template <const auto& kChoices, int ITEMS, size_t I = 0, typename Fn>
void with_row_threads(int64_t vecs, const Fn& fn) {
    if constexpr (I == std::size(kChoices)) {
        TORCH_INTERNAL_ASSERT(false, "a register-held row of ", vecs, " vectors is longer than any block holds");
    } else {
        constexpr int kThreads = kChoices[I];
        if (vecs > int64_t(kThreads) * ITEMS) return with_row_threads<kChoices, ITEMS, I + 1>(vecs, fn);
        fn(std::integral_constant<int, kThreads>{});
    }
}

// Vectors of the longest row the largest block size holds.
template <size_t K>
constexpr int64_t row_capacity(const int (&choices)[K], int items) {
    return int64_t(choices[K - 1]) * items;
}

// Rows held in registers: 16-bit or fp32 storage (fp64 rows stream), 16-byte vectors, and at most
// `capacity` vectors per row.
bool rows_cached(const at::Tensor& t, bool vectorised, int64_t capacity) {
    return vectorised && t.scalar_type() != at::kDouble && t.size(-1) / vec_width(t) <= capacity;
}

// Row chunks of the parameter-gradient partials; the bounds depend on the row count and on the
// path (register-held or streamed rows), never on the GPU.
struct RowChunks {
    int64_t rows;
    int64_t count;
};

RowChunks row_chunks(int64_t M, int64_t max_chunks, int64_t min_rows) {
    const int64_t rows = std::max(min_rows, (M + max_chunks - 1) / max_chunks);
    return {rows, (M + rows - 1) / rows};
}

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
    const norm_host::Rows rows = norm_host::rows_of(x);
    const int64_t M = rows.M, N = rows.N;
    auto y = empty_output(x);
    const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto rstd = empty_output({M}, x.options().dtype(acc_dtype));
    if (M == 0) return {y, rstd};
    const bool mixed = norm_host::param_dtype(x, weight, bias) != x.scalar_type();
    const bool vectorised = N % vec_width(x) == 0 && aligned16(x.data_ptr()) && aligned16(y.data_ptr());
    const bool cached = rows_cached(x, vectorised, row_capacity(kFwdThreads, kFwdItems));
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tempo_norm_fwd", [&] {
        using acc_t = typename norm_acc_type<scalar_t>::type;
        with_param_and_vec<scalar_t>(mixed, vectorised, [&](auto param_tag, auto vec_tag) {
            using param_t = decltype(param_tag);
            constexpr int VEC = decltype(vec_tag)::value;
            const param_t* gamma = norm_host::data_or_null<param_t>(weight);
            const param_t* beta = norm_host::data_or_null<param_t>(bias);
            if constexpr (VEC > 1 && !std::is_same_v<scalar_t, double>) {
                if (cached) {
                    with_row_threads<kFwdThreads, kFwdItems>(N / VEC, [&](auto threads_tag) {
                        constexpr int THREADS = decltype(threads_tag)::value;
                        norm_fwd_kernel<kRms, VEC, kFwdItems, THREADS><<<row_blocks(M), THREADS, 0, stream>>>(
                            x.data_ptr<scalar_t>(), gamma, beta, y.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(),
                            M, N, static_cast<acc_t>(eps), params_aligned<param_t, VEC>(gamma, beta));
                        C10_CUDA_KERNEL_LAUNCH_CHECK();
                    });
                    return;
                }
            }
            norm_fwd_streaming_kernel<kRms, VEC><<<row_blocks(M), row_threads(N, VEC), 0, stream>>>(
                x.data_ptr<scalar_t>(), gamma, beta, y.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(), M, N,
                static_cast<acc_t>(eps));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    });
    return {y, rstd};
}

template <bool kRms>
std::vector<at::Tensor> norm_bwd(const char* op, const at::Tensor& dy, const at::Tensor& y, const at::Tensor& rstd,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                 bool clamp_gamma) {
    check_cuda(op, y);
    check_cuda(op, dy);
    check_cuda(op, rstd);
    norm_host::check_saved(op, dy, y, rstd);
    norm_host::check_norm_args(op, y, weight, bias);
    const c10::cuda::CUDAGuard guard(y.device());
    const norm_host::Rows rows = norm_host::rows_of(y);
    const int64_t M = rows.M, N = rows.N;
    auto dx = empty_output(y);
    auto dweight = norm_host::param_grad_like(weight);
    auto dbias = norm_host::param_grad_like(bias);
    const bool mixed = norm_host::param_dtype(y, weight, bias) != y.scalar_type();
    const bool vectorised = N % vec_width(y) == 0 && aligned16(dy.data_ptr()) && aligned16(y.data_ptr()) &&
                            aligned16(dx.data_ptr());
    const bool cached = rows_cached(y, vectorised, row_capacity(kBwdThreads, kBwdItems));
    const RowChunks chunks = cached ? row_chunks(M, kMaxCachedChunks, kMinCachedChunkRows)
                                    : row_chunks(M, kMaxChunks, kMinChunkRows);
    auto dweight_part = dweight.defined() ? at::empty({chunks.count, N}, rstd.options()) : at::Tensor();
    auto dbias_part = dbias.defined() ? at::empty({chunks.count, N}, rstd.options()) : at::Tensor();
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "tempo_norm_bwd", [&] {
        using acc_t = typename norm_acc_type<scalar_t>::type;
        with_param_and_vec<scalar_t>(mixed, vectorised, [&](auto param_tag, auto vec_tag) {
            using param_t = decltype(param_tag);
            constexpr int VEC = decltype(vec_tag)::value;
            const param_t* gamma = norm_host::data_or_null<param_t>(weight);
            const param_t* beta = norm_host::data_or_null<param_t>(bias);
            acc_t* gamma_part = dweight.defined() ? dweight_part.data_ptr<acc_t>() : nullptr;
            acc_t* beta_part = dbias.defined() ? dbias_part.data_ptr<acc_t>() : nullptr;
            bool rows_done = false;  // by the register-held kernel, partials included
            if constexpr (VEC > 1 && !std::is_same_v<scalar_t, double>) {
                if (cached && M > 0) {
                    with_row_threads<kBwdThreads, kBwdItems>(N / VEC, [&](auto threads_tag) {
                        constexpr int THREADS = decltype(threads_tag)::value;
                        norm_bwd_kernel<kRms, VEC, kBwdItems, THREADS>
                            <<<static_cast<unsigned>(chunks.count), THREADS, 0, stream>>>(
                                dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(), gamma,
                                beta, dx.data_ptr<scalar_t>(), gamma_part, beta_part, M, N, chunks.rows,
                                params_aligned<param_t, VEC>(gamma, beta), clamp_gamma);
                        C10_CUDA_KERNEL_LAUNCH_CHECK();
                    });
                    rows_done = true;
                }
            }
            if (!rows_done && M > 0) {
                norm_bwd_streaming_kernel<kRms, VEC><<<row_blocks(M), row_threads(N, VEC), 0, stream>>>(
                    dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(), gamma, beta,
                    dx.data_ptr<scalar_t>(), M, N, clamp_gamma);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
                if (gamma_part != nullptr || beta_part != nullptr) {
                    const dim3 grid(static_cast<unsigned>((N + kColTile - 1) / kColTile),
                                    static_cast<unsigned>(chunks.count));
                    norm_param_grad_partial_kernel<<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
                        dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), gamma, beta, gamma_part, beta_part, M, N,
                        chunks.rows, clamp_gamma);
                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                }
            }
            const unsigned sum_blocks = static_cast<unsigned>((N + kColTile - 1) / kColTile);
            if (dweight.defined()) {
                column_sum_kernel<<<sum_blocks, dim3(kColTile, kSumLanes), 0, stream>>>(
                    gamma_part, dweight.data_ptr<param_t>(), chunks.count, N);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
            if (dbias.defined()) {
                column_sum_kernel<<<sum_blocks, dim3(kColTile, kSumLanes), 0, stream>>>(
                    beta_part, dbias.data_ptr<param_t>(), chunks.count, N);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
        });
    });
    return {dx, dweight, dbias};
}

}  // namespace

TEMPO_NORM_DEFINE_ENTRY_POINTS()

}  // namespace cuda
}  // namespace tempo
