"""The ``defectflow`` command: one sub-command per workflow module, collected from the modules' ``COMMAND``.

    defectflow ingest | synthesize | train-synth | export-dataset | features | train | evaluate | predict | sweep
               | serve | promote | import-weights | export | bench | demo

User errors (bad config, unreadable data, missing weights, unsatisfiable resources) print one clear message and
exit with status 2; ``-v`` shows debug logs and Ray's own output, ``DEFECTFLOW_TRACEBACK=1`` shows tracebacks.
This module is a leaf: it imports the workflow modules, nothing imports it.
"""

from __future__ import annotations

import argparse
import importlib

from workflows.command import Command, add_common_options, execute

# the order of `defectflow --help`: the flow from images to a served detector, then tools
MODULES = ("ingest", "synthesize", "train_synth", "export_dataset", "features", "train", "evaluate", "predict",
           "sweep", "serve", "promote", "import_weights", "export", "bench", "demo")


def commands() -> dict[str, Command]:
    out = {}
    for name in MODULES:
        cmd: Command = importlib.import_module(f"workflows.{name}").COMMAND
        out[cmd.name] = cmd
    return out


def build_parser(table: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    table = table or commands()
    p = argparse.ArgumentParser(prog="defectflow", description="Turn product-surface images into deployed defect "
                                "detectors on Ray.")
    add_common_options(p, top_level=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    for cmd in table.values():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        add_common_options(sp)
        cmd.add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    table = commands()
    args = build_parser(table).parse_args(argv)
    return execute(table[args.command], args)


if __name__ == "__main__":
    raise SystemExit(main())
