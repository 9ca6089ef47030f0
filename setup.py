"""tempo_ds: Tempo for DeepSpeed and Megatron-core.

Ops are JIT-built with ninja on first use through DeepSpeed op builders. To prebuild them at
install time (like DS_BUILD_OPS=1):

    TEMPO_BUILD_OPS=1 pip install --no-build-isolation .

which needs torch and deepspeed already installed; CUDA ops are built when a CUDA toolkit is
found (CUDA_HOME, TORCH_CUDA_ARCH_LIST select it and the targets).
"""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
# Folders beside the package that an installed copy needs: the op sources (JIT builds) and the
# default DeepSpeed configs of the trainer.
SHIPPED_DIRS = ("csrc", "configs")


class BuildPyWithSources(build_py):
    """build_py that also puts SHIPPED_DIRS inside the built package (tempo_ds/csrc,
    tempo_ds/configs), where tempo_ds._shipped looks outside a source checkout. An editable
    install reads them where they are."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name in SHIPPED_DIRS:
            shutil.copytree(os.path.join(HERE, name), os.path.join(self.build_lib, "tempo_ds", name),
                            dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


def prebuilt_extensions():
    if os.environ.get("TEMPO_BUILD_OPS", "0") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    from tempo_ds.op_builder import ALL_BUILDERS, resolve_cuda_home
    resolve_cuda_home()
    extensions = []
    for cls in ALL_BUILDERS:
        builder = cls()
        if not builder.is_compatible(verbose=True):
            print(f"tempo_ds: skipping {builder.NAME}: {builder.error_log}")
            continue
        ext = builder.builder()
        # setuptools wants sources relative to setup.py
        ext.sources = [os.path.relpath(s, HERE) for s in ext.sources]
        extensions.append(ext)
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = prebuilt_extensions()
cmdclass = {**cmdclass, "build_py": BuildPyWithSources}

setup(
    name="tempo_ds",
    version="0.1.0",
    description="Tempo (in-place GELU, output-saving LayerNorm, mask-free dropout) for DeepSpeed and Megatron-core",
    packages=find_packages(include=["tempo_ds", "tempo_ds.*"]),
    include_package_data=True,
    package_data={"tempo_ds": ["data/*.txt", "data/*.md"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19,<0.20",
        # 0.16.1 and 0.19.2 are tested in CI (make test, make test-compat); 0.17 and later declare
        # Python >= 3.12 (on 3.11 they install from the sdist, docs/megatron.md)
        "megatron-core>=0.16.1,<0.20",
        "ninja",
        "numpy",
    ],
    extras_require={
        # `tokenizers` reads Hugging Face tokenizer folders for python -m tempo_ds.data.preprocess
        # (encode_batch_fast came in 0.20); the test extra has it so CI runs those tests.
        "data": ["tokenizers>=0.20"],
        # transformers: tempo_ds.hf needs BERT, RoBERTa and GPT-2 on AttentionInterface and masks from
        # AttentionMaskInterface; 4.57 still has BERT's per-implementation classes. 5.17 is the lowest
        # checked, 5.24 the highest. The test extra has it, so CI runs tests/test_hf*.py.
        # accelerate: transformers' Trainer needs it (>= 1.1), with DeepSpeed or without
        "hf": ["transformers>=5.17,<6", "tokenizers>=0.20", "accelerate>=1.1"],
        "test": ["pytest>=8", "pyflakes>=3", "tokenizers>=0.20", "transformers>=5.17,<6", "accelerate>=1.1"],
        "bench": ["matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
