"""The CLI without the ``bench`` extra (rich, matplotlib): the package, ``info``, ``train`` and ``generate`` work;
``bench`` and ``profile`` refuse with the pip command that installs the extra. And every command's help is its
module's ``HELP``."""

import subprocess
import sys

import pytest

from metagpt_fast import cli

INSTALL = 'pip install "metagpt-fast[bench]"'


@pytest.fixture
def without(monkeypatch):
    """``without("rich", ...)``: those packages (and their loaded submodules) fail to import until the test ends."""

    def block(*packages):
        for name in list(sys.modules):
            if name.partition(".")[0] in packages:
                monkeypatch.setitem(sys.modules, name, None)
        for name in packages:
            monkeypatch.setitem(sys.modules, name, None)

    return block


def test_package_and_info_import_without_the_bench_extra():
    code = (
        "import sys; sys.modules['rich'] = None; sys.modules['matplotlib'] = None\n"
        "import metagpt_fast, metagpt_fast.cli\n"
        "sys.exit(metagpt_fast.cli.main(['info']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "reference" in out.stdout and "available" in out.stdout


@pytest.mark.parametrize("command", [["bench", "--quick"], ["profile", "--steps", "1"]])
def test_bench_and_profile_name_the_extra(without, command, tmp_path, capsys):
    without("rich", "matplotlib")
    assert cli.main([*command, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "rich is needed" in err and INSTALL in err
    assert not any(tmp_path.iterdir())  # refused before running anything


def test_bench_without_matplotlib_suggests_no_plot(without, tmp_path, capsys):
    without("matplotlib")
    assert cli.main(["bench", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "matplotlib is needed" in err and "--no-plot" in err and INSTALL in err


def test_train_prints_lines_without_rich(without, tmp_path, capsys):
    without("rich")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    args = ["train", "--steps", "2", "--batch-size", "1", "--embed-size", "16", "--layers", "1", "--heads", "2"]
    assert cli.main([*args, "--seq-len", "8", "--eval-every", "1", "--data", str(corpus), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step 2/2" in out and "held-out loss" in out and (tmp_path / "ckpt.pt").exists()


def test_every_command_help_is_its_modules_help():
    import importlib

    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    assert set(helps) == set(cli.COMMANDS)
    for name, text in helps.items():
        assert text == importlib.import_module(f"metagpt_fast.commands.{name}").HELP
