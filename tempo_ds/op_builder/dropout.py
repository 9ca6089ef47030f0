"""The dropout op family: seeded dropout, bias-dropout-add and attention softmax-dropout, all of
which keep a 64-bit seed for backward instead of a mask."""
from .builder import TempoCPUOpBuilder, TempoCUDAOpBuilder, csrc_path


class DropoutCPUBuilder(TempoCPUOpBuilder):
    FAMILY = "dropout"
    BUILD_VAR = "TEMPO_BUILD_DROPOUT"
    NAME = "tempo_dropout_cpu"

    def sources(self):
        return [
            csrc_path("dropout", "dropout_cpu.cpp"),
            csrc_path("dropout", "softmax_dropout_cpu.cpp"),
            csrc_path("dropout", "bindings_cpu.cpp"),
        ]


class DropoutCUDABuilder(TempoCUDAOpBuilder):
    FAMILY = "dropout"
    BUILD_VAR = "TEMPO_BUILD_DROPOUT"
    NAME = "tempo_dropout_cuda"

    def sources(self):
        return [
            csrc_path("dropout", "dropout_cuda.cu"),
            csrc_path("dropout", "softmax_dropout_cuda.cu"),
            csrc_path("dropout", "bindings_cuda.cpp"),
        ]
