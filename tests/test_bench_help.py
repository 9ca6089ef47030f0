"""`python -m tempo_ds.bench <command> --help` explains every option and shows its default."""
import re

import pytest

from tempo_ds.bench.__main__ import main


def _help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _options(text):
    """{option: its help text} from an argparse help page's options section."""
    section = text.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", "\n" + section.strip("\n"))
    out = {}
    for entry in entries:
        lines = entry.strip("\n").split("\n")
        if not lines[0].strip():
            continue
        # "  --opt ARG   help..." or "  --opt ARG" with the help on the lines below
        signature, _, rest = lines[0].strip().partition("  ")
        out[signature.split()[0].rstrip(",")] = " ".join(" ".join([rest, *lines[1:]]).split())
    return out


@pytest.mark.parametrize("command", ["ops", "convergence"])
def test_every_option_has_help_and_its_default(command, capsys):
    options = _options(_help(command, capsys))
    options.pop("-h")
    assert len(options) >= 5, options
    for name, text in options.items():
        assert "(default:" in text, f"{command} {name}: {text!r}"
        assert len(text.split("(default:")[0].strip()) > 10, f"{command} {name} has no help text"


def test_numerics_says_what_it_measures(capsys):
    text = _help("numerics", capsys)
    assert "gradient error of the in-place GELU" in " ".join(text.split())
