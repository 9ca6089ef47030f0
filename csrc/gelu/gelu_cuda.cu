// In-place GELU on CUDA.
//
// Bytes kept for backward per element: stock GELU keeps x (sizeof(T)); this keeps 1/8 (one branch
// bit), because the output y it also needs is kept by the next linear layer anyway.
// A thread owns whole bytes of branch bits, i.e. packs of 8 consecutive elements, so the bits are
// written without atomics. Offsets are int64: tensors over 2^31 elements are supported.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <initializer_list>
#include <type_traits>

#include "tempo/core_ops.h"
#include "tempo/gelu.h"

namespace tempo {
namespace cuda {
namespace {

// Launch shape, from a sweep on an H100 (docs/gelu.md): 128 threads, two bytes of branch bits
// (packs of 8 elements) per thread, and a grid that covers the tensor, so a thread handles its
// two packs once instead of looping. Both packs' loads are issued before any math.
constexpr int kThreads = 128;
constexpr int kUnroll = 2;

template <typename scalar_t>
struct alignas(sizeof(scalar_t) * 8) Pack8 {
    scalar_t v[8];
};

template <typename scalar_t>
__host__ __device__ __forceinline__ bool pack_aligned(const scalar_t* p) {
    return (reinterpret_cast<uintptr_t>(p) % sizeof(Pack8<scalar_t>)) == 0;
}

// Pack b (elements [8b, 8b + 8)) is one vector access: always in the kWhole kernels, otherwise when
// the pointers are pack-aligned and the pack lies inside the tensor.
template <bool kWhole>
__device__ __forceinline__ bool whole_pack(bool aligned, int64_t b, int64_t n) {
    return kWhole || (aligned && b * 8 + 8 <= n);
}

// Elements [base, base + 8) of p; those at or past n read as zero. `full`: the whole pack is in
// range and p is pack-aligned, so it is one vector load.
template <typename scalar_t>
__device__ __forceinline__ Pack8<scalar_t> load_pack(const scalar_t* p, int64_t base, int64_t n, bool full) {
    if (full) return *reinterpret_cast<const Pack8<scalar_t>*>(p + base);
    Pack8<scalar_t> out;
#pragma unroll
    for (int k = 0; k < 8; ++k) out.v[k] = base + k < n ? p[base + k] : scalar_t(0);
    return out;
}

template <typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack8<scalar_t>& in, int64_t base, int64_t n,
                                           bool full) {
    if (full) {
        *reinterpret_cast<Pack8<scalar_t>*>(p + base) = in;
        return;
    }
#pragma unroll
    for (int k = 0; k < 8; ++k)
        if (base + k < n) p[base + k] = in.v[k];
}

// Thread t of the grid handles bytes b = step + t + u * blockDim.x, u < kUnroll, of each step:
// consecutive threads touch consecutive packs, so every load and store is coalesced.
__device__ __forceinline__ int64_t first_step() { return int64_t(blockIdx.x) * blockDim.x * kUnroll; }
__device__ __forceinline__ int64_t step_stride() { return int64_t(gridDim.x) * blockDim.x * kUnroll; }

// kWhole: n is a multiple of 8 and every pointer is pack-aligned, so every pack is one vector
// access and the partial-pack path is not compiled in (fewer registers, more resident threads).
// Bias: NoBias (GELU) or ColumnBias<scalar_t> (the fused bias-GELU, tempo/gelu.h); its bias row of
// 4h values stays in L1/L2 across the rows a block covers.
template <typename Form, bool kWhole, typename Bias, typename scalar_t>
__global__ void gelu_fwd_kernel(const scalar_t* __restrict__ x,  // [n]
                                Bias bias,
                                scalar_t* __restrict__ y,        // [n]
                                uint8_t* __restrict__ bits,      // [ceil(n/8)]
                                int64_t n) {
    using acc_t = typename compute_type<scalar_t>::type;
    const int64_t n_bytes = (n + 7) / 8;
    const bool aligned = pack_aligned(x) && pack_aligned(y);
    for (int64_t step = first_step(); step < n_bytes; step += step_stride()) {
        Pack8<scalar_t> in[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int64_t b = step + threadIdx.x + int64_t(u) * blockDim.x;
            if (b < n_bytes) in[u] = load_pack(x, b * 8, n, whole_pack<kWhole>(aligned, b, n));
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int64_t b = step + threadIdx.x + int64_t(u) * blockDim.x;
            if (b >= n_bytes) continue;
            const int64_t c0 = bias.first_column(b * 8);
            Pack8<scalar_t> out;
            uint8_t packed = 0;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const acc_t v = bias.add(static_cast<acc_t>(in[u].v[k]), c0, k);
                out.v[k] = static_cast<scalar_t>(gelu_value_and_bit<Form>(v, packed, k));
            }
            // a partial last pack read zeros past n, whose bits x + bias may set: cleared, so the
            // bits equal the CPU kernel's and the fallback's
            if (!kWhole && b * 8 + 8 > n) packed &= static_cast<uint8_t>((1u << (n - b * 8)) - 1u);
            store_pack(y, out, b * 8, n, whole_pack<kWhole>(aligned, b, n));
            bits[b] = packed;
        }
    }
}

// Derivative: NewtonDerivative<Form> or TableDerivative (tempo/gelu.h); kWhole as above.
template <typename Derivative, bool kWhole, typename scalar_t>
__global__ void gelu_bwd_kernel(Derivative derivative,
                                const scalar_t* __restrict__ dy,   // [n]
                                const scalar_t* __restrict__ y,    // [n]
                                const uint8_t* __restrict__ bits,  // [ceil(n/8)]
                                scalar_t* __restrict__ dx,         // [n]
                                int64_t n) {
    using acc_t = typename compute_type<scalar_t>::type;
    const int64_t n_bytes = (n + 7) / 8;
    const bool aligned = pack_aligned(dy) && pack_aligned(y) && pack_aligned(dx);
    for (int64_t step = first_step(); step < n_bytes; step += step_stride()) {
        Pack8<scalar_t> g[kUnroll], yy[kUnroll];
        uint8_t packed[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int64_t b = step + threadIdx.x + int64_t(u) * blockDim.x;
            if (b >= n_bytes) continue;
            const bool full = whole_pack<kWhole>(aligned, b, n);
            g[u] = load_pack(dy, b * 8, n, full);
            yy[u] = load_pack(y, b * 8, n, full);
            packed[u] = bits[b];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int64_t b = step + threadIdx.x + int64_t(u) * blockDim.x;
            if (b >= n_bytes) continue;
            Pack8<scalar_t> out;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const acc_t d = derivative(yy[u].v[k], (packed[u] >> k) & 1);
                out.v[k] = static_cast<scalar_t>(static_cast<acc_t>(g[u].v[k]) * d);
            }
            store_pack(dx, out, b * 8, n, whole_pack<kWhole>(aligned, b, n));
        }
    }
}

// One block per kThreads * kUnroll bytes of bits; the kernels' loop covers grids capped at the
// CUDA limit (tensors of over 2^40 elements).
unsigned grid_for(int64_t n_bytes) {
    constexpr int64_t kMaxBlocks = (int64_t(1) << 31) - 1;
    const int64_t blocks = (n_bytes + int64_t(kThreads) * kUnroll - 1) / (int64_t(kThreads) * kUnroll);
    return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, kMaxBlocks)));
}

// Calls fn(std::bool_constant<kWhole>): the whole-pack kernels exist for 16-bit storage, the
// memory-bound case; fp32 / fp64 storage is bound by its math and always takes the general path.
template <typename scalar_t, typename Fn>
void with_whole_packs(int64_t n, std::initializer_list<const scalar_t*> pointers, const Fn& fn) {
    if constexpr (sizeof(scalar_t) == 2) {
        bool whole = n % 8 == 0;
        for (const scalar_t* p : pointers) whole = whole && pack_aligned(p);
        if (whole) return fn(std::true_type{});
    }
    fn(std::false_type{});
}

void check_bwd_args(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& bits) {
    TORCH_CHECK(dy.is_cuda() && y.is_cuda() && bits.is_cuda(), "gelu_bwd: inputs must be CUDA tensors");
    check_gelu_bwd_args(dy, y, bits);
}

template <typename Derivative, typename scalar_t>
void launch_bwd(Derivative derivative, const at::Tensor& dy, const at::Tensor& y,
                const at::Tensor& bits, at::Tensor& dx) {
    const int64_t n = y.numel();
    if (n == 0) return;
    with_whole_packs<scalar_t>(n, {dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>()},
                               [&](auto whole) {
        gelu_bwd_kernel<Derivative, decltype(whole)::value>
            <<<grid_for(bits.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                derivative, dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), bits.data_ptr<uint8_t>(),
                dx.data_ptr<scalar_t>(), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
}

// The forward of gelu_fwd and bias_gelu_fwd; make_bias(scalar_t) gives the kernel's Bias.
template <typename MakeBias>
std::vector<at::Tensor> launch_fwd(const at::Tensor& x, bool tanh_form, const MakeBias& make_bias) {
    const c10::cuda::CUDAGuard guard(x.device());
    auto y = empty_output(x);
    const int64_t n = x.numel();
    auto bits = at::empty({(n + 7) / 8}, x.options().dtype(at::kByte));
    if (n == 0) return {y, bits};
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gelu_fwd", [&] {
        const auto bias = make_bias(scalar_t{});
        const unsigned grid = grid_for(bits.numel());
        with_whole_packs<scalar_t>(n, {x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>()}, [&](auto whole) {
            constexpr bool kWhole = decltype(whole)::value;
            if (tanh_form)
                gelu_fwd_kernel<GeluTanh, kWhole><<<grid, kThreads, 0, stream>>>(
                    x.data_ptr<scalar_t>(), bias, y.data_ptr<scalar_t>(), bits.data_ptr<uint8_t>(), n);
            else
                gelu_fwd_kernel<GeluErf, kWhole><<<grid, kThreads, 0, stream>>>(
                    x.data_ptr<scalar_t>(), bias, y.data_ptr<scalar_t>(), bits.data_ptr<uint8_t>(), n);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    });
    return {y, bits};
}

}  // namespace

std::vector<at::Tensor> gelu_fwd(const at::Tensor& x, bool tanh_form) {
    TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "gelu_fwd: x must be a contiguous CUDA tensor");
    return launch_fwd(x, tanh_form, [](auto) { return NoBias{}; });
}

std::vector<at::Tensor> bias_gelu_fwd(const at::Tensor& x, const at::Tensor& bias, bool tanh_form) {
    TORCH_CHECK(x.is_cuda(), "bias_gelu_fwd: x must be a CUDA tensor");
    check_bias_gelu_args(x, bias);
    return launch_fwd(x, tanh_form, [&](auto zero) {
        using scalar_t = decltype(zero);
        return ColumnBias<scalar_t>{bias.data_ptr<scalar_t>(), bias.numel()};
    });
}

at::Tensor gelu_bwd(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& bits, bool tanh_form) {
    check_bwd_args(dy, y, bits);
    const c10::cuda::CUDAGuard guard(y.device());
    auto dx = empty_output(y);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "gelu_bwd", [&] {
        if (tanh_form)
            launch_bwd<NewtonDerivative<GeluTanh>, scalar_t>({}, dy, y, bits, dx);
        else
            launch_bwd<NewtonDerivative<GeluErf>, scalar_t>({}, dy, y, bits, dx);
    });
    return dx;
}

at::Tensor gelu_bwd_table(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& bits,
                          const at::Tensor& table) {
    check_bwd_args(dy, y, bits);
    check_gelu_table(table, y);
    const c10::cuda::CUDAGuard guard(y.device());
    auto dx = empty_output(y);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(y.scalar_type(), "gelu_bwd_table", [&] {
        launch_bwd<TableDerivative, scalar_t>(TableDerivative{table.data_ptr<float>()}, dy, y, bits, dx);
    });
    return dx;
}

}  // namespace cuda
}  // namespace tempo
