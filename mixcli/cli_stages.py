"""The multi-stage side of `mixcli merge` and `mixcli validate`: the stage table, each stage
checked or merged through the ordinary commands, and its mistakes named by the stage."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from .cli import _console, _print_plan, _show_warnings, merge
from .errors import MixcliError


@contextlib.contextmanager
def _named_by_stage(stage, path: Path):
    """A mistake in a stage is reported against the file the user edits, not the generated one."""
    try:
        yield
    except MixcliError as error:
        message = str(error)
        prefix = f"{stage.file.name}: "
        if message.startswith(prefix):
            message = message[len(prefix):]
        raise MixcliError(f"{path.name}: [[stage]] '{stage.name}': {message}") from None


def stage_plan(path: Path):
    """The stages in order with what a run would do to each, printed as a table."""
    from rich.table import Table

    from . import stages as multi

    order = multi.read_stages(path)
    table = Table(title=f"stages of {path.name}")
    for column in ("stage", "method", "reads", "output", "status"):
        table.add_column(column, overflow="fold")
    for stage in order:
        stage.status = multi.classify(stage, path)
        method = stage.table.get("method", {})
        reads = ", ".join(f"{key} = {value}" for key, value in stage.inputs.items())
        table.add_row(stage.name, str(method.get("name", "?") if isinstance(method, dict) else "?"),
                      reads, stage.output, stage.status)
    _console().print(table)
    return order


def check_ready_stages(path: Path, order, print_plan: bool) -> list[str]:
    """Plan every stage whose inputs exist now (reading no weight); the names of the others."""
    from . import core, engine
    from . import stages as multi

    current = {stage.name for stage in order if stage.status == "up to date"}
    deferred = []
    for stage in order:
        if not set(stage.depends) <= current:
            deferred.append(stage.name)
            continue
        with _named_by_stage(stage, path):
            prepared = core.prepare(stage.file, multi.stage_text(stage, path))
            _show_warnings(prepared)
        if print_plan:
            _print_plan(core.describe(prepared, engine.default_workers()), stage.output)
    return deferred


def merge_stages(path: Path, out, force: bool, dry_run: bool) -> None:
    from . import stages as multi

    if out is not None:
        raise MixcliError(f"{path.name}: --out does not apply to a multi-stage project; set each stage's "
                          "[stage.output] path")
    order = stage_plan(path)
    if dry_run:
        deferred = check_ready_stages(path, order, print_plan=True)
        if deferred:
            _console().print(f"planned when their inputs are built: {', '.join(deferred)}", soft_wrap=True)
        return
    context = click.get_current_context()
    for stage in order:
        if stage.status == "up to date":
            _console().print(f"stage [bold]{stage.name}[/]: up to date ({stage.output})", soft_wrap=True)
            continue
        _console().print(f"stage [bold]{stage.name}[/]: {stage.status} -> {stage.output}", soft_wrap=True)
        from .project import read_project

        with _named_by_stage(stage, path):
            read_project(stage.file, multi.stage_text(stage, path))  # its own mistakes, before writing it
        multi.write_stage_file(stage, path)
        replace = force or stage.status.startswith("rebuild")  # an outdated output of this very stage
        with _named_by_stage(stage, path):
            context.invoke(merge, **dict(context.params, project=stage.file, out=None, force=replace))
        multi.write_record(stage, path)


def check_stages(path: Path) -> None:
    order = stage_plan(path)
    deferred = check_ready_stages(path, order, print_plan=False)
    checked = len(order) - len(deferred)
    note = f"; checked when their inputs are built: {', '.join(deferred)}" if deferred else ""
    _console().print(f"[green]ok[/] {path}: {len(order)} stages in order, {checked} checked against their "
                     f"models{note}", soft_wrap=True)
