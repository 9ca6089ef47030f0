"""DeepSpeed op builders for every tempo_ds op family, CPU and CUDA."""
from .builder import TempoCPUOpBuilder, TempoCUDAOpBuilder, csrc_path, resolve_cuda_home
from .core import CoreCPUBuilder, CoreCUDABuilder
from .dropout import DropoutCPUBuilder, DropoutCUDABuilder
from .loss import LossCPUBuilder, LossCUDABuilder
from .progress import build_deepspeed_shm_op

# family -> (CPU builder, CUDA builder); later families register here.
FAMILIES = {
    "core": (CoreCPUBuilder, CoreCUDABuilder),
    "dropout": (DropoutCPUBuilder, DropoutCUDABuilder),
    "loss": (LossCPUBuilder, LossCUDABuilder),
}

ALL_BUILDERS = [cls for pair in FAMILIES.values() for cls in pair]

__all__ = [
    "ALL_BUILDERS", "FAMILIES", "CoreCPUBuilder", "CoreCUDABuilder", "DropoutCPUBuilder",
    "DropoutCUDABuilder", "LossCPUBuilder", "LossCUDABuilder", "build_deepspeed_shm_op", "TempoCPUOpBuilder",
    "TempoCUDAOpBuilder", "csrc_path",
    "resolve_cuda_home",
]
