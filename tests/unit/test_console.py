"""The console layer a person meets in every command: one line per step on the terminal, everything else in the
log file, user errors as one line (exit 2), unexpected failures as one line with the traceback in the log (exit 1),
and the terminal always given back (no Ray here: fake commands)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from components.errors import ConfigError
from workflows import console
from workflows.command import Command, execute


def _run(capfd, fn, folder: Path | None = None, verbose: bool = False) -> tuple[int, str, str]:
    def run(args):
        if folder is not None:
            console.keep_log_in(str(folder))
        return fn()

    code = execute(Command("fake", "a test command", lambda p: None, run, report=lambda r: f"result: {r}"),
                   argparse.Namespace(verbose=verbose, json=False))
    out, err = capfd.readouterr()
    return code, out, err


def _noisy() -> str:
    logging.getLogger("defectflow.fake").info("step one done")
    logging.getLogger("defectflow.fake").debug("a detail for the log")
    # a library's own logging (Ray's loggers write to sys.stderr, i.e. fd 2 in a real process — under pytest that is
    # its capture object, so the e2e demo test checks Ray's lines in the log file and this one a propagating logger)
    logging.getLogger("urllib3.connectionpool").info("Running Dataset ...")
    os.write(1, b"printed by a library\n")  # print() under pytest goes to its capture, not fd 1
    os.write(2, b"written by C++ straight to fd 2\n")
    return "42"


def test_the_terminal_shows_our_lines_and_the_log_file_keeps_everything(capfd, tmp_path):
    code, out, err = _run(capfd, _noisy, folder=tmp_path / "run")
    assert code == 0 and out == "result: 42\n"
    assert "step one done" in err and "Running Dataset" not in err and "C++" not in err and "printed" not in err
    log_line = err.strip().splitlines()[-1]
    assert log_line.startswith("log: ") and log_line.endswith(".log")
    text = Path(log_line[5:]).read_text()
    assert Path(log_line[5:]).parent == tmp_path / "run" / "logs"
    for line in ("step one done", "a detail for the log", "Running Dataset", "printed by a library", "C++"):
        assert line in text, line
    os.write(1, b"fd 1 is ours again\n")
    assert capfd.readouterr().out == "fd 1 is ours again\n"


def test_user_errors_are_one_line_and_unexpected_ones_keep_their_traceback_in_the_log(capfd):
    def user_error():
        raise ConfigError("bad key x", "remove it")

    code, _, err = _run(capfd, user_error)
    assert code == 2 and "error: bad key x\n  hint: remove it\n" in err and "Traceback" not in err

    def bug():
        raise ZeroDivisionError("boom")

    code, _, err = _run(capfd, bug)
    assert code == 1 and "error: unexpected failure: ZeroDivisionError: boom" in err and "Traceback" not in err
    log_file = Path(err.strip().splitlines()[-1][5:])
    assert "Traceback" in log_file.read_text() and "ZeroDivisionError" in log_file.read_text()


def test_interrupts_and_closed_pipes_give_the_terminal_back(capfd):
    def interrupted():
        raise KeyboardInterrupt

    code, _, err = _run(capfd, interrupted)
    assert code == 130 and "interrupted" in err

    def reader_gone():
        raise BrokenPipeError

    code, _, _ = _run(capfd, reader_gone)
    assert code == 0
    print("stdout works after both")
    assert capfd.readouterr().out == "stdout works after both\n"


def test_verbose_shows_everything_and_writes_no_log_file(capfd, tmp_path):
    code, out, err = _run(capfd, _noisy, folder=tmp_path / "run", verbose=True)
    assert code == 0 and "printed by a library" in out and "C++" in err and "a detail for the log" in err
    assert not (tmp_path / "run" / "logs").exists() and "log: " not in err
