"""The command line itself: help text, usage errors, start-up cost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

NARROW = {"COLUMNS": "80", "TERM": "dumb", "NO_COLOR": "1"}


def test_help_keeps_bracketed_text_verbatim():
    dump = run_cli("dump-teacher", "--help", env=NARROW)
    train = run_cli("train-student", "--help", env=NARROW)
    assert dump.returncode == 0 and train.returncode == 0
    train_text = " ".join(train.stdout.split())  # help wraps at 80 columns
    assert "cuda[:N]" in dump.stdout and "[auto]" in dump.stdout and "[float16]" in dump.stdout
    assert "--hint S=T[:LOSS][@WEIGHT]" in train.stdout and "cosine or attention [mse], WEIGHT [1.0]" in train_text


@pytest.mark.parametrize("command", ["dump-teacher", "train-student", "verify", "info", "ls", None])
def test_help_fits_80_columns_with_whole_option_names(command):
    out = run_cli(*([command] if command else []), "--help", env=NARROW)
    assert out.returncode == 0, out.stderr
    assert all(len(line) <= 80 for line in out.stdout.splitlines()), out.stdout
    assert "…" not in out.stdout
    if command is None:  # each command's line whole, not cut with "..."
        assert "..." not in out.stdout.split("Commands:")[1]
    if command == "dump-teacher":
        assert "--sample-temperature T" in out.stdout and "--allow-nonfinite" in out.stdout
    if command == "train-student":
        assert "--online-teacher-checkpoint FILE" in out.stdout


@pytest.mark.parametrize("args, expected", [
    (["train-student", "--epoch", "3"], "no such option: --epoch (did you mean --epochs?)"),
    (["dump-teacher", "--hiden", "body"], "no such option: --hiden (did you mean --hidden?)"),
    (["train-student", "--epochs", "many"], "invalid value for '--epochs'"),
    (["dump-teachr"], "no such command 'dump-teachr'"),
    (["info"], "missing argument"),
])
def test_usage_mistakes_are_one_line_and_exit_2(args, expected):
    out = run_cli(*args, env=NARROW)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdcache: error: "), out.stderr
    assert expected in lines[0] and "--help" in lines[0]
    assert not out.stdout


def test_bare_kdcache_prints_its_help():
    out = run_cli(env=NARROW)
    assert out.returncode == 0 and "dump-teacher" in out.stdout and "train-student" in out.stdout


def test_the_cli_module_imports_neither_torch_nor_zarr():
    # what `kdcache --help` pays for: the CLI parses before it imports the library
    code = "import sys, kdcache.cli; print(sorted(m for m in ('torch', 'zarr', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_package_still_exports_its_api_lazily():
    code = ("import kdcache; from kdcache import dump_teacher, TeacherCache, KLDivLoss, evaluate; "
            "assert set(kdcache.__all__) <= set(dir(kdcache)); assert kdcache.losses.KLDivLoss is KLDivLoss")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_misspelled_spec_attribute_lists_what_the_module_defines(models_file):
    from kdcache import KdcacheError
    from kdcache.spec import resolve_spec

    with pytest.raises(KdcacheError) as caught:
        resolve_spec(f"{models_file}:techer")
    message = str(caught.value)
    assert "did you mean 'teacher'?" in message
    defined = message.split("it defines: ")[1].rstrip(")").split(", ")
    assert {"Teacher", "Student", "teacher", "student", "dataset"} <= set(defined)
    assert not {"np", "nn", "torch", "random", "Dataset", "TensorDataset"} & set(defined)  # imported, not defined
    with pytest.raises(KdcacheError, match=r"it defines: MLP, AugmentedDigits, teacher, trained_teacher, student"):
        resolve_spec("kdcache.examples.digits:teachr")  # a module with __all__: exactly that


def test_a_file_that_is_not_a_checkpoint_is_one_line_that_never_suggests_unsafe_loading(tmp_path):
    readme = str(Path(__file__).resolve().parent.parent / "README.md")
    out = run_cli("dump-teacher", "--teacher", "kdcache.examples.digits:teacher", "--dataset",
                  "kdcache.examples.digits:transfer", "--checkpoint", readme, "--out", str(tmp_path / "c"))
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot be read as a state dict" in lines[0], out.stderr
    assert "weights_only" not in out.stderr and not (tmp_path / "c").exists()


HELP = Path(__file__).parent / "fixtures" / "help"


@pytest.mark.parametrize("command", ["", "dump-teacher", "train-student", "info", "ls", "verify", "import", "export",
                                     "report", "plot"])
def test_every_help_prints_its_recorded_text(command):
    # the recorded text changes only on purpose, with the option it describes
    out = run_cli(*([command] if command else []), "--help", env={"COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == (HELP / f"{command or 'root'}.txt").read_text()


def test_a_setting_is_declared_once_and_its_flag_help_and_toml_key_come_from_it(tmp_path):
    from dataclasses import dataclass

    from kdcache.cli.dump_teacher import dump_teacher_cmd
    from kdcache.cli.options import command
    from kdcache.cli.train_student import train_student_cmd
    from kdcache.config import DumpConfig, Hint, TrainConfig
    from kdcache.config.checks import Settings, setting

    @dataclass(frozen=True)
    class Toy(Settings):
        width: int = setting(8, "Hidden width.", metavar="N")
        quiet: bool = setting(False)  # no help: a --config key and keyword argument only

    toy = command(Toy, ["width"], lambda values: None, "A toy.")
    [width] = toy.options
    assert (width.name, width.kind, width.help_line, width.metavar) == ("width", int, "Hidden width [8].", "N")
    with pytest.raises(RuntimeError, match=r"not placed on the command line \['width'\]"):
        command(Toy, [], lambda values: None, "A toy missing its option.")
    # every setting with help is a flag of its command, once; every flag is a TOML key of --config
    for cmd, settings in ((dump_teacher_cmd, DumpConfig), (train_student_cmd, TrainConfig)):
        names = [o.name for o in cmd.options]
        assert len(names) == len(set(names))
        assert {o.setting for o in cmd.options if o.setting} == {
            f for f in settings.__dataclass_fields__ if settings.__dataclass_fields__[f].metadata.get("help")}
    toml = tmp_path / "train.toml"
    toml.write_text('epochs = 2\nhint = ["a=b"]\nlr = 0.5\n')
    from kdcache.cli.options import merge_config
    values = merge_config({"config": toml, "epochs": 3, "hint": None})
    values["hints"] = values.pop("hint")
    assert TrainConfig.from_mapping(values) == TrainConfig(epochs=3, lr=0.5, hints=(Hint("a", "b"),))
