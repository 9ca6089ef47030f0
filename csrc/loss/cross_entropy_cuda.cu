// The elementwise steps of the fused linear cross-entropy on CUDA (math: tempo/cross_entropy.h).
//
// Bytes: stock Megatron keeps the fp32 softmax of the logits, 4 V bytes per token (201 KiB at
// V = 50,304); the fused op keeps lse, 4 bytes per token, and recomputes a chunk's logits in
// backward, which these kernels turn into their gradient in place (no second [rows, V] buffer).
// Offsets are int64; each kernel reads a row of the chunk once (16-byte vector loads where the
// row length and the pointer allow).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "tempo/cross_entropy.h"
#include "tempo/loss_ops.h"

namespace tempo {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
struct alignas(16) Vec {
    static constexpr int kSize = 16 / sizeof(scalar_t);
    scalar_t v[kSize];
};

template <typename acc_t, typename sum_t>
struct RowSums {
    SoftmaxStats<acc_t, sum_t> s;
    sum_t total = sum_t(0);
};

// Merges the partial statistics of all threads of the block; thread 0 gets the row's.
template <typename acc_t, typename sum_t>
__device__ RowSums<acc_t, sum_t> block_merge(RowSums<acc_t, sum_t> mine) {
    __shared__ acc_t sh_max[kThreads / 32];
    __shared__ sum_t sh_sum[kThreads / 32], sh_total[kThreads / 32];
    for (int offset = 16; offset > 0; offset /= 2) {
        const acc_t m = __shfl_down_sync(0xffffffffu, mine.s.max, offset);
        const sum_t s = __shfl_down_sync(0xffffffffu, mine.s.sum, offset);
        mine.total += __shfl_down_sync(0xffffffffu, mine.total, offset);
        mine.s.merge(m, s);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        sh_max[warp] = mine.s.max;
        sh_sum[warp] = mine.s.sum;
        sh_total[warp] = mine.total;
    }
    __syncthreads();
    RowSums<acc_t, sum_t> row;
    if (threadIdx.x == 0) {
        for (int w = 0; w < kThreads / 32; ++w) {
            row.s.merge(sh_max[w], sh_sum[w]);
            row.total += sh_total[w];
        }
    }
    return row;
}

// One block per row. kVector: every row starts 16-byte aligned and V is a multiple of the vector.
template <bool kVector, typename scalar_t, typename acc_t, typename sum_t = typename ce_sum_type<scalar_t>::type>
__global__ void cross_entropy_fwd_kernel(const scalar_t* __restrict__ logits,  // [rows, V]
                                         const int64_t* __restrict__ target,   // [rows]
                                         acc_t* __restrict__ stats,            // [4, rows]
                                         int64_t rows, int64_t vocab) {
    const int64_t r = blockIdx.x;
    const scalar_t* row = logits + r * vocab;
    RowSums<acc_t, sum_t> mine;
    if constexpr (kVector) {
        constexpr int N = Vec<scalar_t>::kSize;
        const auto* vrow = reinterpret_cast<const Vec<scalar_t>*>(row);
        for (int64_t j = threadIdx.x; j < vocab / N; j += kThreads) {
            const Vec<scalar_t> v = vrow[j];
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const acc_t z = static_cast<acc_t>(v.v[k]);
                mine.s.push(z);
                mine.total += sum_t(z);
            }
        }
    } else {
        for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
            const acc_t z = static_cast<acc_t>(row[j]);
            mine.s.push(z);
            mine.total += sum_t(z);
        }
    }
    const RowSums<acc_t, sum_t> all = block_merge(mine);
    if (threadIdx.x == 0) {
        const int64_t t = target[r];
        stats[r] = all.s.max;
        stats[rows + r] = static_cast<acc_t>(all.s.sum);
        stats[2 * rows + r] = static_cast<acc_t>(all.total);
        stats[3 * rows + r] = t >= 0 && t < vocab ? static_cast<acc_t>(row[t]) : acc_t(0);
    }
}

// blockIdx.x: row; blockIdx.y: a tile of kThreads vectors (or elements) of the row.
template <bool kVector, typename scalar_t, typename acc_t>
__global__ void cross_entropy_bwd_kernel(scalar_t* __restrict__ logits,       // [rows, V], in place
                                         const acc_t* __restrict__ lse,       // [rows]
                                         const acc_t* __restrict__ g,         // [rows]
                                         const int64_t* __restrict__ target,  // [rows]
                                         int64_t vocab, acc_t eps, acc_t z_loss, acc_t inv_vocab) {
    const int64_t r = blockIdx.x;
    scalar_t* row = logits + r * vocab;
    const CrossEntropyGrad<acc_t> grad(lse[r], g[r], eps, z_loss, inv_vocab);
    const int64_t t = target[r];
    const int64_t j = int64_t(blockIdx.y) * kThreads + threadIdx.x;
    if constexpr (kVector) {
        constexpr int N = Vec<scalar_t>::kSize;
        if (j >= vocab / N) return;
        auto* vrow = reinterpret_cast<Vec<scalar_t>*>(row);
        Vec<scalar_t> v = vrow[j];
#pragma unroll
        for (int k = 0; k < N; ++k)
            v.v[k] = static_cast<scalar_t>(grad(static_cast<acc_t>(v.v[k]), j * N + k == t));
        vrow[j] = v;
    } else {
        if (j >= vocab) return;
        row[j] = static_cast<scalar_t>(grad(static_cast<acc_t>(row[j]), j == t));
    }
}

template <typename scalar_t>
bool vectorizable(const at::Tensor& logits) {
    constexpr int N = Vec<scalar_t>::kSize;
    return logits.size(1) % N == 0 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;
}

// launch(std::bool_constant<kVector>): the vector kernels where every row allows them.
template <typename scalar_t, typename Launch>
void with_vector_rows(const at::Tensor& logits, const Launch& launch) {
    if (vectorizable<scalar_t>(logits))
        launch(std::true_type{});
    else
        launch(std::false_type{});
}

}  // namespace

at::Tensor cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target) {
    TORCH_CHECK(logits.is_cuda(), "cross_entropy_fwd: logits must be a CUDA tensor");
    check_ce_fwd_args(logits, target);
    const c10::cuda::CUDAGuard guard(logits.device());
    const int64_t rows = logits.size(0), vocab = logits.size(1);
    auto stats = empty_output({4, rows}, logits.options().dtype(ce_stats_dtype(logits)));
    if (rows == 0) return stats;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fwd", [&] {
        using acc_t = typename ce_acc_type<scalar_t>::type;
        auto launch = [&](auto vector) {
            cross_entropy_fwd_kernel<decltype(vector)::value, scalar_t, acc_t>
                <<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
                    logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(), stats.data_ptr<acc_t>(),
                    rows, vocab);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        with_vector_rows<scalar_t>(logits, launch);
    });
    return stats;
}

at::Tensor cross_entropy_bwd(at::Tensor& logits, const at::Tensor& lse, const at::Tensor& g,
                             const at::Tensor& target, double eps, double z_loss, double inv_vocab) {
    TORCH_CHECK(logits.is_cuda(), "cross_entropy_bwd: logits must be a CUDA tensor");
    check_ce_bwd_args(logits, lse, g, target);
    const c10::cuda::CUDAGuard guard(logits.device());
    const int64_t rows = logits.size(0), vocab = logits.size(1);
    if (rows == 0 || vocab == 0) return logits;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_bwd", [&] {
        using acc_t = typename ce_acc_type<scalar_t>::type;
        auto launch = [&](auto vector) {
            constexpr bool kVector = decltype(vector)::value;
            const int64_t items = kVector ? vocab / Vec<scalar_t>::kSize : vocab;
            const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>((items + kThreads - 1) / kThreads));
            cross_entropy_bwd_kernel<kVector, scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
                logits.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), g.data_ptr<acc_t>(),
                target.data_ptr<int64_t>(), vocab, acc_t(eps), acc_t(z_loss), acc_t(inv_vocab));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        with_vector_rows<scalar_t>(logits, launch);
    });
    return logits;
}

}  // namespace cuda
}  // namespace tempo
