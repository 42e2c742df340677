"""CLI smoke tests: info, train (tiny), generate, errors."""

import json
import subprocess
import sys

import pytest

from metagpt_fast.cli import main


def test_info_json_lists_backends(capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["backends"]["reference"] is None
    assert {"python", "torch", "triton", "device"} <= set(facts)


def test_console_script_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "metagpt_fast.cli", "info"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "reference" in out.stdout


def test_train_then_generate(tmp_path, capsys):
    args = [
        "train",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--embed-size",
        "16",
        "--layers",
        "1",
        "--heads",
        "2",
        "--seq-len",
        "16",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--eval-every",
        "2",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and (tmp_path / "ckpt.pt").exists()
    assert main(args[:2] + ["6"] + args[3:] + ["--resume"]) == 0
    assert "step 6" in capsys.readouterr().out
    assert (
        main(["generate", "--checkpoint", str(tmp_path / "ckpt.pt"), "--prompt", "def f(", "--max-new-tokens", "8"])
        == 0
    )
    assert capsys.readouterr().out.startswith("def f(")


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--steps", "0"], "--steps must be >= 1"),
        (["train", "--heads", "3", "--embed-size", "16"], "divisible by num_heads"),
        (["train", "--data", "/nonexistent/corpus"], "no such file"),
        (["generate", "--checkpoint", "/nonexistent/ckpt.pt"], "checkpoint not found"),
    ],
)
def test_errors_are_reported_not_raised(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err
