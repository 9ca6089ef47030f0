"""Folders the package reads that are not Python: csrc/ (the op sources, for JIT builds) and
configs/ (the trainer's default DeepSpeed configs).

They sit beside the package in a source checkout (and an editable install); an installed wheel
ships them inside the package (setup.py's build_py).
"""
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(name):
    """The folder `name` ("csrc" or "configs"): beside the package, else inside it. When neither
    exists, the checkout's path, so that errors name where it was expected."""
    beside, inside = _PACKAGE.parent / name, _PACKAGE / name
    return next((p for p in (beside, inside) if p.is_dir()), beside)
