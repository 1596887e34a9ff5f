"""The CLI gives one clear line for user mistakes, never a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.cli import build_parser, main

SUBCOMMANDS = ["demo", "prepare", "train", "evaluate", "predict", "compare", "geometry"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"    {name}" in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert "usage: ecl " + name in capsys.readouterr().out


def test_missing_input_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "isic2019", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "c")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"folder {tmp_path / 'nope'} does not exist" in err
    assert "Traceback" not in err


def test_config_typo_is_one_line(capsys):
    assert main(["train", "--set", "trian.epochs=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ecl train: error:") and "Did you mean 'train'" in err
    assert len(err.splitlines()) == 1


def test_train_missing_cache_is_one_line(tmp_path, capsys):
    code = main(["train", "--set", f"data.cache={tmp_path / 'missing'}", "--set", f"train.output_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "geometry" in out.stdout


def test_parser_builds():
    assert build_parser().prog == "ecl"
