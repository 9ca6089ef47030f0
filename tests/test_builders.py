"""Every op family builds through our DeepSpeed op builders: the CPU ops are built and loaded,
and every CUDA op is compiled (nvcc runs here without a GPU), so a broken kernel cannot land."""
import os

import pytest
import torch

from tempo_ds import report
from tempo_ds.op_builder import FAMILIES, TempoCPUOpBuilder, TempoCUDAOpBuilder
from tempo_ds.ops import _backend

CPU_BUILDERS = [pair[0] for pair in FAMILIES.values()]
CUDA_BUILDERS = [pair[1] for pair in FAMILIES.values()]


@pytest.mark.parametrize("cls", CPU_BUILDERS, ids=lambda c: c.NAME)
def test_cpu_op_builds_and_exports_the_fallbacks_functions(cls):
    from deepspeed.ops.op_builder.builder import OpBuilder
    builder = cls()
    assert isinstance(builder, (OpBuilder, TempoCPUOpBuilder))
    module = builder.load()
    family = next(f for f, pair in FAMILIES.items() if pair[0] is cls)
    # the compiled module and the PyTorch fallback offer the same kernels
    expected = {k for k in vars(_backend.FALLBACKS[family])}
    assert expected <= set(dir(module)), expected - set(dir(module))
    assert builder.is_built() and builder.is_loaded()


@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only torch build cannot compile CUDA")
@pytest.mark.parametrize("cls", CUDA_BUILDERS, ids=lambda c: c.NAME)
def test_cuda_op_compiles(cls, monkeypatch):
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    builder = cls()
    assert isinstance(builder, (CUDAOpBuilder, TempoCUDAOpBuilder))
    assert builder.is_compatible(verbose=True), builder.error_log
    module = builder.load()
    family = next(f for f, pair in FAMILIES.items() if pair[1] is cls)
    assert {k for k in vars(_backend.FALLBACKS[family])} <= set(dir(module))


@pytest.mark.parametrize("arch_list,flags,torch_list", [
    ("9.0", ["-gencode=arch=compute_90,code=sm_90"], "9.0"),
    ("9.0a", ["-gencode=arch=compute_90a,code=sm_90a"], "9.0a"),
    ("8.0;9.0a+PTX", ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
                      "-gencode=arch=compute_90a,code=compute_90a"], "8.0;9.0a+PTX"),
])
def test_arch_specific_arch_lists_build(arch_list, flags, torch_list, monkeypatch):
    """TORCH_CUDA_ARCH_LIST=9.0a (set by H100 images) stopped DeepSpeed 0.19.8's flag parser with
    "invalid literal for int()"; our builders pass the plain arch to it and restore the suffix."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    builder = CUDA_BUILDERS[0]()
    builder.jit_mode = False  # prebuild: explicit -gencode flags
    assert builder.compute_capability_args() == flags
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == torch_list
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    builder.jit_mode, builder._jit_arch_list = True, arch_list  # as jit_load sets them
    assert builder.compute_capability_args() == []  # torch emits the flags from the list
    highest = torch_list.split(";")[-1]
    expected = torch_list if highest.endswith("+PTX") else torch_list + "+PTX"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == expected and builder._jit_arch_list == arch_list


def test_report_does_not_retry_a_failed_parallel_build():
    failed = {CPU_BUILDERS[0].NAME: "log"}
    row = next(r for r in report.rows(load=True, failed=failed) if r["op"] == CPU_BUILDERS[0].NAME)
    assert row["error"] == "build failed (its log is printed above)"
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--parallel"])  # --parallel only with --load
    assert exit_info.value.code == 2  # argparse's usage error


def test_report_main_passes_the_parallel_failures_on(monkeypatch, capsys):
    """main hands rows() the builds that failed in their own processes, so none is retried."""
    failed = {CPU_BUILDERS[0].NAME: "the compiler's log"}
    monkeypatch.setattr(report, "build_in_parallel", lambda: failed)
    seen = []
    monkeypatch.setattr(report, "rows", lambda load, given=None: seen.append((load, given)) or [
        {"op": CPU_BUILDERS[0].NAME, "device": "cpu", "compatible": True, "built": False, "prebuilt": False,
         "loaded": False, "runnable": True, "error": "build failed (its log is printed above)", "note": ""}])
    assert report.main(["--load", "--parallel"]) == 1
    assert seen == [(True, failed)]
    assert "the compiler's log" in capsys.readouterr().out


def test_report_lists_every_op(capsys):
    assert report.main([]) == 0
    out = capsys.readouterr().out
    for cpu_cls, cuda_cls in FAMILIES.values():
        assert cpu_cls.NAME in out and cuda_cls.NAME in out


def test_fallback_warns_once_and_keeps_the_contract(monkeypatch):
    """A build failure in 'auto' mode warns once and serves the PyTorch implementation."""
    monkeypatch.setenv("TEMPO_DS_OPS", "auto")
    monkeypatch.setattr(_backend, "_cache", {})

    def broken(self, verbose=False):
        raise RuntimeError("no compiler")

    cpu_cls = FAMILIES["core"][0]
    monkeypatch.setattr(cpu_cls, "load", broken)
    with pytest.warns(RuntimeWarning, match="could not build op tempo_core_cpu"):
        first = _backend.ops("core", torch.device("cpu"))
    assert not _backend.is_compiled(first)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.ops("core", torch.device("cpu")) is first


def test_built_mode_raises_on_build_failure(monkeypatch):
    monkeypatch.setenv("TEMPO_DS_OPS", "built")
    monkeypatch.setattr(_backend, "_cache", {})
    cpu_cls = FAMILIES["core"][0]
    monkeypatch.setattr(cpu_cls, "load", lambda self, verbose=False: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        _backend.ops("core", torch.device("cpu"))


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TEMPO_DS_OPS", "fast")
    with pytest.raises(ValueError, match="TEMPO_DS_OPS"):
        _backend.ops("core", torch.device("cpu"))


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


_SEED = dict(dtype=torch.int64)
# Every entry point of the CPU builds, called with tensors of another device (meta: no data).
CPU_ENTRY_POINTS = {
    "gelu_fwd": ("core", lambda k: k.gelu_fwd(_meta(8), False)),
    "gelu_bwd": ("core", lambda k: k.gelu_bwd(_meta(8), _meta(8), _meta(1, dtype=torch.uint8), False)),
    "gelu_bwd_table": ("core", lambda k: k.gelu_bwd_table(_meta(8, dtype=torch.bfloat16),
                                                          _meta(8, dtype=torch.bfloat16),
                                                          _meta(1, dtype=torch.uint8), _meta(2, 1 << 16))),
    "bias_gelu_fwd": ("core", lambda k: k.bias_gelu_fwd(_meta(2, 4), _meta(4), False)),
    "layer_norm_fwd": ("core", lambda k: k.layer_norm_fwd(_meta(2, 4), None, None, 1e-5)),
    "layer_norm_bwd": ("core", lambda k: k.layer_norm_bwd(_meta(2, 4), _meta(2, 4), _meta(2), None, None, True)),
    "rms_norm_fwd": ("core", lambda k: k.rms_norm_fwd(_meta(2, 4), None, 1e-5)),
    "rms_norm_bwd": ("core", lambda k: k.rms_norm_bwd(_meta(2, 4), _meta(2, 4), _meta(2), None, True)),
    "cross_entropy_fwd": ("loss", lambda k: k.cross_entropy_fwd(_meta(2, 8), _meta(2, **_SEED))),
    "cross_entropy_bwd": ("loss", lambda k: k.cross_entropy_bwd(_meta(2, 8), _meta(2), _meta(2), _meta(2, **_SEED),
                                                                0.0, 0.0, 1 / 8)),
    "dropout_fwd": ("dropout", lambda k: k.dropout_fwd(_meta(8), _meta(1, **_SEED), 0.1)),
    "dropout_mask": ("dropout", lambda k: k.dropout_mask(_meta(1, **_SEED), 8, 0.1)),
    "dropout_mask_block": ("dropout", lambda k: k.dropout_mask_block(_meta(1, **_SEED), 0.1, 0, 1, 1, 1, 1, 1)),
    "bias_dropout_add_fwd": ("dropout", lambda k: k.bias_dropout_add_fwd(_meta(2, 4), None, _meta(2, 4),
                                                                        _meta(1, **_SEED), 0.1)),
    "softmax_dropout_fwd": ("dropout", lambda k: k.softmax_dropout_fwd(_meta(2, 4, 4), None, False, 1.0,
                                                                      _meta(1, **_SEED), 0.1, False)),
    "softmax_dropout_regen": ("dropout", lambda k: k.softmax_dropout_regen(_meta(2, 4, 4), _meta(1, **_SEED), 0.1,
                                                                          torch.float32)),
    "softmax_dropout_bwd": ("dropout", lambda k: k.softmax_dropout_bwd(_meta(2, 4, 4), _meta(2, 4, 4), None, False,
                                                                      1.0, _meta(1, **_SEED), 0.1, torch.float32)),
}


@pytest.mark.parametrize("entry", sorted(CPU_ENTRY_POINTS))
def test_cpu_build_refuses_tensors_of_another_device(entry):
    """The Python layer picks a build by device; a direct call into the CPU extension with tensors
    elsewhere must raise before any data is read, as the CUDA build's checks do."""
    family, call = CPU_ENTRY_POINTS[entry]
    kernels = _backend.ops(family, "cpu")
    assert _backend.is_compiled(kernels)
    with pytest.raises(RuntimeError, match="CPU"):
        call(kernels)
    assert {n for n in dir(kernels) if not n.startswith("_")} - {"set_poison", "source_digest"} <= set(CPU_ENTRY_POINTS)


def test_cpu_bias_dropout_add_refuses_a_residual_or_bias_elsewhere():
    kernels = _backend.ops("dropout", "cpu")
    x, seed = torch.randn(2, 4), torch.tensor([1], dtype=torch.int64)
    with pytest.raises(RuntimeError, match="residual must match x in size, dtype and device"):
        kernels.bias_dropout_add_fwd(x, None, _meta(2, 4), seed, 0.1)
    with pytest.raises(RuntimeError, match="bias must be .* device"):
        kernels.bias_dropout_add_fwd(x, _meta(4), torch.randn(2, 4), seed, 0.1)


def test_wheel_ships_the_op_sources_and_configs(tmp_path):
    """A non-editable install has no source checkout beside it: the wheel carries csrc/ (for JIT
    builds) and configs/ (the trainer's defaults) inside the package, where they are looked up."""
    import subprocess
    import sys
    import zipfile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", root, "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TEMPO_BUILD_OPS="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("tempo_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
               for top in ("csrc", "configs") for d, _, files in os.walk(os.path.join(root, top)) for f in files
               if "__pycache__" not in d}
    assert sources and {f"tempo_ds/{s}" for s in sources} <= names


@pytest.mark.parametrize("cls", CPU_BUILDERS + CUDA_BUILDERS, ids=lambda c: c.NAME)
def test_every_build_carries_the_digest_of_its_sources(cls, monkeypatch):
    """The prebuild (setup.py's extension) and the JIT build both compile the digest in."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    builder = cls()
    flag = f"-DTEMPO_SOURCE_DIGEST=0x{builder.source_digest():016x}ULL"
    if cls in CUDA_BUILDERS and torch.version.cuda is None:
        pytest.skip("CPU-only torch build cannot describe a CUDA extension")
    compile_args = builder.builder().extra_compile_args
    assert all(flag in args for args in compile_args.values()), compile_args
    if cls in CPU_BUILDERS:
        assert builder.load().source_digest == builder.source_digest()


def _csrc_copy(tmp_path, monkeypatch):
    """A copy of csrc/ that the builders read instead of the real one."""
    import shutil

    from tempo_ds.op_builder import builder as builder_module
    copy = tmp_path / "csrc"
    shutil.copytree(builder_module.CSRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(builder_module, "CSRC", copy)
    return copy


def test_source_digest_follows_every_file_the_build_reads(tmp_path, monkeypatch):
    core, dropout = FAMILIES["core"][0](), FAMILIES["dropout"][0]()
    csrc = _csrc_copy(tmp_path, monkeypatch)
    digests = core.source_digest(), dropout.source_digest()
    assert digests[0] != digests[1]
    # a shared header, a header beside the norm sources, a source: each changes the core digest
    for edited in ("includes/tempo/common.h", "norm/norm_host.h", "gelu/gelu_cpu.cpp"):
        path = csrc / edited
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert core.source_digest() != digests[0], edited
        path.write_bytes(original)
    assert core.source_digest() == digests[0]
    # a file the compiler does not read, and another family's source, leave it alone
    (csrc / "includes" / "tempo" / "notes.txt").write_text("not a header\n")
    assert core.source_digest() == digests[0]
    (csrc / "dropout" / "dropout_cpu.cpp").write_bytes(b"// edited\n")
    assert core.source_digest() == digests[0] and dropout.source_digest() != digests[1]


def test_stale_prebuilt_module_is_set_aside(tmp_path, monkeypatch):
    """A prebuilt module is used while csrc/ holds the sources it was built from; after an edit
    it is stale: prebuilt() warns once and returns None, so load() JIT-builds, and
    "tempo.build": "prebuilt" is refused."""
    import shutil
    import sys

    from tempo_ds.deepspeed.apply import prepare_ops
    from tempo_ds.deepspeed.config import TempoConfig
    from tempo_ds.op_builder.builder import TempoBuilderMixin

    cls = FAMILIES["dropout"][0]
    # the JIT build stands in for a prebuilt one: same flags, importable under the op's name
    (tmp_path / "prebuilt").mkdir()
    shutil.copy(cls().load().__file__, tmp_path / "prebuilt" / f"{cls.NAME}.so")
    monkeypatch.syspath_prepend(str(tmp_path / "prebuilt"))
    monkeypatch.setattr(cls, "absolute_name", lambda self: cls.NAME)
    monkeypatch.setattr(TempoBuilderMixin, "_stale_warned", set())
    monkeypatch.delitem(sys.modules, cls.NAME, raising=False)
    try:
        builder = cls()
        prebuilt = builder.prebuilt()
        assert prebuilt is not None and prebuilt.__spec__.origin.startswith(str(tmp_path))
        csrc = _csrc_copy(tmp_path, monkeypatch)
        (csrc / "includes" / "tempo" / "philox.h").write_bytes(b"// edited after the install\n")
        with pytest.warns(RuntimeWarning, match=f"prebuilt {cls.NAME} .* was built from other sources"):
            assert builder.prebuilt() is None
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert builder.prebuilt() is None  # once
        core_cls = FAMILIES["core"][0]
        monkeypatch.setattr(core_cls, "prebuilt", lambda self: object())  # only dropout is missing
        with pytest.raises(RuntimeError, match=f"op {cls.NAME} is not prebuilt, or its prebuilt"):
            prepare_ops(TempoConfig(build="prebuilt"), "cpu")
    finally:
        sys.modules.pop(cls.NAME, None)


class _FakeJit:
    """Stands in for DeepSpeed's jit_load: writes the library and build.ninja a build leaves."""

    def __init__(self, builder, flags):
        self.builder, self.flags, self.calls = builder, flags, 0

    def __call__(self, verbose=False):
        from tempo_ds.op_builder.progress import jit_build_dir
        self.calls += 1
        build_dir = jit_build_dir(self.builder.NAME)
        build_dir.mkdir(parents=True, exist_ok=True)
        # in this order, as torch writes build.ninja and ninja then links the library
        (build_dir / "build.ninja").write_text("cflags = " + " ".join(self.flags) + "\n")
        (build_dir / f"{self.builder.NAME}.so").write_bytes(b"")
        return object()


@pytest.fixture
def fresh_builder(tmp_path, monkeypatch):
    """A CPU builder with an empty JIT cache, nothing prebuilt and nothing loaded in this process."""
    from tempo_ds.op_builder.builder import TempoBuilderMixin
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(TempoBuilderMixin, "_tempo_loaded", {})
    builder = CPU_BUILDERS[0]()
    monkeypatch.setattr(builder, "prebuilt", lambda: None)
    fake = _FakeJit(builder, builder.digest_flags())
    monkeypatch.setattr(builder, "jit_load", fake)
    return builder, fake


def test_a_jit_build_says_what_builds_and_how_long_it_took(fresh_builder, capsys):
    builder, fake = fresh_builder
    assert not builder.jit_cached()
    builder.load()
    err = capsys.readouterr().err
    assert fake.calls == 1
    family = next(f for f, pair in FAMILIES.items() if pair[0] is type(builder))
    assert f"building op family {family!r} for cpu ({builder.NAME})" in err
    assert "the first build takes minutes; later loads take under a second" in err
    assert f"built {builder.NAME} in " in err


def test_a_cached_load_says_nothing(fresh_builder, capsys, monkeypatch):
    from tempo_ds.op_builder.builder import TempoBuilderMixin
    builder, fake = fresh_builder
    builder.load()
    capsys.readouterr()
    monkeypatch.setattr(TempoBuilderMixin, "_tempo_loaded", {})  # a new process, same cache
    assert builder.jit_cached()
    builder.load()
    assert fake.calls == 2 and capsys.readouterr().err == ""


def test_a_cache_of_other_sources_counts_as_a_build(fresh_builder, capsys, monkeypatch):
    """A library built from other sources (another digest in build.ninja) is rebuilt: announced."""
    from tempo_ds.op_builder.builder import TempoBuilderMixin
    builder, fake = fresh_builder
    fake.flags = ["-DTEMPO_SOURCE_DIGEST=0x0000000000000000ULL"]
    builder.load()
    capsys.readouterr()
    monkeypatch.setattr(TempoBuilderMixin, "_tempo_loaded", {})  # a new process, same cache
    assert not builder.jit_cached()
    builder.load()
    assert "building op family" in capsys.readouterr().err


def test_an_unfinished_build_counts_as_a_build(fresh_builder, capsys, monkeypatch):
    """build.ninja newer than the library: a build was interrupted after torch wrote its build
    file (with the current digest) and before it linked; loading builds, so it is announced."""
    from tempo_ds.op_builder.builder import TempoBuilderMixin
    from tempo_ds.op_builder.progress import jit_build_dir
    builder, fake = fresh_builder
    builder.load()
    capsys.readouterr()
    build_dir = jit_build_dir(builder.NAME)
    library = build_dir / f"{builder.NAME}.so"
    os.utime(library, (library.stat().st_atime, (build_dir / "build.ninja").stat().st_mtime - 10))
    monkeypatch.setattr(TempoBuilderMixin, "_tempo_loaded", {})
    assert not builder.jit_cached()
    builder.load()
    assert "building op family" in capsys.readouterr().err


def test_a_slow_load_of_a_cached_op_says_how_long_it_took(fresh_builder, capsys, monkeypatch):
    from tempo_ds.op_builder import progress
    from tempo_ds.op_builder.builder import TempoBuilderMixin
    builder, fake = fresh_builder
    builder.load()
    capsys.readouterr()
    monkeypatch.setattr(TempoBuilderMixin, "_tempo_loaded", {})
    monkeypatch.setattr(progress, "SLOW_LOAD_S", -1.0)  # every load is "slow"
    builder.load()
    err = capsys.readouterr().err
    assert f"loaded {builder.NAME} in " in err and "building op family" not in err


@pytest.mark.parametrize("rank,prints", [("0", True), ("1", False), ("3", False)])
def test_only_rank_0_prints(fresh_builder, capsys, monkeypatch, rank, prints):
    builder, _ = fresh_builder
    monkeypatch.setenv("RANK", rank)
    builder.load()
    assert ("building" in capsys.readouterr().err) == prints


def test_deepspeed_shm_build_is_announced_when_not_cached(tmp_path, monkeypatch, capsys):
    """build_deepspeed_shm_op loads DeepSpeed's own shm op through DeepSpeed's builder, so that
    deepspeed.initialize then finds it loaded, and says so when the cache cannot serve it."""
    from deepspeed.accelerator import get_accelerator

    from tempo_ds.op_builder import build_deepspeed_shm_op, progress
    builder_cls = get_accelerator().create_op_builder(progress.SHM_BUILDER).__class__
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    loaded = object()
    monkeypatch.setattr(builder_cls, "load", lambda self, verbose=False: loaded)
    assert build_deepspeed_shm_op() is loaded
    err = capsys.readouterr().err
    assert "building DeepSpeed's shared-memory communication op (deepspeed_shm_comm)" in err
    assert "built deepspeed_shm_comm in " in err
    # with a library in the cache it loads without a word
    (tmp_path / "deepspeed_shm_comm").mkdir(exist_ok=True)
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    assert build_deepspeed_shm_op() is loaded
    assert capsys.readouterr().err == ""
