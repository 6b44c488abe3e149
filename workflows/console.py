"""What a person sees in the terminal, and the full log kept with the run.

A ``defectflow`` command prints one line per step (and per epoch) and its result; everything else the process
writes — Ray's Python and C++ logs, worker output forwarded to the driver, deprecation warnings, progress UIs of
Ray Data, our own debug lines and tracebacks — goes to a log file, which the command keeps in its own output folder
(``<folder>/logs/<command>-<time>.log``: the first folder a workflow names with :func:`keep_log_in`). That is done at
the file-descriptor level, so even output from C++ (Ray's core worker) lands in the file. With ``-v`` nothing is
redirected and no file is written: the terminal shows everything, at debug level.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

from components import progress, storage

OUR_LOGGERS = ("defectflow", "components", "workflows", "serve_apps")
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Ours(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OUR_LOGGERS


class _NoTraceback(logging.Formatter):
    """The terminal gets the message; the traceback goes to the log file only."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record = copy.copy(record)
            record.exc_info = record.exc_text = record.stack_info = None
        return super().format(record)


@dataclass
class Session:
    command: str
    verbose: bool
    log_path: str | None
    stdout: TextIO
    stderr: TextIO
    saved_fds: tuple[int, int] | None = None  # the original fds 1 and 2 while they point at the log file
    handlers: list[logging.Handler] = field(default_factory=list)
    folder: str | None = None
    started: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S"))
    where: str | None = None  # where the log ended up (set when the session ends)


_session: Session | None = None


def out(text: str) -> None:
    """A result line for the person (stdout of the terminal, also with redirection on)."""
    print(text, file=_session.stdout if _session else sys.stdout, flush=True)


def err(text: str) -> None:
    """An error or status line for the person (stderr of the terminal)."""
    print(text, file=_session.stderr if _session else sys.stderr, flush=True)


def keep_log_in(folder_uri: str) -> None:
    """Copy this command's log into ``<folder_uri>/logs/`` when it ends. The first folder named is the command's
    own (a train run's folder); steps it calls as a library (the feature cache it fills) do not take the log."""
    if _session is not None and _session.folder is None:
        _session.folder = folder_uri


def silence_stdout() -> None:
    """The reader of our stdout went away (``| head``): drop further result lines instead of failing."""
    if _session is not None:
        _session.stdout = open(os.devnull, "w")  # noqa: SIM115  (closed when the session ends)


@contextlib.contextmanager
def session(command: str, verbose: bool = False) -> Iterator[Session]:
    """Console and log file for one command; the terminal is restored whatever happens inside."""
    global _session
    s = _start(command, verbose)
    _session = s
    try:
        yield s
    finally:
        _session = None
        s.where = _finish(s)


def _start(command: str, verbose: bool) -> Session:
    path = None
    saved = None
    if verbose:
        s = Session(command, verbose, None, sys.stdout, sys.stderr)
    else:
        fd, path = tempfile.mkstemp(prefix=f"defectflow-{command}-", suffix=".log")
        os.close(fd)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # append: the log handler writes to the same file
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
        term_out = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        term_err = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        s = Session(command, verbose, path, term_out, term_err, saved_fds=saved)
    console = logging.StreamHandler(s.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(logging.Formatter(FILE_FORMAT, "%H:%M:%S") if verbose
                         else _NoTraceback("%(asctime)s %(message)s", "%H:%M:%S"))
    if not verbose:
        console.addFilter(_Ours())
    s.handlers.append(console)
    if path is not None:
        logfile = logging.FileHandler(path, encoding="utf-8")
        logfile.setFormatter(logging.Formatter(FILE_FORMAT))
        s.handlers.append(logfile)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)  # other libraries' debug output would swamp the file
    for h in s.handlers:
        root.addHandler(h)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)  # our debug lines always reach the file
    logging.captureWarnings(True)  # warnings go through logging: into the file, and to the terminal with -v
    progress.set_stream(s.stderr)
    return s


def _finish(s: Session) -> str | None:
    """Restore the terminal first (nothing below may keep it redirected), then copy the log where the command
    asked, and return where a person can read it."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        if s.saved_fds is not None:
            os.dup2(s.saved_fds[0], 1)
            os.dup2(s.saved_fds[1], 2)
            for fd in s.saved_fds:
                os.close(fd)
    root = logging.getLogger()
    for h in s.handlers:
        root.removeHandler(h)
        h.close()
    progress.set_stream(None)
    logging.captureWarnings(False)
    for stream in (s.stdout, s.stderr):
        if stream not in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(OSError):
                stream.close()
    if s.log_path is None or s.folder is None:
        return s.log_path
    dest = storage.join(s.folder, "logs", f"{s.command}-{s.started}.log")
    try:
        storage.upload_file(s.log_path, dest)
    except Exception as e:  # the log must never turn a finished run into a failure
        logging.getLogger("defectflow").warning("could not copy the log to %s: %s", dest, e)
        return s.log_path
    with contextlib.suppress(OSError):
        os.unlink(s.log_path)
    return dest
