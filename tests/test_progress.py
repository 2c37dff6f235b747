"""The shared progress display: plain lines for logs, a rich bar for terminals, nothing when off."""

import io

from mixcli.progress import Bar, console


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_logs_get_plain_lines_with_counts_eta_and_loss_and_no_carriage_returns():
    log = io.StringIO()
    with Bar("training", 20, stream=log, interval=0.0) as bar:
        for step in range(20):
            bar.advance(loss=1.0 / (step + 1))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    # one line per tenth (the last one is the final line), each with the count and the latest loss
    assert len(lines) == 10
    assert lines[0].startswith("training: 2/20 steps (10%), ") and "left  loss 0.5000" in lines[0]
    assert lines[-1].startswith("training: 20/20 steps (100%), in ") and lines[-1].endswith("loss 0.0500")


def test_short_steps_print_nothing_to_logs_and_a_disabled_bar_prints_nothing_anywhere():
    log = io.StringIO()
    with Bar("evaluating", 5, stream=log) as bar:  # the default interval (10 s) is longer than this step
        for _ in range(5):
            bar.advance()
    assert log.getvalue() == ""
    screen = Terminal()
    with Bar("merging", 1000, unit="bytes", enabled=False, stream=screen, interval=0.0) as bar:
        bar.advance(1000)
    assert screen.getvalue() == ""


def test_a_bar_opened_inside_another_joins_the_same_terminal_display():
    screen = Terminal()
    with Bar("adapting routers", 4, stream=screen) as outer:
        for _ in range(2):
            outer.advance(entropy=0.25)
        with Bar("evaluating base", 3, unit="images", stream=screen, transient=True) as inner:
            assert inner._rich is outer._rich  # rich shows one live display at a time
            inner.advance(3)
        outer.advance(2)
    shown = screen.getvalue()
    assert "adapting routers" in shown and "4/4 steps" in shown and "entropy 0.2500" in shown
    assert "evaluating base" in shown


def test_the_console_does_not_truncate_tables_in_logs(monkeypatch):
    from rich.table import Table

    log = io.StringIO()
    monkeypatch.setattr("sys.stdout", log)
    table = Table(title="vision")
    for name in ["model"] + [f"a long column name {i}" for i in range(8)]:
        table.add_column(name)
    table.add_row("individual experts (MLP-only)", *["0.123"] * 8)
    console().print(table)
    assert "individual experts (MLP-only)" in log.getvalue()
    assert "a long column name 7" in log.getvalue() and "…" not in log.getvalue()
