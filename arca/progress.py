"""Progress of long loops (dump, evaluate, faithfulness decodes, `arca inspect`): a tqdm bar with an ETA on a
terminal; anywhere else (a DVC or CI log, a file) a plain log line every `every` seconds and one at the end, never
a bar redrawn with carriage returns. Torch-free (the base layer), so every room can use it.

```python
with progress(total=len(rows), desc="dump arca-r8-s0 step 4: sampling", unit="seq") as bar:
    for batch in batches:
        ...
        bar.update(len(batch))
```
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

log = logging.getLogger("arca.progress")
EVERY_S = 30.0  # seconds between two log lines off a terminal: a 10-minute stage writes ~20 lines, not 10,000
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, ETA {remaining}"


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str | None,
    unit: str = "it",
    every: float = EVERY_S,
    stream: IO[str] | None = None,
) -> tqdm:
    """A tqdm object for a loop of `total` units: a bar with an ETA when `stream` (default stderr) is a terminal,
    else `LogLines` (a line in the `arca.progress` log every `every` seconds). `desc=None`: silent (a disabled
    tqdm, so call sites need no branch); library functions take the label as an argument and default to it."""
    if desc is None:
        return tqdm(iterable, total=total, disable=True)
    stream = sys.stderr if stream is None else stream
    if is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
    return LogLines(iterable, total=total, desc=desc, unit=unit, every=every)


def is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class LogLines(tqdm):
    """tqdm's counting, rate and ETA as log lines: one when the loop starts, then at most one per `every` seconds,
    and a last one on close unless the count is the one last logged. tqdm's own output goes to a sink."""

    def __init__(self, *args: Any, every: float = EVERY_S, logger: logging.Logger = log, **kwargs: Any) -> None:
        self._logger = logger  # before tqdm's __init__, which displays the first line
        self._logged_n: float | None = None
        interval = max(float(every), 0.0)
        kwargs.update(file=_Sink(), mininterval=interval, maxinterval=max(interval, 1e-9), bar_format=LINE_FORMAT)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "" or self.n == self._logged_n:  # clearing a bar, or close() after the last update: no news
            return True
        self._logged_n = self.n
        self._logger.info(msg if msg is not None else self.format_meter(**self.format_dict))
        return True


class _Sink:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
