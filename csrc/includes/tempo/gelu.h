// In-place GELU math, shared by gelu_cpu.cpp and gelu_cuda.cu.
//
// Stock GELU keeps its input x (n elements) for backward. Tempo keeps its output y, which the next
// linear layer keeps anyway, plus one branch bit per element (n/8 bytes): for y in (y_min, 0) there
// are two x with GELU(x) = y, and the bit says whether x lies left of the minimum x*.
// The derivative is exact: x is recovered from (y, bit) by Newton's method, then GELU'(x) is
// evaluated in closed form. No polynomial fit.
//
// Newton runs in coordinates in which the equation is well conditioned:
//   near the minimum and on the right branch: s(x) = sqrt(GELU(x) - y_min), which is close to
//   linear in x around x* (GELU'(x*) = 0 makes the plain equation singular there);
//   on the far left tail (y close to 0 from below): log(-GELU(x)), close to quadratic in x.
#pragma once

#include "tempo/common.h"

namespace tempo {

// Phi(-u) for u >= 0 in fp32 arithmetic, the left tail of the standard normal CDF:
//   Phi(-u) = t 2^(P(t) - u^2 log2(e) / 2),  t = 1 / (1 + B u),
// with P of degree 8 fitted to the exact tail on u in [0, 10 sqrt 2] (normal_tail_fit.py beside
// this file derives the constants; beyond that range Phi(-u) underflows in fp32).
// Relative error against float64: 1e-7 for the fit with fp32 coefficients; about 1e-6 after fp32
// evaluation, up to 5e-6 where Phi nears fp32's smallest normal (the rounding of u^2). erfcf's
// bound is 4 ulp (5e-7).
// Cost: a reciprocal, 8 FMAs and one exp2, about half of erfcf (GELU's value: 27 against 51 sm_90
// instructions); with erfcf the erf forward was compute-bound on an H100.
// For the fp32 math of 16-bit tensors, whose outputs round at 2^-9 (bf16) or 2^-12 (fp16)
// relative; fp64 math (fp32 tensors) keeps libm's erfc.
TEMPO_HD float normal_tail(float u) {
    constexpr float kB = 2.757716447e-01f;
    constexpr float kP[] = {-3.184494019e+00f, 1.449251652e+00f, 5.491748452e-01f,
                            5.916781425e-01f,  -1.008999467e+00f, 2.055030346e+00f,
                            -2.660578966e+00f, 1.538408756e+00f,  -3.294713199e-01f};
    const float t = t_rcp_approx(t_fma(kB, u, 1.0f));
    float p = kP[8];
#pragma unroll
    for (int k = 7; k >= 0; --k) p = t_fma(p, t, kP[k]);
    // -u^2 log2(e) / 2 + P(t)
    return t * t_exp2(t_fma(u * -0.72134752044448170368f, u, p));
}

// Phi(x), the standard normal CDF, keeping the left tail's relative precision (no cancellation in
// 1 + erf(x / sqrt 2) for x << 0).
TEMPO_HD float normal_cdf(float x) {
    const float tail = normal_tail(t_fabs(x));
    return t_select(x < 0.0f, tail, 1.0f - tail);
}
TEMPO_HD double normal_cdf(double x) { return 0.5 * t_erfc(-x * 0.70710678118654752440); }

// Both forms are GELU(x) = x * c(x), c = Phi(x) or sigmoid(2u). A form gives c (factor) and GELU'
// from x and c (derivative_from); value, derivative, and the pair each Newton step needs from one
// evaluation of c, follow here.
template <typename Form>
struct GeluForm {
    template <typename T>
    static TEMPO_HD T value(T x) {
        return x * Form::factor(x);
    }
    template <typename T>
    static TEMPO_HD T derivative(T x) {
        return Form::derivative_from(x, Form::factor(x));
    }
    template <typename T>
    static TEMPO_HD void value_and_derivative(T x, T& value, T& prime) {
        const T c = Form::factor(x);
        value = x * c;
        prime = Form::derivative_from(x, c);
    }
};

// GELU(x) = x * Phi(x).
struct GeluErf : GeluForm<GeluErf> {
    // argmin, min and second derivative at the minimum (computed in float64, see docs/gelu.md)
    static constexpr double x_star = -0.75179152469356436;
    static constexpr double y_min = -0.16997120747990369;
    static constexpr double curvature = 0.43149399232833563;

    template <typename T>
    static TEMPO_HD T factor(T x) {
        return normal_cdf(x);
    }
    // Phi(x) + x pdf(x)
    template <typename T>
    static TEMPO_HD T derivative_from(T x, T cdf) {
        const T pdf = T(0.39894228040143267794) * t_exp(T(-0.5) * x * x);
        return cdf + x * pdf;
    }
    // Start for the left tail: x ~ -sqrt(-2 log(-y) - log(2 pi)) since GELU(x) ~ -pdf(x) there.
    template <typename T>
    static TEMPO_HD T tail_start(T log_neg_y) {
        return -t_sqrt(t_fmax(T(-2) * log_neg_y - T(1.83787706640934548356), T(0)));
    }
};

// tanh form used by GPT-2 and Megatron's openai_gelu:
// 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
// The sigmoid form avoids the cancellation 1 + tanh(u) for u << 0.
struct GeluTanh : GeluForm<GeluTanh> {
    static constexpr double x_star = -0.75246142207101630;
    static constexpr double y_min = -0.17004075057125403;
    static constexpr double curvature = 0.43040009102485854;

    // sigmoid(2u) from e = 2^(-|a|), a = 2u log2(e) = x (k + k 0.044715 x^2): 1 / (1 + e) for a >= 0,
    // e / (1 + e) below. e never overflows, so the far left tail keeps its relative precision down
    // to bf16's smallest subnormal.
    template <typename T>
    static TEMPO_HD T sigmoid_2u(T x) {
        constexpr double k = 2 * 0.79788456080286535588 * 1.44269504088896340736;
        const T a = x * (T(k) + T(k * 0.044715) * x * x);
        const T e = t_exp2(-t_fabs(a));
        const T r = t_rcp_approx(T(1) + e);
        return t_select(a >= T(0), r, e * r);
    }
    template <typename T>
    static TEMPO_HD T factor(T x) {
        return sigmoid_2u(x);
    }
    // s + x s (1 - s) 2 du/dx, s = sigmoid(2u)
    template <typename T>
    static TEMPO_HD T derivative_from(T x, T s) {
        const T du = T(0.79788456080286535588) * (T(1) + T(3 * 0.044715) * x * x);
        return s + x * s * (T(1) - s) * T(2) * du;
    }
    // Left tail: log(-y) ~ log(-x) + 2u ~ 2 sqrt(2/pi) 0.044715 x^3 for large -x.
    template <typename T>
    static TEMPO_HD T tail_start(T log_neg_y) {
        const T cube = log_neg_y / T(2 * 0.79788456080286535588 * 0.044715);
        // cube < 0 on the tail; cbrt of a negative number
        return -t_exp(t_log(-t_fmin(cube, T(-1e-30))) / T(3));
    }
};

// The GELU forward per element of v (the input, plus the bias where fused), in the compute type,
// with its branch bit set at bit k of `packed`.
template <typename Form, typename acc_t>
TEMPO_HD acc_t gelu_value_and_bit(acc_t v, uint8_t& packed, int k) {
    packed |= static_cast<uint8_t>(v < acc_t(Form::x_star)) << k;
    return Form::value(v);
}

// What the forward adds to element base + k before the GELU; the kernels take one of these.
// Per pack of 8 elements, first_column(base) is computed once and add(v, c0, k) per element.
struct NoBias {
    TEMPO_HD int64_t first_column(int64_t) const { return 0; }
    template <typename acc_t>
    TEMPO_HD acc_t add(acc_t v, int64_t, int) const { return v; }
};

// The fused bias-GELU: x is [rows, features] row-major and bias [features]. The sum is taken in
// the compute type (never rounded to the storage type). Against bias-add then GELU this saves
// the write and the read of x + b: 2 x sizeof(T) bytes per element of the 4h intermediate. The
// backward is the GELU's own (the bit and y are all it needs); dbias is the column sum of dx.
template <typename scalar_t>
struct ColumnBias {
    const scalar_t* bias;
    int64_t features;

    TEMPO_HD int64_t first_column(int64_t base) const { return base % features; }
    // column c0 + k, wrapped: one subtraction when features >= 8 (the usual case), a modulo below
    template <typename acc_t>
    TEMPO_HD acc_t add(acc_t v, int64_t c0, int k) const {
        int64_t c = c0 + k;
        if (c >= features) c = features >= 8 ? c - features : c % features;
        return v + static_cast<acc_t>(bias[c]);
    }
};

// Number of Newton steps: enough to reach the accuracy floor set by the rounding of y. With fp32
// math (16-bit storage) that floor is reached in 3 steps, with fp64 math (fp32 storage) in 5
// (tests/test_gelu.py::test_backward_matches_exact_output_based_gradient holds each dtype to it).
// Each step costs one GELU'(x) with GELU(x) beside it (one erfc and one exp, or one sigmoid), a
// sqrt (a log on the tail) and a division, so the count sets the backward's cost.
template <typename T>
constexpr int gelu_newton_steps() { return sizeof(T) >= 8 ? 5 : 3; }

// Within this distance of x*, the slope of x(s) is taken as its limit (see the Newton step).
constexpr double kGeluNearMinimum = 1e-3;

// Below this y (on the left branch) the log coordinates converge faster than the sqrt ones.
constexpr double kGeluTailThreshold = -0.05;

// Newton's inversion of GELU(x) = y on the branch given by `left` (x < x*), one step at a time.
// gelu_derivative_from_output below runs it for one element; the CPU kernel runs the steps of a
// byte's 8 elements in lockstep (gelu_cpu.cpp), so that their independent chains of dependent
// operations overlap. Both take the same operations in the same order on each element.
template <typename Form, typename T>
struct GeluInversion {
    T y = T(0);
    T x = T(0);          // the current iterate
    T target = T(0);     // sqrt(y - y_min), the goal of the sqrt coordinates
    T log_neg_y = T(0);  // log(-y), the goal of the log coordinates (tail only)
    bool left = false;
    bool tail = false;
    bool running = false;  // false once a step was not taken: no further step is either

    // an inversion with nothing to do (a placeholder in an array)
    GeluInversion() = default;

    TEMPO_HD GeluInversion(T y_, bool left_) : y(y_), left(left_) {
        const T y_min = T(Form::y_min);
        const T x_star = T(Form::x_star);
        tail = left && y > T(kGeluTailThreshold);
        // NaN / Inf, or GELU underflowed on the tail: derivative() needs no x
        running = t_isfinite(y) && !underflowed();
        if (!running) {
            x = y;
            return;
        }
        target = t_sqrt(t_fmax(y - y_min, T(0)));
        if (left) {
            x = x_star - spread() * target;
            if (tail) {
                log_neg_y = t_log(-y);
                x = t_fmin(x, Form::tail_start(log_neg_y));
            }
        } else {
            // on the right branch x >= y when y > 0 (Phi < 1), and the quadratic model starts left of it
            x = t_fmax(x_star + spread() * target, y);
        }
    }

    // GELU underflowed to 0 (or rounded above it) on the tail: x is so negative that GELU'(x) ~ 0
    TEMPO_HD bool underflowed() const { return tail && !(y < T(0)); }

    // dx ~ sqrt(2 / curvature) * sqrt(y - y_min) near the minimum
    static TEMPO_HD T spread() { return T(1.0) / t_sqrt(T(0.5) * T(Form::curvature)); }

    // One Newton step from x; returns running (false: this step and all later ones not taken).
    TEMPO_HD bool step() {
        if (!running) return false;
        const T x_star = T(Form::x_star);
        T g, d;
        Form::value_and_derivative(x, g, d);
        T dx;
        if (tail) {
            if (!(g < T(0))) return running = false;
            dx = (t_log(-g) - log_neg_y) * g / d;
        } else {
            const T r = t_sqrt(t_fmax(g - T(Form::y_min), T(0)));
            // dx/ds = 2 r / GELU'(x) tends to -+spread at x*, where both r and GELU' vanish and
            // their computed ratio is rounding noise: use the limit there.
            const T slope = t_fabs(x - x_star) < T(kGeluNearMinimum) ? (left ? -spread() : spread())
                                                                     : T(2) * r / d;
            dx = (r - target) * slope;
        }
        if (!t_isfinite(dx)) return running = false;
        x -= dx;
        // stay on the branch: Newton from the outside of a convex well can overshoot x*
        x = left ? t_fmin(x, x_star) : t_fmax(x, x_star);
        return true;
    }

    // GELU'(x) at the last iterate. A non-finite output gives the derivative of itself (NaN / Inf
    // propagate).
    TEMPO_HD T derivative() const {
        if (!t_isfinite(y)) return Form::derivative(y);
        if (underflowed()) return T(0);
        return Form::derivative(x);
    }
};

// GELU'(x) for the x with GELU(x) = y on the branch given by `left` (x < x*).
template <typename Form, typename T>
TEMPO_HD T gelu_derivative_from_output(T y, bool left) {
    GeluInversion<Form, T> inversion(y, left);
#pragma unroll
    for (int i = 0; i < gelu_newton_steps<T>(); ++i) {
        if (!inversion.step()) break;
    }
    return inversion.derivative();
}

// How a backward kernel obtains GELU'(x) for a stored (y, branch bit); both return it in the
// compute type of the storage.
//
// Newton: the inversion above, for any storage type.
template <typename Form>
struct NewtonDerivative {
    template <typename scalar_t>
    TEMPO_HD typename compute_type<scalar_t>::type operator()(scalar_t y, bool left) const {
        using acc_t = typename compute_type<scalar_t>::type;
        return gelu_derivative_from_output<Form>(static_cast<acc_t>(y), left);
    }
};

// Table, for 16-bit storage (c10::Half, c10::BFloat16): y then takes at most 2^16 values, so
// GELU'(x(y, bit)) is a table of 2 x 2^16 floats (512 KiB), filled once per device, form and dtype
// by the float64 Newton path (tempo_ds/ops/gelu.py). The backward becomes one gather per element,
// and each entry is the float64 output-based derivative rounded once to float32.
constexpr int kGeluTableColumns = 1 << 16;

struct TableDerivative {
    const float* table;  // [2][kGeluTableColumns]: row = branch bit, column = the 16 bits of y

    template <typename scalar_t>
    TEMPO_HD float operator()(scalar_t y, bool left) const {
        const uint32_t i = static_cast<uint32_t>(left) * kGeluTableColumns + static_cast<uint32_t>(y.x);
#if defined(__CUDA_ARCH__)
        return __ldg(table + i);
#else
        return table[i];
#endif
    }
};

}  // namespace tempo
