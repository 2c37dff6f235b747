"""The one exception type a user ever sees: a one-line message saying what to fix."""


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


def warn(message: str) -> None:
    """Odd but legal input: one line on stderr, the run goes on."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False).print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)
