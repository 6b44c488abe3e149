"""What a person sees in the terminal, and the full log kept with the run.

A ``defectflow`` command prints one line per step (and per epoch) and its result; everything else the process
writes — Ray's Python and C++ logs, worker output forwarded to the driver, deprecation warnings, progress UIs of
Ray Data — goes to a log file, which the workflow keeps in its run folder (``<run>/logs/<command>-<time>.log``).
That is done at the file-descriptor level, so even output from C++ (Ray's core worker) lands in the file. With
``-v`` nothing is redirected: the terminal shows everything, at debug level.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TextIO

from components import progress, storage

OUR_LOGGERS = ("defectflow", "components", "workflows", "serve_apps")
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Ours(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OUR_LOGGERS


@dataclass
class _Session:
    command: str
    log_path: str
    stdout: TextIO
    stderr: TextIO
    saved_fds: tuple[int, int] | None = None  # the original fds 1 and 2 while they point at the log file
    handlers: list[logging.Handler] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    started: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S"))


_session: _Session | None = None


def out(text: str) -> None:
    """A result line for the person (stdout of the terminal, also with redirection on)."""
    stream = _session.stdout if _session else sys.stdout
    print(text, file=stream, flush=True)


def err(text: str) -> None:
    """An error or status line for the person (stderr of the terminal)."""
    stream = _session.stderr if _session else sys.stderr
    print(text, file=stream, flush=True)


def start(command: str, verbose: bool = False) -> str:
    """Console and log file for one command; returns the (temporary) log file path."""
    global _session
    if _session is not None:
        finish()
    fd, path = tempfile.mkstemp(prefix=f"defectflow-{command}-", suffix=".log")
    os.close(fd)
    saved = None
    if verbose:
        term_out, term_err = sys.stdout, sys.stderr
    else:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
        term_out = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        term_err = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
        logfd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        os.close(logfd)
    _session = _Session(command=command, log_path=path, stdout=term_out, stderr=term_err, saved_fds=saved)

    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = logging.StreamHandler(term_err)
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S") if not verbose
                         else logging.Formatter(FILE_FORMAT, "%H:%M:%S"))
    if not verbose:
        console.addFilter(_Ours())
        console.setLevel(logging.INFO)
    logfile = logging.FileHandler(path, encoding="utf-8")
    logfile.setFormatter(logging.Formatter(FILE_FORMAT))
    logfile.setLevel(logging.DEBUG)
    for h in (console, logfile):
        root.addHandler(h)
    _session.handlers = [console, logfile]
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # warnings go through logging: into the file, and to the console with -v
    progress.set_stream(term_err)
    return path


def keep_log_in(folder_uri: str) -> None:
    """Copy this command's log into ``<folder_uri>/logs/`` when it ends (the run folder of a workflow)."""
    if _session is not None and folder_uri not in _session.keep:
        _session.keep.append(folder_uri)


def finish() -> str | None:
    """Stop redirecting, copy the log where workflows asked, and return where a person can read it."""
    global _session
    s, _session = _session, None
    if s is None:
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    root = logging.getLogger()
    for h in s.handlers:
        root.removeHandler(h)
        h.close()
    progress.set_stream(None)
    logging.captureWarnings(False)
    if s.saved_fds is not None:
        os.dup2(s.saved_fds[0], 1)
        os.dup2(s.saved_fds[1], 2)
        for fd in s.saved_fds:
            os.close(fd)
        for stream in (s.stdout, s.stderr):
            with contextlib.suppress(OSError):
                stream.close()
    where = s.log_path
    for folder in s.keep:
        dest = storage.join(folder, "logs", f"{s.command}-{s.started}.log")
        try:
            storage.upload_file(s.log_path, dest)
            where = dest
        except Exception as e:  # the log must never turn a finished run into a failure
            logging.getLogger("defectflow").warning("could not copy the log to %s: %s", dest, e)
    if where != s.log_path:
        with contextlib.suppress(OSError):
            os.unlink(s.log_path)
    return where
