// Python binding of the dropout op family, CUDA build.
#include "tempo/binding.h"
#include "tempo/dropout_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    tempo::bind_common(m);
    m.def("dropout_fwd", &tempo::cuda::dropout_fwd, "Seeded dropout; with the same seed also its backward");
    m.def("dropout_mask", &tempo::cuda::dropout_mask, "The keep mask of a seed (debugging)");
    m.def("dropout_mask_block", &tempo::cuda::dropout_mask_block, "The keep mask of a strided block of a tensor");
    m.def("bias_dropout_add_fwd", &tempo::cuda::bias_dropout_add_fwd, "residual + dropout(x + bias)");
    m.def("softmax_dropout_fwd", &tempo::cuda::softmax_dropout_fwd, "Scale-mask-softmax and dropout: (probs, dropped)");
    m.def("softmax_dropout_regen", &tempo::cuda::softmax_dropout_regen, "dropout(probs) regenerated from the seed");
    m.def("softmax_dropout_bwd", &tempo::cuda::softmax_dropout_bwd, "Softmax backward through regenerated dropout");
}
