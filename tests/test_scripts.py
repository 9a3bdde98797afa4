"""Every command line answers --help (so every documented command at least parses), the thin aliases
work from a shell, and base_train's flags and TrainConfig agree field for field."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (REPO / "scripts").glob("*.py") if p.stem != "__init__"
                 and "def main(" in p.read_text())


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, capsys):
    module = importlib.import_module(f"scripts.{name}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--help" in out


@pytest.mark.parametrize("argv", [["-m", "nanochat.dataset", "--help"], ["scripts/base_train.py", "--help"],
                                  ["-m", "scripts.base_eval", "--help"]])
def test_help_from_a_shell(argv):
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_base_train_flags_are_the_train_config():
    from nanochat.config import TrainConfig
    from scripts.base_train import build_parser

    args = vars(build_parser().parse_args([]))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(args) == names, f"flags without a field: {set(args) - names}; fields without a flag: {names - set(args)}"
    assert TrainConfig.from_dict(args) == TrainConfig(), "a flag's default differs from TrainConfig's"


@pytest.mark.parametrize("flags, message", [
    (["--num-iterations", "0"], "--num-iterations must be >= 1, or -1 for automatic"),
    (["--total-batch-size", "0"], "--total-batch-size must be >= 1, or -1 for automatic"),
    (["--depth", "0"], "--depth must be >= 1"),
    (["--save-every", "0"], "--save-every must be"),
    (["--warmdown-ratio", "1.5"], "--warmdown-ratio must be in [0, 1]"),
])
def test_zero_and_out_of_range_flags_are_errors(flags, message, capsys, tmp_path, monkeypatch):
    from scripts.base_train import main

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert main(flags + ["--synthetic-data", "--device-type", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir()), "a refused run must not create its run folder"
