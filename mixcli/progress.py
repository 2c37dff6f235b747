"""One progress display for every long step: merging, training, tuning, adapting, evaluating.

``with progress("tuning routers", total=1000, unit="steps") as bar: bar.advance(loss=0.12)``

- on a terminal, a rich bar: done/total, elapsed time, time remaining, the latest fields
  (``loss=...``); bars opened while another is shown join the same display (rich allows one
  live display at a time);
- on a log file or a pipe, plain lines, one each time another tenth of the work is done and
  at least ``LINE_INTERVAL`` seconds have passed, and one at the end if any was printed: no
  carriage returns, and steps shorter than the interval print nothing;
- ``enabled=False``: nothing.

``quiet_libraries()`` turns off transformers' and datasets' own bars ("Writing model shards",
"Loading weights"), which these replace. ``console()`` is a rich console that never
truncates a table when its output is not a terminal.
"""

from __future__ import annotations

import sys
import threading
import time

LINE_INTERVAL = 10.0  # seconds between plain progress lines in logs
_lock = threading.RLock()
_shared = None  # the rich Progress on screen, shared by nested bars
_users = 0


def console(stderr: bool = False):
    """A rich console; writing to a file or a pipe, lines are as wide as their content."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return Console(file=stream, highlight=False, width=None if terminal else 1000, soft_wrap=not terminal)


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars (ours show the same work)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if "datasets" in sys.modules:  # importing datasets only to silence it costs a second
        sys.modules["datasets"].disable_progress_bars()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _amount(value: float, unit: str) -> str:
    if unit == "bytes":
        for size, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= size:
                return f"{value / size:.1f} {suffix}"
        return f"{int(value)} B"
    return f"{int(value)}"


def _fields(fields: dict) -> str:
    return "  ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in fields.items())


class Bar:
    """One unit of work with a known total; ``advance`` is thread-safe."""

    def __init__(self, description: str, total: float, unit: str = "steps", enabled: bool = True,
                 transient: bool = False, stream=None, interval: float | None = None):
        self.description, self.total, self.unit = description, max(float(total), 1.0), unit
        self.enabled, self.transient = enabled, transient
        self.interval = LINE_INTERVAL if interval is None else interval
        self.stream = stream or sys.stderr
        self.done, self.fields = 0.0, {}
        self._printed_at = self._next_tenth = None
        self._rich = self._task = None
        self._lock = threading.Lock()

    def start(self) -> "Bar":
        """Show the bar (``with`` does this); returns the bar."""
        self.started = time.monotonic()
        self._printed_at, self._next_tenth = self.started, 0.1
        if self.enabled and self.stream.isatty():
            self._rich_start()
        return self

    def close(self, finished: bool | None = None) -> None:
        """Take the bar down (``with`` does this). A bar closed unfinished (after an error;
        by default, short of its total) prints no final line."""
        if finished is None:
            finished = self.done >= self.total
        if self._rich is not None:
            self._rich_stop(finished)
        elif self.enabled and finished and self._printed_at != self.started:
            self._line(final=True)

    def __enter__(self) -> "Bar":
        return self.start()

    def __exit__(self, kind, error, traceback) -> None:
        self.close(finished=kind is None)

    def advance(self, amount: float = 1, description: str | None = None, **fields) -> None:
        """``amount`` more done; ``fields`` (``loss=0.12``) are shown beside the count."""
        with self._lock:
            self.done = min(self.done + amount, self.total)
            self.fields.update(fields)
            if description is not None:
                self.description = description
            if self._rich is not None:
                self._rich.update(self._task, completed=self.done, description=self.description,
                                  fields=_fields(self.fields))
            elif self.enabled and self.done / self.total >= self._next_tenth:
                self._next_tenth = int(self.done / self.total * 10 + 1) / 10
                if time.monotonic() - self._printed_at >= self.interval and self.done < self.total:
                    self._line(final=False)

    def _line(self, final: bool) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        count = f"{_amount(self.done, self.unit)}/{_amount(self.total, self.unit)}"
        unit = "" if self.unit == "bytes" else f" {self.unit}"
        if final:
            timing = f"in {_duration(elapsed)}"
        else:
            left = elapsed * (self.total - self.done) / self.done if self.done else 0.0
            timing = f"{_duration(elapsed)} elapsed, about {_duration(left)} left"
        shown = _fields(self.fields)
        print(f"{self.description}: {count}{unit} ({100 * self.done / self.total:.0f}%), {timing}"
              + (f"  {shown}" if shown else ""), file=self.stream, flush=True)
        self._printed_at = now

    def _rich_start(self) -> None:
        global _shared, _users
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with _lock:
            if _shared is None:
                _shared = Progress(TextColumn("[bold]{task.description}"), BarColumn(), _count_column(),
                                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                   TextColumn("{task.fields[fields]}"), console=Console(file=self.stream))
                _shared.start()
            _users += 1
            self._rich = _shared
            self._task = _shared.add_task(self.description, total=self.total, fields="", unit=self.unit)

    def _rich_stop(self, finished: bool) -> None:
        global _shared, _users
        with _lock:
            if finished:
                self._rich.update(self._task, completed=self.done)
            if self.transient:
                self._rich.remove_task(self._task)
            _users -= 1
            if _users == 0:
                _shared.stop()
                _shared = None
        self._rich = None


def _count_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Count(ProgressColumn):
        """done/total in the bar's unit (sizes and speed for bytes)."""

        def render(self, task):
            unit = task.fields["unit"]
            shown = f"{_amount(task.completed, unit)}/{_amount(task.total, unit)}"
            if unit != "bytes":
                shown += f" {unit}"
            elif task.speed:
                shown += f" {_amount(task.speed, unit)}/s"
            return Text(shown, style="progress.download")

    return Count()


def progress(description: str, total: float, unit: str = "steps", enabled: bool = True,
             transient: bool = False) -> Bar:
    """A bar for ``total`` units of work (``unit="bytes"`` shows sizes); use it as a context manager."""
    return Bar(description, total, unit, enabled, transient)
