"""The ``mixcli extract-lora`` command: parses, calls :mod:`mixcli_lora.extract`, prints the table."""

from __future__ import annotations

import re
from pathlib import Path

import click

from mixcli.errors import MixcliError


def _ref(label: str, value: str):
    from mixcli.project import ModelRef, model_and_lora

    path, lora = model_and_lora({"path": value}, Path.cwd(), label)
    return ModelRef(name=label.lstrip("-"), path=path, project_dir=Path.cwd(), where=label, lora=lora)


def _patterns(option: str, values) -> tuple[str, ...]:
    for value in values:
        try:
            re.compile(value)
        except re.error as error:
            raise MixcliError(f"{option} {value!r}: not a valid regular expression ({error})") from None
    return tuple(values)


@click.command("extract-lora")
@click.option("--base", "base_path", required=True, metavar="MODEL",
              help="The base model: folder, Hub id, or MODEL+ADAPTER.")
@click.option("--model", "model_path", required=True, metavar="MODEL",
              help="The fine-tune: folder, Hub id, or MODEL+ADAPTER.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The adapter folder to write.")
@click.option("--max-rank", type=click.IntRange(1), default=128, show_default=True, help="Rank cap per module.")
@click.option("--sv-epsilon", "--sv-threshold", "sv_epsilon", type=click.FloatRange(0), default=0.0,
              show_default=True, help="If > 0, keep only singular values above it (a module left with "
                                      "none is dropped and reported).")
@click.option("--distribute-scale/--no-distribute-scale", default=True, show_default=True,
              help="Split the singular values' square roots between A and B (else S goes to A).")
@click.option("--embed-lora/--no-embed-lora", default=False, show_default=True,
              help="Decompose embeddings too, instead of saving them whole (modules_to_save).")
@click.option("--save-module", "save_modules", multiple=True, metavar="NAME",
              help="Save this module whole (full name or last component; repeatable).")
@click.option("--include-regex", "-i", "include", multiple=True, metavar="REGEX",
              help="Only modules whose name matches (re.search; repeatable).")
@click.option("--exclude-regex", "-e", "exclude", multiple=True, metavar="REGEX",
              help="Leave out modules whose name matches (re.search; repeatable).")
@click.option("--skip-undecomposable", is_flag=True,
              help="Leave out changed modules that are not Linear or Embedding (norms) instead of saving them whole.")
@click.option("--device", default="cpu", show_default=True, help="torch device for the SVDs.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
def extract_lora(base_path, model_path, out, max_rank, sv_epsilon, distribute_scale, embed_lora, save_modules,
                 include, exclude, skip_undecomposable, device, force):
    """Write the difference between a fine-tune (--model) and its base (--base) as a PEFT LoRA
    adapter, by a truncated SVD per module; print each module's relative reconstruction error."""
    from mixcli.core import open_model
    from mixcli.engine import check_target
    from mixcli.plugins import get_registry

    from .extract import Settings, extract, write_adapter

    settings = Settings(max_rank=max_rank, sv_epsilon=sv_epsilon, distribute_scale=distribute_scale,
                        embed_lora=embed_lora, save_modules=tuple(save_modules),
                        include=_patterns("--include-regex", include), exclude=_patterns("--exclude-regex", exclude),
                        skip_undecomposable=skip_undecomposable, device=device)
    refs = {"--base": _ref("--base", base_path), "--model": _ref("--model", model_path)}
    protected = {}
    for label, ref in refs.items():
        for what, path in (("the folder", ref.path), ("the adapter folder", ref.lora)):
            if path and (Path.cwd() / Path(path).expanduser()).is_dir():
                protected[f"{what} of {label}"] = Path.cwd() / Path(path).expanduser()
    check_target(out.absolute(), force, protected)  # before any work
    registry = get_registry()
    base = open_model(refs["--base"], registry)
    finetune = open_model(refs["--model"], registry)
    for label, ckpt in (("--base", base), ("--model", finetune)):
        protected[f"the folder of {label}"] = Path(ckpt.path)
    extraction = extract(base, finetune, settings, base_path)
    written = write_adapter(extraction, out, force, base_path, model_path, protected)
    _print(extraction, written)


def _print(extraction, written: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    for warning in extraction.warnings:
        Console(stderr=True, highlight=False).print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    table = Table(title="extracted LoRA: relative reconstruction error ‖Δ − B·A‖ / ‖Δ‖ per module")
    for column in ("module", "kind", "rank", "shape", "rel. error"):
        table.add_column(column, justify="right" if column in ("rank", "rel. error") else "left")
    for r in extraction.results:
        table.add_row(r.module, r.kind, "-" if r.rank is None else str(r.rank), "×".join(map(str, r.shape)),
                      f"{r.error:.4g}")
    table.add_section()
    table.add_row("total", "", str(extraction.config["r"]) + " (max)", "", f"{extraction.total_error:.4g}")
    console.print(table)
    console.print(f"[green]wrote[/] {written} ({sum(r.kind == 'lora' for r in extraction.results)} LoRA modules, "
                  f"{sum(r.kind == 'saved' for r in extraction.results)} saved whole)")
