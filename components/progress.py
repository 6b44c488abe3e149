"""Progress bars of long local loops, drawn where a person looks.

The ``defectflow`` command sends everything the process writes (Ray's C++ and Python logs, worker output) to the
run's log file and keeps the terminal for people; it points :func:`set_stream` at the terminal so the library's
few progress bars still reach it. Without that call bars go to stderr, as tqdm's do.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
MIN_TOTAL = 200  # shorter loops finish before a bar says anything useful

_stream: TextIO | None = None


def set_stream(stream: TextIO | None) -> None:
    global _stream
    _stream = stream


def bar(it: Iterable[T], total: int, desc: str, unit: str = "it", min_total: int = MIN_TOTAL,
        enabled: bool = True) -> Iterable[T]:
    """A tqdm bar for long loops only (and only when ``enabled``). TQDM_DISABLE=1 still silences every bar (an
    explicit ``disable=False`` would override it, so it is only ever passed as True)."""
    kw: dict[str, Any] = {"disable": True} if total < min_total or not enabled else {}
    return tqdm(it, total=total, desc=desc, unit=unit, leave=False, file=_stream or sys.stderr, **kw)
