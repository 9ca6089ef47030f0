"""The loss op family: the elementwise steps of the fused linear cross-entropy (per-row softmax
statistics of a logits chunk, and the chunk turned into its gradient in place)."""
from .builder import TempoCPUOpBuilder, TempoCUDAOpBuilder, csrc_path


class LossCPUBuilder(TempoCPUOpBuilder):
    FAMILY = "loss"
    BUILD_VAR = "TEMPO_BUILD_LOSS"
    NAME = "tempo_loss_cpu"

    def sources(self):
        return [csrc_path("loss", "cross_entropy_cpu.cpp"), csrc_path("loss", "bindings_cpu.cpp")]


class LossCUDABuilder(TempoCUDAOpBuilder):
    FAMILY = "loss"
    BUILD_VAR = "TEMPO_BUILD_LOSS"
    NAME = "tempo_loss_cuda"

    def sources(self):
        return [csrc_path("loss", "cross_entropy_cuda.cu"), csrc_path("loss", "bindings_cuda.cpp")]
