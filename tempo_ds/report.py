"""`python -m tempo_ds.report`: like DeepSpeed's ds_report, one line per op builder.

For each op family and device it says whether the op can be built here (compatible), whether a
build exists (prebuilt or JIT-cached), whether it is loaded in this process, and which device it
serves. `--load` builds/loads every compatible op first (JIT on first use, cached afterwards);
`--parallel` builds them in one process each, all at once, before loading them here (ninja runs
each build's compilations in parallel already; this overlaps the builds themselves).

Only the ops of the devices present are loaded: on a machine without a GPU the CUDA rows say
"not applicable: no GPU" (and still whether they are compatible and built). The exit status is 1
when an op of a present device failed to build or load, 0 otherwise.
"""
import argparse
import subprocess
import sys
import time

import torch


def device_present(device):
    """True when this machine has a device of type `device` ('cpu' or 'cuda') to run ops on."""
    return device == "cpu" or torch.cuda.is_available()


def rows(load=False, failed=None):
    """One dict per op builder. failed: {op name: error} of builds already tried (not retried).
    Only ops of a present device are loaded; the others get a note saying why not."""
    from .op_builder import FAMILIES
    out = []
    for family, (cpu_cls, cuda_cls) in FAMILIES.items():
        for device, cls in (("cpu", cpu_cls), ("cuda", cuda_cls)):
            builder = cls()
            compatible = builder.is_compatible(verbose=False)
            runnable = device_present(device)
            error = ""
            if failed and builder.NAME in failed:
                error = "build failed (its log is printed above)"
            elif load and compatible and runnable:
                try:
                    builder.load(verbose=False)
                except Exception as err:  # report, don't stop: the table is the point
                    error = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            out.append({
                "family": family, "op": builder.NAME, "device": device,
                "compatible": compatible, "built": builder.is_built(),
                "loaded": builder.is_loaded(), "prebuilt": builder.prebuilt() is not None,
                "runnable": runnable, "error": error,
                "note": "" if runnable else "not applicable: no GPU",
            })
    return out


def build_in_parallel():
    """JIT-build every compatible op of a present device, each in its own process, all at once;
    their cached builds then load here in a fraction of a second. Returns {op name: error text}
    for failed builds."""
    from .op_builder import FAMILIES
    from .op_builder.progress import say
    code = ("import sys; from tempo_ds.op_builder import FAMILIES; "
            "FAMILIES[sys.argv[1]][int(sys.argv[2])]().load(verbose=False)")
    procs, building = {}, []
    start = time.perf_counter()
    for family, classes in FAMILIES.items():
        for index, (device, cls) in enumerate(zip(("cpu", "cuda"), classes)):
            builder = cls()
            if device_present(device) and builder.is_compatible(verbose=False):
                if builder.prebuilt() is None and not builder.jit_cached():
                    building.append(cls.NAME)
                procs[cls.NAME] = subprocess.Popen([sys.executable, "-c", code, family, str(index)],
                                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the builds' own messages go to their captured output: say here what runs
    if building:
        say(f"building {', '.join(building)} in parallel: the first build takes minutes; later loads "
            "take under a second")
    errors = {}
    for name, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            errors[name] = out[-3000:]
    if building:
        say(f"parallel builds done in {time.perf_counter() - start:.1f} s")
    return errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", action="store_true", help="build/load every compatible op first")
    parser.add_argument("--parallel", action="store_true",
                        help="with --load: build the ops in parallel processes first")
    args = parser.parse_args(argv)
    if args.parallel and not args.load:
        parser.error("--parallel needs --load")
    import deepspeed
    from torch.utils import cpp_extension

    from . import __version__
    from .op_builder import resolve_cuda_home
    print(f"tempo_ds {__version__} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
          f"deepspeed {deepspeed.__version__} | CUDA_HOME {resolve_cuda_home() or cpp_extension.CUDA_HOME}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"GPU: {gpu}")
    failed = build_in_parallel() if args.parallel else {}
    for name, log in failed.items():
        print(f"build of {name} failed:\n{log}")
    header = f"{'op':<20}{'device':<8}{'compatible':<12}{'built':<8}{'prebuilt':<10}{'loaded':<8}{'runs here':<10}"
    print(header)
    print("-" * len(header))
    any_error = False
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    for r in rows(args.load, failed):
        print(f"{r['op']:<20}{r['device']:<8}{yes(r['compatible']):<12}{yes(r['built']):<8}"
              f"{yes(r['prebuilt']):<10}{yes(r['loaded']):<8}{yes(r['runnable']):<10}"
              + (f" error: {r['error']}" if r["error"] else "")
              + (f" {r['note']}" if r["note"] else ""))
        # a failure on a device this machine lacks is reported, but is not this machine's failure
        any_error |= bool(r["error"]) and r["runnable"]
    return 1 if any_error else 0


if __name__ == "__main__":
    sys.exit(main())
