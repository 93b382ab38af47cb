"""Progress for long work (gate learning, fine-tuning, data synthesis, benchmarks): a tqdm bar
on a terminal; where the output is not one (CI, ``nohup``, a log file, a notebook's captured
output), a plain line every ~10% instead of hundreds of carriage-return redraws in the log."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import IO, Any

from tqdm import tqdm


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    file: IO[str] | None = None,
) -> Any:
    """A tqdm bar when ``file`` (default ``sys.stderr``) is a terminal or the bar is disabled,
    else a ``PlainProgress``; both take ``update``, ``set_postfix``, ``close``, iteration and
    ``with``."""
    stream = sys.stderr if file is None else file
    if disable or _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, file=stream)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class PlainProgress:
    """Writes ``desc: n/total unit (p%), elapsed, postfix`` as a whole line each time the count
    crosses another tenth of ``total`` (and once at the end); without a total, each time the
    count doubles."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        file: IO[str],
    ) -> None:
        if total is None and isinstance(iterable, Sized):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit, self.file = (
            iterable,
            total,
            desc,
            unit,
            file,
        )
        self.n = 0
        self.reported = 0  # the count at the last line written
        self.postfix = ""
        self.start = time.monotonic()
        self.closed = False

    def _due(self) -> bool:
        if self.total:
            return 10 * self.n // self.total > 10 * self.reported // self.total
        return self.n >= 2 * max(self.reported, 1) or self.reported == 0

    def _write(self) -> None:
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n // self.total}%)" if self.total else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        elapsed = time.monotonic() - self.start
        line = f"{self.desc + ': ' if self.desc else ''}{count} {self.unit}{share}, "
        self.file.write(f"{line}{elapsed:.0f} s{postfix}\n")
        self.file.flush()
        self.reported = self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._due():
            self._write()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed and self.n != self.reported:
            self._write()
        self.closed = True

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "PlainProgress made without an iterable"
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
