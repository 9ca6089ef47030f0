"""Messages around JIT op builds, which otherwise leave a first run silent for minutes.

A first build compiles with ninja for minutes (25-130 s per op family on 2 CPU cores, about 80 s
for a CUDA family); a cached load takes under a second. Before a build that the cache cannot serve
the user is told what builds, for which device, and how long it takes; after it, how long it took.

Messages go to stderr with print, prefixed "tempo_ds:": they must show in every entry point
(the trainer, the benches, `python -m tempo_ds.report`, a user's script) whatever its logging
set-up, and a logger at INFO shows nothing where logging is not configured. Only rank 0 (the
RANK environment variable) prints; without RANK every process does, once per op, since a
process loads each op once.
"""
import os
import sys
import time
from pathlib import Path

# A load that the cache looked able to serve but that took longer than this rebuilt (a source's
# timestamp changed) or waited for another process building the same op: said too, with its time.
SLOW_LOAD_S = 5.0

SHM_BUILDER = "ShareMemCommBuilder"


def is_rank0():
    """True on rank 0 (RANK=0), and in a process that has no RANK."""
    rank = os.environ.get("RANK", "").strip()
    return rank in ("", "0")


def say(message):
    """Print `message` to stderr, prefixed "tempo_ds:", on rank 0 only (see is_rank0)."""
    if is_rank0():
        print(f"tempo_ds: {message}", file=sys.stderr, flush=True)


def jit_build_dir(name):
    """Where torch's JIT keeps the build of extension `name` ($TORCH_EXTENSIONS_DIR/<name>, or
    ~/.cache/torch_extensions/py<ver>_<cu|cpu>/<name>)."""
    from torch.utils.cpp_extension import _get_build_directory
    return Path(_get_build_directory(name, verbose=False))


def jit_cached(name, flag=None):
    """True when the JIT cache of extension `name` has a built library and, if `flag` is given, its
    build.ninja carries that flag (a build with other flags, e.g. another source digest, is rebuilt)."""
    build_dir = jit_build_dir(name)
    libraries = list(build_dir.glob(f"{name}*.so"))
    if not libraries:
        return False
    ninja_file = build_dir / "build.ninja"
    try:
        # torch rewrites build.ninja only when its content changes: one newer than the library
        # belongs to a build that did not finish (interrupted, or failed)
        if ninja_file.stat().st_mtime > max(p.stat().st_mtime for p in libraries):
            return False
        return flag is None or flag in ninja_file.read_text()
    except OSError:
        return flag is None


def timed_load(load, what, name, cached):
    """Run `load()` and return its result; around it, say that `what` (e.g. "op family 'core' for
    cpu") builds when `cached` is False, and afterwards how long the build took. A load that was
    expected to be cached but took over SLOW_LOAD_S is reported with its time too."""
    if not cached:
        say(f"building {what} ({name}) with ninja into {jit_build_dir(name)}: the first build takes "
            "minutes; later loads take under a second")
    start = time.perf_counter()
    module = load()
    elapsed = time.perf_counter() - start
    if not cached:
        say(f"built {name} in {elapsed:.1f} s")
    elif elapsed > SLOW_LOAD_S:
        say(f"loaded {name} in {elapsed:.1f} s (it was rebuilt, or another process was building it)")
    return module


def build_deepspeed_shm_op():
    """Build (or load from its cache) DeepSpeed's shared-memory communication op, saying so.

    DeepSpeed's CPU accelerator JIT-builds `deepspeed_shm_comm` in the first
    `deepspeed.initialize` (deepspeed.comm.torch.build_shm_op), about 30-80 s without a word.
    Call this just before `deepspeed.initialize`: it loads the op through the same builder, so
    DeepSpeed then finds it loaded (its builders cache loaded ops by name), and it prints what is
    built and how long it took. A no-op where DeepSpeed would not build it (a GPU accelerator, an
    incompatible machine) and quick where it is cached or installed. Returns the op module, or None.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder(SHM_BUILDER)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    cached = installed_ops.get(builder.NAME, False) or jit_cached(builder.NAME)
    return timed_load(builder.load, "DeepSpeed's shared-memory communication op", builder.NAME, cached)
