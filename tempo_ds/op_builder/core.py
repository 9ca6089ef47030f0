"""The core op family: in-place GELU, output-saving LayerNorm and RMSNorm."""
from .builder import TempoCPUOpBuilder, TempoCUDAOpBuilder, csrc_path


class CoreCPUBuilder(TempoCPUOpBuilder):
    FAMILY = "core"
    BUILD_VAR = "TEMPO_BUILD_CORE"
    NAME = "tempo_core_cpu"

    def sources(self):
        return [
            csrc_path("gelu", "gelu_cpu.cpp"),
            csrc_path("norm", "layer_norm_cpu.cpp"),
            csrc_path("core", "bindings_cpu.cpp"),
        ]


class CoreCUDABuilder(TempoCUDAOpBuilder):
    FAMILY = "core"
    BUILD_VAR = "TEMPO_BUILD_CORE"
    NAME = "tempo_core_cuda"

    def sources(self):
        return [
            csrc_path("gelu", "gelu_cuda.cu"),
            csrc_path("norm", "layer_norm_cuda.cu"),
            csrc_path("core", "bindings_cuda.cpp"),
        ]
