"""``qfl train``: a real child process, its output, its errors and its peak memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Through edge.cli.main, as the installed ``qfl`` script runs it.
QFL = [sys.executable, "-c", "import sys; from edge.cli import main; sys.exit(main())", "train"]


def qfl_train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QFL, *args], capture_output=True, text=True, timeout=120)


def test_json_output() -> None:
    out = qfl_train("--dataset", "digits", "--model", "mlp", "--bits", "6", "--epochs", "3", "--seed", "1", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    required = {"accuracy", "bits", "epochs", "seconds", "params", "mode", "model", "dataset", "seed", "loss"}
    assert required <= set(report)
    assert report["bits"] == 6 and report["epochs"] == 3 and report["seed"] == 1
    assert report["params"] == 2410 and report["mode"] == "int" and report["model"] == "mlp"
    assert report["dataset"] == "digits" and report["iterations"] == 3 * (1348 // 32)
    assert 0.8 < report["accuracy"] <= 1.0 and report["loss"] > 0 and report["seconds"] > 0
    assert "epoch" not in out.stderr  # no progress with --json


@pytest.mark.slow  # three child processes
def test_same_seed_same_result_other_seed_other_result() -> None:
    args = ("--model", "cnn", "--bits", "4", "--epochs", "1", "--json")
    first, again, other = (json.loads(qfl_train(*args, "--seed", seed).stdout) for seed in ("3", "3", "4"))
    assert first["accuracy"] == again["accuracy"] and first["loss"] == again["loss"]
    assert first["loss"] != other["loss"]


def test_text_output_with_progress_per_epoch() -> None:
    out = qfl_train("--bits", "32", "--epochs", "2", "--mode", "master", "--momentum", "0.5", "--lr", "0.1")
    assert out.returncode == 0, out.stderr
    progress = out.stderr.strip().splitlines()
    assert [line.split()[1] for line in progress] == ["1/2", "2/2"]
    assert "test accuracy" in progress[0]
    assert out.stdout.startswith("test accuracy ") and "32 bits" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "0"], "--bits must be from 1 to 32"),
        (["--bits", "33"], "--bits must be from 1 to 32"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--momentum", "1"], r"--momentum must be in [0, 1)"),
        (["--model", "resnet"], "unknown model 'resnet'"),
        (["--model", "cnn-mnist"], "takes inputs of shape (1, 28, 28), but dataset 'digits' has (64,)"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--dataset", "mnist:/nonexistent/dir"], "cannot load dataset 'mnist:/nonexistent/dir'"),
    ],
)
def test_bad_arguments_give_one_clear_line(args: list[str], message: str) -> None:
    out = qfl_train(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_argparse_rejects_an_unknown_mode() -> None:
    out = qfl_train("--mode", "float")
    assert out.returncode == 2 and "invalid choice: 'float'" in out.stderr


def test_peak_memory_of_training_the_digits_mlp() -> None:
    """ru_maxrss of the child, measured by a wrapper whose only child is ``qfl train``."""
    wrapper = (
        "import json, resource, subprocess, sys\n"
        f"done = subprocess.run({[*QFL, '--epochs', '20', '--json']!r}, capture_output=True)\n"
        "peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'rc': done.returncode, 'peak_mib': peak_kib / 1024}))\n"
    )
    result = json.loads(subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True,
                                       timeout=120, check=True).stdout)
    assert result["rc"] == 0
    assert result["peak_mib"] <= 80, result
