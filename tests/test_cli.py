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


def test_parser_reads_a_command_line_into_its_fields():
    args = build_parser().parse_args(["evaluate", "--run", "runs/x", "--split", "val", "--n-bootstrap", "200"])
    assert (args.command, args.run, args.split, args.n_bootstrap) == ("evaluate", "runs/x", "val", 200)


def _one_line_error(capsys, rc: int) -> str:
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _tiny_csv_cohort(tmp_path):
    import numpy as np
    from PIL import Image

    img = tmp_path / "img"
    img.mkdir()
    rows = ["image,label"]
    for i in range(12):
        Image.fromarray(np.full((20, 24, 3), 40 * (i % 2) + 50, np.uint8)).save(img / f"{i}.png")
        rows.append(f"{i}.png,{'AB'[i % 2]}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return ["prepare", "csv", "--manifest", str(tmp_path / "m.csv"), "--image-root", str(img), "--workers", "1"]


def test_out_naming_an_existing_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    err = _one_line_error(capsys, main(_tiny_csv_cohort(tmp_path) + ["--out", str(tmp_path / "taken")]))
    assert f"--out {tmp_path / 'taken'} is an existing file" in err
    (tmp_path / "dir").mkdir()
    err = _one_line_error(capsys, main(["predict", "--model", str(tmp_path), "--images", str(tmp_path / "img"),
                                        "--out", str(tmp_path / "dir")]))
    assert "is a folder; give the CSV file to write" in err


@pytest.mark.parametrize("args,expected", [(["--epochs", "0"], "--epochs 0: train for at least one epoch"),
                                           (["--n-images", "5"], "--n-images 5: the dermoscopy demo needs at least 24 images"),
                                           (["--modality", "ct", "--n-images", "3"], "at least 8 patients")])
def test_demo_refuses_zero_epochs_and_tiny_cohorts(tmp_path, capsys, args, expected):
    err = _one_line_error(capsys, main(["demo", "--out", str(tmp_path / "d"), *args]))
    assert expected in err
    assert not (tmp_path / "d" / "runs").exists()


def test_disk_full_during_prepare_is_one_line_and_resumes(tmp_path, capsys, monkeypatch):
    import errno

    from data_prep import CacheWriter, open_cache

    real = CacheWriter.write_shard

    def full(self, k, images):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.build_dir / f"shard-{k:06d}.npz"))

    monkeypatch.setattr(CacheWriter, "write_shard", full)
    args = _tiny_csv_cohort(tmp_path) + ["--out", str(tmp_path / "cache")]
    err = _one_line_error(capsys, main(args))
    assert "no space left on the device" in err and "shard-000000.npz" in err
    monkeypatch.setattr(CacheWriter, "write_shard", real)
    assert main(args) == 0 and len(open_cache(tmp_path / "cache")) == 12


def test_environment_fault_finds_sqlite_disk_full_inside_mlflow_errors():
    import sqlite3

    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    from pipeline.cli import environment_fault

    try:
        try:
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError as inner:
                raise sqlalchemy.exc.OperationalError("INSERT INTO metrics", {}, inner) from inner
        except sqlalchemy.exc.OperationalError as mid:
            raise MlflowException(f"(sqlite3.OperationalError) {mid.orig}") from mid
    except MlflowException as outer:
        assert "disk is full" in environment_fault(outer)
    assert environment_fault(ValueError("a bug")) is None


@pytest.mark.timeout(30)  # fails in seconds, never hangs on retries (the timeout is the check)
def test_unreachable_tracking_server_fails_within_seconds(capsys):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _one_line_error(capsys, main(["evaluate", "--run", "0" * 32, "--tracking-uri", f"http://127.0.0.1:{port}"]))
    assert f"tracking server http://127.0.0.1:{port} cannot be reached" in err


def test_a_folder_given_as_config_file_is_named_as_such(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(tmp_path)])
    assert exc.value.code == 2
    assert f"{tmp_path} is a folder, not a file" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4 in the checkpoint:UserWarning")  # the bytes planted below
def test_an_unreadable_checkpoint_gets_no_unsafe_loading_advice(tmp_path, capsys):
    """torch's message suggests weights_only=False; for a file of unknown origin we never pass that on."""
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x04\x95" + b"not a checkpoint" * 8)
    assert main(["evaluate", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not a readable checkpoint of this pipeline" in err and "weights_only" not in err
    assert len(err.strip().splitlines()) == 1


def test_prepare_refuses_a_non_positive_worker_count(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("image,label\n")
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "csv", "--manifest", str(tmp_path / "m.csv"), "--image-root", str(tmp_path),
              "--out", str(tmp_path / "c"), "--workers", "-2"])
    assert exc.value.code == 2
    assert "argument --workers: expected a whole number >= 1; got -2" in capsys.readouterr().err


def test_prepare_folder_builds_an_image_cache_without_file_names(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from data_prep import open_cache

    for c, name in enumerate(("nevus", "melanoma")):
        for k in range(6):
            (tmp_path / "in" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 24, 3), 60 * c + k, np.uint8)).save(tmp_path / "in" / name / f"PATIENT_SMITH_{k}.png")
    assert main(["prepare", "folder", "--root", str(tmp_path / "in"), "--out", str(tmp_path / "cache"), "--workers", "1",
                 "--set", "prepare.short_side=16"]) == 0
    cache = open_cache(tmp_path / "cache")
    assert cache.kind == "image" and cache.class_names == ["melanoma", "nevus"] and len(cache) == 12
    assert cache.manifest["image"].tolist()[:2] == ["melanoma-000001", "melanoma-000002"]
    assert cache.meta["preprocessing"]["short_side"] == 16 and cache.image(0).shape == (16, 19, 3)
    assert "SMITH" not in (tmp_path / "cache" / "manifest.csv").read_text() + (tmp_path / "cache" / "cache.json").read_text()
    assert "SMITH" not in "".join(capsys.readouterr())
    err = _one_line_error(capsys, main(["prepare", "folder", "--root", str(tmp_path / "in" / "nevus"),
                                        "--out", str(tmp_path / "c2")]))
    assert "class folder(s) found; a classifier needs at least two" in err


# ---------------------------------------------------------------- docs and parser cannot drift
import re  # noqa: E402
import shlex  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_ENTRY = re.compile(r"-m pipeline\.(train|evaluate|predict|geometry_stage)\b")
_STAGE = {"geometry_stage": "geometry"}


def _spans(text: str) -> list[str]:
    """Command lines in a text: `inline code`, lines of ``` blocks and indented docstring examples."""
    fences = re.compile(r"^\s*```.*?^\s*```", re.S | re.M)
    prose = fences.sub("", text)
    # an inline span may run over a line break, never over a blank line
    found = [m.group(1) for m in re.finditer(r"`((?:ecl |torchrun |python3? -m pipeline\.)(?:[^`\n]|\n(?!\s*\n))*)`", prose)]
    joined: list[str] = []
    for line in text.splitlines():  # a trailing backslash continues a shell line
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line.strip()
        else:
            joined.append(line)
    found += [ln.strip() for ln in joined if re.match(r"\s*(ecl |torchrun |python3? -m pipeline\.)", ln)]
    return found


def _commands(text: str) -> list[str]:
    """`ecl ...` and `[torchrun ...|python] -m pipeline.<stage> ...` as argv strings starting at the subcommand."""
    out = []
    for span in _spans(text):
        span = re.sub(r"<[^>]*>", "PLACEHOLDER", span)  # <run id | models:/...> is one value, not a pipe
        for part in re.split(r"&&|;|\|", " ".join(span.split())):
            part = part.strip()
            m = _ENTRY.search(part)
            if m:
                out.append(f"{_STAGE.get(m.group(1), m.group(1))} {part[m.end():]}".strip())
            elif part.startswith("ecl "):
                out.append(part[len("ecl "):])
    return out


def _usage_lines() -> list[tuple[str, str]]:
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "pipeline").glob("*.py"))]
    return [(str(p.relative_to(ROOT)), cmd) for p in sources for cmd in _commands(p.read_text(encoding="utf-8"))]


def _argv(command: str, tmp: Path) -> list[str]:
    """Placeholders become dummies the real parser accepts: DIR/CSV/CONFIG exist, the rest are words."""
    command = re.sub(r"\{split\}", "test", command)  # f-string fields of messages
    command = re.sub(r"\{[^}]*\}", "PLACEHOLDER", command)
    command = command.replace("[", " ").replace("]", " ")  # optional parts are parsed too
    things = {"DIR": tmp, "CSV": tmp / "file.csv", "CONFIG": tmp / "config.yaml"}
    argv = []
    for token in shlex.split(command):
        if token in ("...", "ARGS"):
            continue
        argv.append(str(things[token]) if token in things else token)
    return argv


def test_docs_cover_every_subcommand():
    named = {cmd.split()[0] for _, cmd in _usage_lines()}
    assert set(SUBCOMMANDS) <= named, set(SUBCOMMANDS) - named


def test_every_documented_command_line_parses(tmp_path, monkeypatch, capsys):
    """Every `ecl ...` line of README.md, docs/*.md and pipeline/*.py parses with the real parser.

    Parsing only: nothing runs. A bare mention (`ecl predict`) only has to name a subcommand.
    """
    (tmp_path / "file.csv").write_text("image,label\n")
    (tmp_path / "config.yaml").write_text("{}\n")
    monkeypatch.chdir(ROOT)  # configs/... in the docs are relative to the repository
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them there
    prepare_kinds = subcommands["prepare"]._subparsers._group_actions[0].choices  # noqa: SLF001
    bad = []
    usage = _usage_lines()
    assert len(usage) > 20  # the extraction itself works
    for where, command in usage:
        argv = _argv(command, tmp_path)
        if not argv:
            continue  # `ecl ...`: commands in general
        if argv[0] not in subcommands and not argv[0].startswith("-"):
            bad.append(f"{where}: `ecl {command}`: no subcommand {argv[0]!r}")
            continue
        if len(argv) == 1 or (argv[0] == "prepare" and len(argv) == 2 and argv[1] in prepare_kinds):
            continue  # a name, not a usage line
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # --help exits 0
            if exc.code != 0:
                bad.append(f"{where}: `ecl {command}` does not parse")
    assert bad == []


# runpy warns that the stage module is already imported (by this test session); `python -m` starts fresh
@pytest.mark.filterwarnings("ignore:'pipeline\\.\\w+' found in sys.modules after import of package:RuntimeWarning")
def test_python_m_entry_points_are_the_ecl_parser(capsys, monkeypatch):
    """`python -m pipeline.<stage> ARGS` is `ecl <stage> ARGS`: same usage line, same errors."""
    import runpy

    def run_module(module: str, *args: str) -> int:
        monkeypatch.setattr(sys, "argv", [module, *args])
        with pytest.raises(SystemExit) as exc:
            runpy.run_module(f"pipeline.{module}", run_name="__main__")
        return exc.value.code

    for name, module in (("train", "train"), ("evaluate", "evaluate"), ("predict", "predict"),
                         ("geometry", "geometry_stage")):
        assert run_module(module, "--help") == 0 and f"usage: ecl {name}" in capsys.readouterr().out
    assert run_module("geometry_stage", "--counts", "9,x") == 2
    assert "argument --counts/--class-counts: expected comma-separated whole numbers" in capsys.readouterr().err


def test_counts_alias_and_class_names_parse_alike():
    parser = build_parser()
    a = parser.parse_args(["geometry", "--counts", "900,90,10", "--class-names", "NV, MEL,DF"])
    b = parser.parse_args(["geometry", "--class-counts", "900,90,10", "--class-names", "NV,MEL,DF"])
    assert a.class_counts == b.class_counts == [900, 90, 10]
    assert a.class_names == b.class_names == ["NV", "MEL", "DF"]


def test_cli_is_the_only_argparse_parser_in_pipeline():
    users = sorted(p.name for p in (ROOT / "pipeline").glob("*.py") if re.search(r"^\s*import argparse|ArgumentParser\(",
                                                                                   p.read_text(encoding="utf-8"), re.M))
    assert users == ["cli.py"]
