// Python binding of the core op family, CUDA build.
#include "tempo/binding.h"
#include "tempo/core_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    tempo::bind_common(m);
    m.def("gelu_fwd", &tempo::cuda::gelu_fwd, "In-place GELU forward: (y, packed branch bits)");
    m.def("bias_gelu_fwd", &tempo::cuda::bias_gelu_fwd, "Fused bias-GELU forward: (GELU(x + bias), packed branch bits)");
    m.def("gelu_bwd", &tempo::cuda::gelu_bwd, "In-place GELU backward from (dy, y, bits)");
    m.def("gelu_bwd_table", &tempo::cuda::gelu_bwd_table, "In-place GELU backward of fp16/bf16 y from a derivative table");
    m.def("layer_norm_fwd", &tempo::cuda::layer_norm_fwd, "Output-saving LayerNorm forward: (y, rstd)");
    m.def("layer_norm_bwd", &tempo::cuda::layer_norm_bwd, "LayerNorm backward from (dy, y, rstd): (dx, dweight, dbias)");
    m.def("rms_norm_fwd", &tempo::cuda::rms_norm_fwd, "Output-saving RMSNorm forward: (y, rstd)");
    m.def("rms_norm_bwd", &tempo::cuda::rms_norm_bwd, "RMSNorm backward from (dy, y, rstd): (dx, dweight)");
}
