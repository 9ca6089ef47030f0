"""`python -m tempo_ds.report --load` exits 0 when the ops of the devices present load, and 1 only
for a failure on a present device: a machine without a GPU does not fail on the CUDA rows."""
import os
import subprocess
import sys

import pytest
import torch

from tempo_ds import report
from tempo_ds.op_builder import FAMILIES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_BUILDERS = [pair[0] for pair in FAMILIES.values()]
CUDA_BUILDERS = [pair[1] for pair in FAMILIES.values()]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_report_load_exits_0_without_a_gpu():
    # as a new user runs it: no TORCH_CUDA_ARCH_LIST, with which DeepSpeed's CUDA JIT stops on
    # "found no CUDA devices", the error that made this exit 1
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    out = subprocess.run([sys.executable, "-m", "tempo_ds.report", "--load"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for cls in CUDA_BUILDERS:
        line = next(line for line in lines if line.startswith(cls.NAME))
        assert "not applicable: no GPU" in line and "error" not in line, line
    for cls in CPU_BUILDERS:
        line = next(line for line in lines if line.startswith(cls.NAME))
        assert "error" not in line and "not applicable" not in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_cuda_rows_are_not_loaded_without_a_gpu_but_say_what_they_are(monkeypatch):
    def refuse(self, verbose=False):
        raise AssertionError(f"{self.NAME} loaded on a machine without a GPU")

    for cls in CUDA_BUILDERS:
        monkeypatch.setattr(cls, "load", refuse)
    table = {r["op"]: r for r in report.rows(load=True)}
    for cls in CUDA_BUILDERS:
        row = table[cls.NAME]
        assert row["note"] == "not applicable: no GPU" and not row["runnable"] and not row["error"]
        builder = cls()
        assert row["compatible"] == builder.is_compatible(verbose=False)
        assert row["built"] == builder.is_built()
    for cls in CPU_BUILDERS:
        assert table[cls.NAME]["loaded"] and table[cls.NAME]["note"] == ""


def test_a_failed_load_on_a_present_device_exits_1(monkeypatch, capsys):
    def broken(self, verbose=False):
        raise RuntimeError("the compiler stopped")

    monkeypatch.setattr(CPU_BUILDERS[0], "load", broken)
    assert report.main(["--load"]) == 1
    assert "the compiler stopped" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_failed_build_of_an_absent_device_does_not_fail_the_report(monkeypatch, capsys):
    failed = {CUDA_BUILDERS[0].NAME: "nvcc's log"}
    monkeypatch.setattr(report, "build_in_parallel", lambda: failed)
    assert report.main(["--load", "--parallel"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(CUDA_BUILDERS[0].NAME))
    # still shown, so a broken CUDA build is not hidden on a CPU machine
    assert "build failed" in line and "not applicable: no GPU" in line


def test_a_failed_load_on_a_gpu_exits_1(monkeypatch, capsys):
    """With a GPU present (simulated), the CUDA rows are loaded and their failure counts."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "simulated GPU")

    def broken(self, verbose=False):
        raise RuntimeError("nvcc stopped")

    for cls in CUDA_BUILDERS:
        monkeypatch.setattr(cls, "is_compatible", lambda self, verbose=False: True)
        monkeypatch.setattr(cls, "load", broken)
    assert report.main(["--load"]) == 1
    out = capsys.readouterr().out
    for cls in CUDA_BUILDERS:
        line = next(line for line in out.splitlines() if line.startswith(cls.NAME))
        assert "nvcc stopped" in line and "not applicable" not in line, line
