// Python binding of the loss op family, CPU build.
#include "tempo/binding.h"
#include "tempo/loss_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    tempo::bind_common(m);
    m.def("cross_entropy_fwd", &tempo::cpu::cross_entropy_fwd, "Per-row softmax statistics of a logits chunk");
    m.def("cross_entropy_bwd", &tempo::cpu::cross_entropy_bwd, "A logits chunk becomes its gradient in place");
}
