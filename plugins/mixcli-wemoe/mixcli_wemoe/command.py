"""``mixcli adapt PROJECT.toml``: build the project's model in memory, train its routers with
the project's ``[adapt]`` settings (defaults without one), write it atomically.

Under ``torchrun --nproc_per_node N -m mixcli adapt ...`` every process builds the model,
takes 1/N of each task's batch and averages router gradients (mixcli's training runtime:
gloo on CPU, nccl on CUDA); process 0 writes the output.
"""

from __future__ import annotations

from pathlib import Path

import click

METHODS = ("we_moe", "sparse_we_moe", "rank_one_moe", "pwe_moe")


def adapt_project(project: Path, out: Path | None = None, force: bool = False, device: str | None = None,
                  max_steps: int | None = None, progress: bool = False, log=None) -> Path | None:
    """The command's work; returns the output folder (None on processes other than 0)."""
    from mixcli import MixcliError, core

    from . import adapt

    log = log or (lambda message: click.echo(message, err=True))
    registry = core.get_registry()
    proj, method = core.load_project(project, registry)
    if proj.method not in METHODS:
        raise MixcliError(f"{proj.where}: [method] '{proj.method}' has no routers to adapt; "
                          f"mixcli adapt takes {', '.join(METHODS)}")
    target = Path(out or proj.output_path or "")
    if not (out or proj.output_path):
        raise MixcliError(f"{proj.where}: no output path; add [output] path = \"...\" or pass --out")
    where = f"{proj.where}: [adapt]"
    opts = adapt.settings(dict(proj.sections.get("adapt", {})), where, pwe=proj.method == "pwe_moe")
    if device:
        opts["device"] = device
    if max_steps is not None:
        opts["max_steps"] = max_steps
    from mixcli.training import distributed

    with distributed(opts["device"]) as world:
        return _adapt(proj, project, target, opts, force, where, log, progress, world)


def _adapt(proj, project: Path, target: Path, opts: dict, force: bool, where: str, log, progress: bool, world):
    from mixcli import core, engine
    from mixcli.target import protected_folders

    from . import adapt
    from .construction import model_from_plan

    if world.main:
        engine.check_target(target.absolute(), force, protected_folders(proj), proj.file)
    prepared = core.prepare(project)
    plan = prepared.plan
    model = model_from_plan(plan)
    folders = {name: ckpt.path for name, ckpt in prepared.models.items()}
    seed = proj.seed if opts["seed"] is None else opts["seed"]
    record = adapt.run(model, folders, opts, seed, where, log=log if world.main else (lambda m: None),
                       progress=progress and world.main)
    if not world.main:
        return None
    recipe = core.recipe(proj)
    card = core.model_card(prepared, recipe, title=target.name, step=(
        "its routers were then trained by `mixcli adapt` with the recipe's [adapt] settings "
        "(adapt_log.json): `mixcli adapt mixcli.toml --out NEW` repeats it."))
    adapted = adapt.adapted_plan(plan, model.cpu(), record, folders)
    written = engine.write_plan(adapted, target, force=force, shard_size=proj.shard_size,
                                card=card, recipe=recipe,
                                copy_tokenizer=proj.copy_tokenizer, progress=False,
                                protected=protected_folders(proj, prepared.models), project_file=proj.file)
    log(f"wrote {written}")
    return written


def add_commands(cli) -> None:
    if "adapt" in getattr(cli, "commands", {}):
        return

    @cli.command("adapt")
    @click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder (overrides [output] path).")
    @click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
    @click.option("--device", help="torch device (overrides [adapt] device).")
    @click.option("--max-steps", type=click.IntRange(0), help="Optimizer steps (overrides [adapt] max_steps).")
    @click.option("--no-progress", is_flag=True, help="No progress bar.")
    def adapt_command(project, out, force, device, max_steps, no_progress):
        """Train the routers of a WE-MoE-family PROJECT ([adapt] table) and write the model."""
        adapt_project(project, out, force, device, max_steps, progress=not no_progress)
