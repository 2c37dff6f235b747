"""The one exception type a user ever sees: a one-line message saying what to fix; and
warnings, for what is odd but legal."""

import contextlib


class MixcliError(Exception):
    """A mistake in the user's input or environment.

    The CLI prints ``str(error)`` as a single line and exits non-zero, without a traceback.
    Messages name the file, key or tensor at fault and say what to do about it.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def closest(name: str, choices) -> str:
    """A ``did you mean 'x'?`` suffix for ``name`` among ``choices``, or an empty string."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


_strict = False  # set by --strict: every warning is an error


@contextlib.contextmanager
def strict_warnings(on: bool = True):
    """Within this block every warning is raised as a MixcliError (``--strict``), so a run
    stops before anything is written."""
    global _strict
    previous, _strict = _strict, on
    try:
        yield
    finally:
        _strict = previous


def _strict_error(message: str) -> MixcliError:
    return MixcliError(f"{message} (an error with --strict)")


def warn(message: str) -> None:
    """Odd but legal input: one line on stderr, the run goes on (an error under --strict)."""
    if _strict:
        raise _strict_error(message)
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False).print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


class Warnings(list):
    """Odd but legal things noticed while planning or writing a plan, one line each, kept for
    the CLI to show after planning or after writing. Plugins call :meth:`add`; under
    --strict adding one raises it as a :class:`MixcliError` instead, so nothing is written."""

    def add(self, message: str) -> None:
        message = " ".join(str(message).split())
        if _strict:
            raise _strict_error(message)
        if message not in self:  # the same oddity found twice is shown once
            self.append(message)  # list.append is atomic: merge threads may add at once


def first_line(error: BaseException) -> str:
    """A library exception shortened for a one-line message: its first line, or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
