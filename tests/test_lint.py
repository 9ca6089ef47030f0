"""A static check of every Python file of the package and the tests.

The GPU-marked tests never run in CI (no GPU), so a mistake in one, such as a name used without
its import, would first show on the rare GPU run and cost it. pyflakes reads every file, run or
not, and reports undefined names, unused imports and variables, and the like.
"""
import io
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_reports_nothing():
    # imported here, not at collection: the GPU machines run `pytest -m gpu` without pyflakes
    from pyflakes.api import checkRecursive
    from pyflakes.reporter import Reporter

    out = io.StringIO()
    paths = [str(ROOT / name) for name in ("tempo_ds", "tests", "setup.py")]
    count = checkRecursive(paths, Reporter(out, out))
    assert count == 0, out.getvalue()
