"""The qfl dispatcher: help, unknown commands, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge.cli import COMMANDS, main


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_says_what_exists(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["trian"])
    assert exc.value.code == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def registered_modules() -> list[tuple[str, str]]:
    """(command, module) for every command and every action of a command group."""
    found = []
    for name, entry in COMMANDS.items():
        actions = entry.items() if isinstance(entry, dict) else [("", entry)]
        found += [(f"{name} {action}".strip(), module) for action, (module, _) in actions]
    return found


def test_every_registered_module_has_configure_and_run() -> None:
    import importlib

    for name, module_name in registered_modules():
        module = importlib.import_module(module_name)
        assert callable(module.configure) and callable(module.run), name


def test_a_command_group_lists_its_actions_and_rejects_others(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["meter"]) == 2
    out = capsys.readouterr().out
    assert "read" in out and "emulate" in out
    with pytest.raises(SystemExit) as exc:
        main(["meter", "emulat"])
    assert exc.value.code == 2
    assert "unknown command 'emulat'; choose one of: read, emulate" in capsys.readouterr().err


def test_an_interrupt_while_a_command_loads_is_one_line_and_status_130(tmp_path) -> None:
    # A Ctrl-C that lands while the subcommand's module is still being imported, made certain by a
    # module that raises it on import.
    (tmp_path / "interrupted_on_import.py").write_text("raise KeyboardInterrupt\n", encoding="utf-8")
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
            "from edge import cli\n"
            "cli.COMMANDS['slow'] = ('interrupted_on_import', 'a command slow to load')\n"
            "raise SystemExit(cli.main(['slow']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130
    assert done.stderr == "qfl: interrupted\n"


def test_dispatch_imports_only_the_command_it_runs() -> None:
    code = (
        "import sys, json, contextlib, io\n"
        "from edge.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['partition', '--help'])\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('basestation', 'sklearn', 'matplotlib', 'rich'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_help_shows_each_default_once_and_no_empty_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["testbed", "--help"], ["export", "--help"], ["solve", "--help"], ["basestation", "serve", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in out and "(default: False)" not in out and "(default: )" not in out, argv
        assert "``" not in out, argv
    with pytest.raises(SystemExit):
        main(["testbed", "--help"])
    assert "--rounds ROUNDS federated rounds to run (default: 10)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv, message", [
    (["train", "--seed", "-1"], "argument --seed: a seed must be 0..4294967295, got -1"),
    (["solve", "--seed", "x"], "argument --seed: expected an integer, got 'x'"),
])
def test_a_bad_seed_names_the_option(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_path_that_cannot_be_used_is_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("a file where a folder belongs\n")
    assert main(["broker", "run", "--dir", str(not_a_folder)]) == 2
    err = capsys.readouterr().err
    assert err == f"qfl broker: error: File exists: {not_a_folder}\n"


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    # `qfl solve --json | head -c0`: stdout's reader has gone before anything is written.
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "solve", "--json", "--draws", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and b"Traceback" not in err and b"BrokenPipe" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["--autosave", "0"], "--autosave must be at least 1 second, got 0"),
    (["--require-certificate"], "--require-certificate needs TLS with a CA"),
])
def test_broker_options_that_cannot_work_are_refused(argv: list[str], message: str, tmp_path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["broker", "run", "--dir", str(tmp_path / "broker"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "broker").exists()


def test_provisioning_names_only_boards_with_a_profile(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["broker", "provision", "--experiment", "e", "--devices", "1", "--broker-url", "mqtt://127.0.0.1:1883",
              "--out", str(tmp_path / "p"), "--board", "pi3"])
    assert exc.value.code == 2 and "choose from 'pi-zero-2w', 'pi4', 'pi5'" in capsys.readouterr().err
