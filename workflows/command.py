"""What a workflow module declares to become a ``defectflow`` command, and how every command is run.

Each step module ends with ``COMMAND = Command(...)`` (its name, help, arguments, the function doing the work and
the lines a person reads at the end) and ``if __name__ == "__main__": raise SystemExit(main(COMMAND))``, so
``python -m workflows.<step> ...`` and ``defectflow <step> ...`` are the same code. ``workflows/cli.py`` only
collects the modules' commands into one parser (anomalib's verb table); nothing imports the CLI.

Exit codes: 0 success; 1 the command ran but some inputs failed (``predict``: some images unreadable, the rest
written); 2 a user error (bad config, unreadable data, missing weights, unsatisfiable resources), printed as one
``error:`` line and a ``hint:`` without a traceback; 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from components.errors import DefectflowError
from workflows import console

log = logging.getLogger("defectflow")


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]
    report: Callable[[Any], str | None] | None = None  # what to print when it is done
    exit_code: Callable[[Any], int] | None = None  # 0 unless the command says otherwise


def add_common_options(p: argparse.ArgumentParser, top_level: bool = False) -> None:
    """``-v`` and ``--json``, accepted before or after the command name."""
    default = False if top_level else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="debug logging, Ray's own logs and progress bars on the console")
    p.add_argument("--json", action="store_true", default=default,
                   help="print the command's result as JSON on stdout")


def add_config_options(p: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    """``--config`` and ``--set``, the options of every config-driven command."""
    p.add_argument("--config", required=required, help=f"YAML {what} config (ready ones in workflows/configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; values are YAML, e.g. --set optim.epochs=3")


def parser_for(command: Command) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m workflows.{command.name.replace('-', '_')}",
                                description=command.help)
    add_common_options(p, top_level=True)
    command.add_arguments(p)
    return p


def jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(obj).items() if not isinstance(v, bytes)}
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items() if not isinstance(v, bytes)}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def execute(command: Command, args: argparse.Namespace) -> int:
    """Run a parsed command: console and log file, user errors as one line (exit 2), the report, the exit code."""
    verbose = bool(getattr(args, "verbose", False))
    with console.session(command.name, verbose) as session:
        try:
            code = _run(command, args)
        finally:
            _stop_ray()  # inside the session: Ray flushes its last (deduplicated) worker logs at shutdown
    if session.where and not verbose:
        print(f"log: {session.where}", file=sys.stderr, flush=True)
    return code


def _run(command: Command, args: argparse.Namespace) -> int:
    try:
        result = command.run(args)
        text = command.report(result) if command.report is not None else None
        if text:
            console.out(text)
        if getattr(args, "json", False):
            console.out(json.dumps(jsonable(result), default=str, indent=2))
        return command.exit_code(result) if command.exit_code is not None else 0
    except DefectflowError as e:
        if os.environ.get("DEFECTFLOW_TRACEBACK"):
            raise
        log.debug("user error", exc_info=True)
        console.err(f"error: {e.message}")
        if e.hint:
            console.err(f"  hint: {e.hint}")
        return 2
    except KeyboardInterrupt:
        console.err("interrupted")
        return 130
    except BrokenPipeError:  # result piped into `head` and friends: the reader has what it wanted
        console.silence_stdout()
        return 0
    except Exception as e:
        if os.environ.get("DEFECTFLOW_TRACEBACK"):
            raise
        log.exception("unexpected failure")  # the traceback goes to the log file only
        console.err(f"error: unexpected failure: {type(e).__name__}: {e}"[:2000])
        return 1


def _stop_ray() -> None:
    """Disconnect from Ray (a local instance this process started ends with it) if the command used it."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def main(command: Command, argv: list[str] | None = None) -> int:
    """Entry for ``python -m workflows.<step>``: the same as ``defectflow <step> ...``."""
    return execute(command, parser_for(command).parse_args(argv))
