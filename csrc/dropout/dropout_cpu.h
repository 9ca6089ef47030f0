// The flat dropout loop of the CPU kernels (dropout_cpu.cpp, softmax_dropout_cpu.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

#include "tempo/philox.h"

namespace tempo {
namespace cpu {

// Philox groups (of four elements) per at::parallel_for task.
constexpr int64_t kGroupGrain = 4096;

// f(i, kept) for every element i < n, in parallel over whole Philox groups.
template <typename F>
void parallel_for_each_keep(int64_t n, const DropoutParams& d, const F& f) {
    at::parallel_for(0, (n + 3) / 4, kGroupGrain, [&](int64_t begin, int64_t end) {
        for_each_keep(d, 4 * begin, std::min(4 * end, n), f);
    });
}

// f(i, m) for every element i < n, in parallel: m = scale where the mask of d keeps element i,
// else 0. A multiplier rather than a select, so that NaN/Inf propagate as in torch's dropout.
template <typename acc_t, typename F>
void for_each_multiplier(int64_t n, const DropoutParams& d, const F& f) {
    const acc_t scale = static_cast<acc_t>(d.scale);
    parallel_for_each_keep(n, d, [&](int64_t i, bool kept) { f(i, kept ? scale : acc_t(0)); });
}

}  // namespace cpu
}  // namespace tempo
