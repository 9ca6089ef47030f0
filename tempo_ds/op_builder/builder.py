"""DeepSpeed op builders for tempo_ds.

Each op family has two builders, one per device, like DeepSpeed's own `op_builder/` and
`op_builder/cpu/`: `<Family>CPUBuilder(OpBuilder)` compiles the C++ sources with g++ and OpenMP,
`<Family>CUDABuilder(CUDAOpBuilder)` the CUDA sources with nvcc. Both include the shared
`csrc/includes/tempo/*.h` math, so the CPU build exercises the GPU math.

`load()` first imports a prebuilt module (`pip install` with `TEMPO_BUILD_OPS=1`, see setup.py),
then JIT-builds with ninja into `$TORCH_EXTENSIONS_DIR/<NAME>` and caches the result. Every build
carries the digest of the sources it was compiled from (`source_digest`); a prebuilt module whose
digest differs from the sources in csrc/ now (an edit or `git pull` after the install) is stale:
it is set aside with a warning and the op is JIT-built from the current sources instead.
"""
import hashlib
import importlib
import os
import re
import sys
import warnings
from pathlib import Path

from deepspeed.ops.op_builder.builder import CUDAOpBuilder, OpBuilder

from .._shipped import shipped_dir
from .progress import jit_cached, timed_load

CSRC = shipped_dir("csrc")


def csrc_path(*parts):
    """Absolute path under csrc/ (DeepSpeed resolves relative paths against its own package)."""
    return str(CSRC.joinpath(*parts))


def _cuda_runtime_include_dirs():
    """Header folders that a minimal CUDA toolkit lacks but the CUDA torch wheels ship
    (cuBLAS/cuSPARSE headers pulled in by ATen/cuda/CUDAContext.h)."""
    dirs = []
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if nvidia.is_dir():
            dirs += [str(p) for p in sorted(nvidia.glob("cu*/include")) if p.is_dir()]
            dirs += [str(p) for p in sorted(nvidia.glob("*/include")) if (p / "cublas_v2.h").exists()]
    return dirs


def resolve_cuda_home():
    """Point torch's extension builder at a CUDA toolkit that has headers.

    torch guesses CUDA_HOME from `which nvcc`; where nvcc is a wrapper script in /usr/local/bin
    the guess is /usr/local, which has no cuda_runtime.h. An explicit CUDA_HOME always wins.
    """
    from torch.utils import cpp_extension

    def has_headers(home):
        return home is not None and (Path(home) / "include" / "cuda_runtime.h").exists()

    if has_headers(cpp_extension.CUDA_HOME):
        return cpp_extension.CUDA_HOME
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if has_headers(candidate):
            cpp_extension.CUDA_HOME = candidate
            return candidate
    return None


# "9.0a", "10.0f": arch-specific entries that PyTorch accepts in TORCH_CUDA_ARCH_LIST.
_ARCH_SUFFIX = re.compile(r"(\d+\.\d+)([af])")


class TempoBuilderMixin:
    """What every tempo_ds builder shares: absolute paths, the prebuilt-module lookup, the cache."""

    NAME = None
    FAMILY = None  # the key of op_builder.FAMILIES
    DEVICE = None  # "cpu" or "cuda"
    _tempo_loaded = {}
    _stale_warned = set()

    def __init__(self):
        super().__init__(name=self.NAME)

    def absolute_name(self):
        return f"tempo_ds.ops._prebuilt.{self.NAME}"

    def include_paths(self):
        return [csrc_path("includes")]

    def source_files(self):
        """Every file the build can read from csrc/: the sources, the shared headers under
        csrc/includes, and the headers beside the sources. Other files there (a generator
        script, an editor's backup) do not count."""
        headers = (".h", ".cuh", ".hpp")
        files = {Path(s) for s in self.sources()}
        files |= {p for p in CSRC.joinpath("includes").rglob("*") if p.suffix in headers and p.is_file()}
        for folder in {Path(s).parent for s in self.sources()}:
            files |= {p for p in folder.iterdir() if p.suffix in headers and p.is_file()}
        return sorted(files)

    def source_digest(self):
        """64 bits of the SHA-256 of source_files() (paths relative to csrc/ and contents), or
        None when the sources are not there to read. Compiled into every build (binding.h)."""
        digest = hashlib.sha256()
        try:
            for path in self.source_files():
                digest.update(path.relative_to(CSRC).as_posix().encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
        except OSError:
            return None
        return int.from_bytes(digest.digest()[:8], "big")

    def digest_flags(self):
        digest = self.source_digest()
        return [] if digest is None else [f"-DTEMPO_SOURCE_DIGEST=0x{digest:016x}ULL"]

    def prebuilt(self):
        """The module installed by `TEMPO_BUILD_OPS=1 pip install .`, or None, also when it is
        stale: built from sources other than those in csrc/ now (warns once)."""
        try:
            module = importlib.import_module(self.absolute_name())
        except ImportError:
            return None
        expected = self.source_digest()
        built_from = getattr(module, "source_digest", None)
        if expected is not None and built_from != expected:
            if self.NAME not in TempoBuilderMixin._stale_warned:
                TempoBuilderMixin._stale_warned.add(self.NAME)
                warnings.warn(
                    f"tempo_ds: the prebuilt {self.NAME} ({module.__file__}) was built from other "
                    f"sources than {CSRC} holds now; it is not used, and the op is JIT-built "
                    "from the current sources. Reinstall with TEMPO_BUILD_OPS=1 to prebuild it "
                    "again.", RuntimeWarning, stacklevel=2)
            return None
        return module

    def is_built(self):
        """True when a prebuilt or JIT-cached build of the current sources exists, so that a load
        compiles nothing (nothing is compiled to find out)."""
        return self.prebuilt() is not None or self.jit_cached()

    def is_loaded(self):
        return self.NAME in TempoBuilderMixin._tempo_loaded

    def jit_cached(self):
        """True when the JIT cache holds a build of the current sources (their digest is in its
        build.ninja), so that a load takes under a second; False when loading builds."""
        flags = self.digest_flags()
        return jit_cached(self.NAME, flags[0] if flags else None)

    def load(self, verbose=False):
        """The op module: prebuilt, else JIT-built (saying so, with its time) or loaded from the
        cache; once per process."""
        cache = TempoBuilderMixin._tempo_loaded
        if self.NAME not in cache:
            module = self.prebuilt()
            if module is None:
                what = f"op family {self.FAMILY!r} for {self.DEVICE}"
                module = timed_load(lambda: self.jit_load(verbose), what, self.NAME, self.jit_cached())
            cache[self.NAME] = module
        return cache[self.NAME]


class TempoCPUOpBuilder(TempoBuilderMixin, OpBuilder):
    """C++/OpenMP build of an op family (g++, no nvcc)."""

    DEVICE = "cpu"

    def cxx_args(self):
        return ["-O3", "-std=c++20", "-fopenmp", "-Wno-reorder"] + self.digest_flags()

    def extra_ldflags(self):
        return ["-fopenmp"]

    def is_compatible(self, verbose=False):
        import shutil
        ok = shutil.which(os.environ.get("CXX", "c++")) is not None
        if not ok and verbose:
            self.warning(f"{self.NAME}: no C++ compiler on PATH")
        return ok and super().is_compatible(verbose)


class TempoCUDAOpBuilder(TempoBuilderMixin, CUDAOpBuilder):
    """nvcc build of an op family. It compiles without a GPU (CI compiles every CUDA op) as long
    as TORCH_CUDA_ARCH_LIST names the target, e.g. 9.0 for H100/H200."""

    DEVICE = "cuda"

    def include_paths(self):
        return super().include_paths() + _cuda_runtime_include_dirs()

    def is_compatible(self, verbose=False):
        import torch
        if torch.version.cuda is None:
            if verbose:
                self.warning(f"{self.NAME}: this torch build has no CUDA")
            return False
        if resolve_cuda_home() is None:
            if verbose:
                self.warning(f"{self.NAME}: no CUDA toolkit with headers (set CUDA_HOME)")
            return False
        return super().is_compatible(verbose)

    def cxx_args(self):
        return ["-O3", "-std=c++20", "-Wno-reorder"] + self.digest_flags()

    def nvcc_args(self):
        # No --use_fast_math: the GELU inversion needs accurate erfc/exp/log; norms keep fp32 stats.
        return [
            "-O3", "-std=c++20", "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            f"--threads={min(os.cpu_count() or 1, 8)}",
        ] + self.digest_flags() + self.compute_capability_args()

    def compute_capability_args(self, cross_compile_archs=None):
        """DeepSpeed's flags, also for arch-specific TORCH_CUDA_ARCH_LIST entries ("9.0a").

        DeepSpeed 0.19.8 reads each entry as major.minor integers and stops with "invalid literal
        for int() with base 10: '0a'" on the suffixed forms PyTorch accepts, which GPU images set
        (the H100 machines here export 9.0a). DeepSpeed is handed the plain arch, and the suffix
        is put back both in the list PyTorch reads (JIT) and in the explicit flags (prebuild), so
        the code is still built for sm_90a.
        """
        jit_list = getattr(self, "_jit_arch_list", None) if self.jit_mode else None
        requested = jit_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or ""
        suffixes = dict(_ARCH_SUFFIX.findall(requested))
        if not suffixes:
            return super().compute_capability_args(cross_compile_archs)
        plain = _ARCH_SUFFIX.sub(r"\1", requested)
        if jit_list:
            self._jit_arch_list = plain
        os.environ["TORCH_CUDA_ARCH_LIST"] = plain
        try:
            args = super().compute_capability_args(cross_compile_archs)
        finally:
            if jit_list:
                self._jit_arch_list = jit_list

        def restore(arch):  # "9.0" -> "9.0a"
            return arch + suffixes.get(arch, "")

        # DeepSpeed leaves its canonical list ("9.0+PTX") in the environment for PyTorch to read
        os.environ["TORCH_CUDA_ARCH_LIST"] = re.sub(
            r"\d+\.\d+", lambda m: restore(m.group(0)), os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
        numbers = {arch.replace(".", ""): suffix for arch, suffix in suffixes.items()}

        def add_suffix(m):  # "compute_90" -> "compute_90a"
            return m.group(0) + numbers.get(m.group(1), "")

        return [re.sub(r"(?:compute|sm)_(\d+)\b", add_suffix, a) for a in args]

    def jit_load(self, verbose=True):
        resolve_cuda_home()
        return super().jit_load(verbose)
