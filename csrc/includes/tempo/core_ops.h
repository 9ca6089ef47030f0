// Entry points of the "core" op family (GELU and the norms). The CPU and CUDA builds define the
// same functions in their own namespace; each build's binding file exports one of them.
#pragma once

#include <torch/extension.h>

#include "tempo/alloc.h"

#include <vector>

#define TEMPO_CORE_DECLARE()                                                              \
    /* x: [n] contiguous. Returns {y [n], bits uint8 [ceil(n/8)]}. */                     \
    std::vector<at::Tensor> gelu_fwd(const at::Tensor& x, bool tanh_form);                \
    /* dy, y: [n] contiguous, bits from gelu_fwd. Returns dx [n]. */                      \
    at::Tensor gelu_bwd(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& bits, \
                        bool tanh_form);

namespace tempo {
namespace cpu {
TEMPO_CORE_DECLARE()
}  // namespace cpu
namespace cuda {
TEMPO_CORE_DECLARE()
}  // namespace cuda
}  // namespace tempo
