// In-place GELU on CPU: the same per-element math as gelu_cuda.cu (tempo/gelu.h), OpenMP loops
// through at::parallel_for. One work item is one byte of branch bits = 8 elements.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "tempo/core_ops.h"
#include "tempo/gelu.h"

namespace tempo {
namespace cpu {
namespace {

// Bias: NoBias (GELU) or ColumnBias<scalar_t> (the fused bias-GELU), tempo/gelu.h.
template <typename Form, typename Bias, typename scalar_t>
void gelu_fwd_kernel(const scalar_t* x, Bias bias, scalar_t* y, uint8_t* bits, int64_t n) {
    using acc_t = typename compute_type<scalar_t>::type;
    const int64_t n_bytes = (n + 7) / 8;
    at::parallel_for(0, n_bytes, 2048, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
            uint8_t packed = 0;
            const int64_t base = b * 8;
            const int64_t c0 = bias.first_column(base);
            for (int k = 0; k < 8 && base + k < n; ++k) {
                const acc_t v = bias.add(static_cast<acc_t>(x[base + k]), c0, k);
                y[base + k] = static_cast<scalar_t>(gelu_value_and_bit<Form>(v, packed, k));
            }
            bits[b] = packed;
        }
    });
}

// The forward of gelu_fwd and bias_gelu_fwd; make_bias(scalar_t) gives the kernel's Bias.
template <typename MakeBias>
std::vector<at::Tensor> launch_fwd(const at::Tensor& x, bool tanh_form, const MakeBias& make_bias) {
    auto y = empty_output(x);
    auto bits = at::empty({(x.numel() + 7) / 8}, x.options().dtype(at::kByte));
    if (x.numel() == 0) return {y, bits};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gelu_fwd", [&] {
        const auto bias = make_bias(scalar_t{});
        if (tanh_form)
            gelu_fwd_kernel<GeluTanh>(x.data_ptr<scalar_t>(), bias, y.data_ptr<scalar_t>(),
                                      bits.data_ptr<uint8_t>(), x.numel());
        else
            gelu_fwd_kernel<GeluErf>(x.data_ptr<scalar_t>(), bias, y.data_ptr<scalar_t>(),
                                     bits.data_ptr<uint8_t>(), x.numel());
    });
    return {y, bits};
}

// GELU'(x) of the `count` (<= 8) elements of one byte of branch bits, into d.
// A derivative table gathers element by element.
template <typename Derivative, typename scalar_t, typename acc_t>
void byte_derivatives(Derivative derivative, const scalar_t* y, uint8_t packed, int count, acc_t* d) {
    for (int k = 0; k < count; ++k) d[k] = derivative(y[k], (packed >> k) & 1);
}

// Newton's inversion runs its steps on the byte's elements in lockstep: one element's steps form a
// chain of dependent operations (libm calls, a sqrt, divisions) that the core would otherwise run
// one after the other; eight independent chains overlap. Each element takes exactly the operations
// of gelu_derivative_from_output, as on the GPU.
template <typename Form, typename scalar_t, typename acc_t>
void byte_derivatives(NewtonDerivative<Form>, const scalar_t* y, uint8_t packed, int count, acc_t* d) {
    GeluInversion<Form, acc_t> inversions[8];
    for (int k = 0; k < count; ++k)
        inversions[k] = GeluInversion<Form, acc_t>(static_cast<acc_t>(y[k]), (packed >> k) & 1);
    for (int i = 0; i < gelu_newton_steps<acc_t>(); ++i) {
        for (int k = 0; k < count; ++k) inversions[k].step();
    }
    for (int k = 0; k < count; ++k) d[k] = inversions[k].derivative();
}

// Derivative: NewtonDerivative<Form> or TableDerivative (tempo/gelu.h).
template <typename Derivative, typename scalar_t>
void gelu_bwd_kernel(Derivative derivative, const scalar_t* dy, const scalar_t* y,
                     const uint8_t* bits, scalar_t* dx, int64_t n) {
    using acc_t = typename compute_type<scalar_t>::type;
    const int64_t n_bytes = (n + 7) / 8;
    at::parallel_for(0, n_bytes, 512, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
            const int64_t base = b * 8;
            const int count = static_cast<int>(std::min<int64_t>(8, n - base));
            acc_t d[8];
            byte_derivatives(derivative, y + base, bits[b], count, d);
            for (int k = 0; k < count; ++k)
                dx[base + k] = static_cast<scalar_t>(static_cast<acc_t>(dy[base + k]) * d[k]);
        }
    });
}

}  // namespace

std::vector<at::Tensor> gelu_fwd(const at::Tensor& x, bool tanh_form) {
    TORCH_CHECK(x.is_cpu() && x.is_contiguous(), "gelu_fwd: x must be a contiguous CPU tensor");
    return launch_fwd(x, tanh_form, [](auto) { return NoBias{}; });
}

std::vector<at::Tensor> bias_gelu_fwd(const at::Tensor& x, const at::Tensor& bias, bool tanh_form) {
    TORCH_CHECK(x.is_cpu(), "bias_gelu_fwd: x must be a CPU tensor");
    check_bias_gelu_args(x, bias);
    return launch_fwd(x, tanh_form, [&](auto zero) {
        using scalar_t = decltype(zero);
        return ColumnBias<scalar_t>{bias.data_ptr<scalar_t>(), bias.numel()};
    });
}

at::Tensor gelu_bwd(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& bits, bool tanh_form) {
    TORCH_CHECK(y.is_cpu(), "gelu_bwd: inputs must be CPU tensors");  // the others: on y's device
    check_gelu_bwd_args(dy, y, bits);
    auto dx = empty_output(y);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "gelu_bwd", [&] {
        if (tanh_form)
            gelu_bwd_kernel(NewtonDerivative<GeluTanh>{}, dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                            bits.data_ptr<uint8_t>(), dx.data_ptr<scalar_t>(), y.numel());
        else
            gelu_bwd_kernel(NewtonDerivative<GeluErf>{}, dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                            bits.data_ptr<uint8_t>(), dx.data_ptr<scalar_t>(), y.numel());
    });
    return dx;
}

at::Tensor gelu_bwd_table(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& bits,
                          const at::Tensor& table) {
    TORCH_CHECK(y.is_cpu(), "gelu_bwd_table: inputs must be CPU tensors");  // the others: on y's device
    check_gelu_bwd_args(dy, y, bits);
    check_gelu_table(table, y);
    auto dx = empty_output(y);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(y.scalar_type(), "gelu_bwd_table", [&] {
        gelu_bwd_kernel(TableDerivative{table.data_ptr<float>()}, dy.data_ptr<scalar_t>(),
                        y.data_ptr<scalar_t>(), bits.data_ptr<uint8_t>(), dx.data_ptr<scalar_t>(),
                        y.numel());
    });
    return dx;
}

}  // namespace cpu
}  // namespace tempo
