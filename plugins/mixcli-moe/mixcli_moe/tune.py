"""``mixcli tune PROJECT.toml``: train the routers of an MoE built by moe_merge/moe_upcycle.

Reads the project's ``[tune]`` table (keys in :data:`KEYS`), loads the output model (or
``--model``), freezes everything but the routers (and any ``train_modules``), and minimises
``CE + aux_loss_coef * L_aux`` on a small local data set, with the learning-rate schedule of
:mod:`mixcli.training`. Under ``torchrun`` (WORLD_SIZE set) it runs data-parallel (gloo on
CPU, nccl on GPUs; gradients averaged over the ranks); the global batch is split over the
ranks so the result matches one process with the same batch. Rank 0 writes the tuned model
atomically, a loss curve (PNG) and a log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import click

from mixcli import MixcliError
from mixcli.errors import closest


@dataclass
class TuneSettings:
    data: object = ""  # required: a .jsonl/.json/.csv/.parquet/.txt file, or a list of them
    text_field: str = "text"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    answer_only: bool = None  # loss on answer tokens only; default: true when the rows are prompt/answer
    max_length: int = 512
    # the recipe's defaults, chosen by measurements on two families (README, "Choosing the defaults")
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-2
    lr_scheduler_type: str = "cosine"  # mixcli.training.SCHEDULE_KEYS
    warmup_steps: int = 0
    warmup_ratio: float = 0.1
    min_lr_rate: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    eval_fraction: float = 0.0  # rows held out to report CE before/after (none unless asked)
    train_modules: list = None  # extra parameter-name substrings to train
    seed: int = -1  # -1: the project's seed
    output: str = ""
    device: str = "auto"
    save_routers: bool = False

    def schedule(self):
        from mixcli.training import Schedule

        return Schedule(self.lr_scheduler_type, self.warmup_steps, self.warmup_ratio, self.min_lr_rate)


KEYS = tuple(f.name for f in fields(TuneSettings))
POSITIVE = ("max_length", "steps", "batch_size")
# AdamW refuses (a traceback) or trains to NaN routers with anything else
FINITE = {"lr": "> 0", "weight_decay": ">= 0", "grad_clip": ">= 0", "aux_loss_coef": ">= 0"}
DEVICES = ("auto", "cpu", "cuda")


def read_settings(project) -> TuneSettings:
    where = f"{project.where}: [tune]"
    table = project.sections.get("tune")
    if table is None:
        raise MixcliError(f"{project.where}: [tune] is missing; add [tune] with data = \"train.jsonl\"")
    values = {}
    defaults = TuneSettings()
    for key, value in table.items():
        if key not in KEYS:
            raise MixcliError(f"{where}: unknown key '{key}'{closest(key, KEYS)}")
        want = {"train_modules": list, "data": str if isinstance(value, str) else list,
                "answer_only": bool}.get(key) or type(getattr(defaults, key))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise MixcliError(f"{where}: {key} must be a {want.__name__}, got {value!r}")
        values[key] = value
    settings = TuneSettings(**values)
    if not settings.data or (isinstance(settings.data, list) and not all(isinstance(d, str) for d in settings.data)):
        raise MixcliError(f"{where}: data is missing; give a .jsonl/.csv/.parquet/.txt file of training text")
    for key in POSITIVE:
        if getattr(settings, key) < 1:
            raise MixcliError(f"{where}: {key} must be >= 1")
    for key, bound in FINITE.items():
        value = getattr(settings, key)
        if not math.isfinite(value) or value < 0 or (bound == "> 0" and value == 0):
            raise MixcliError(f"{where}: {key} must be a finite number {bound}, got {value!r}")
    if settings.device not in DEVICES:
        raise MixcliError(f"{where}: device must be " + ", ".join(repr(d) for d in DEVICES)
                          + f", got {settings.device!r}")
    if not 0 <= settings.eval_fraction < 1:
        raise MixcliError(f"{where}: eval_fraction must be in [0, 1)")
    from mixcli.training import read_schedule

    read_schedule(table, where)  # the schedule keys' one-line errors
    settings.train_modules = list(settings.train_modules or [])
    if settings.seed < 0:
        settings.seed = project.seed
    return settings


def tuned_output(project) -> tuple[Path, str] | None:
    """Where ``mixcli tune`` writes the project's final model ([tune] output, else <output>-tuned),
    and the command; None without a [tune] table (the merge output is final)."""
    table = project.sections.get("tune")
    if table is None:
        return None
    output = table.get("output")
    folder = project.file.parent / output if isinstance(output, str) and output else \
        Path(str(project.output_path).rstrip("/") + "-tuned")
    return folder, f"mixcli tune {project.file}"


@click.command("tune")
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", type=click.Path(file_okay=False, path_type=Path),
              help="Model folder to tune (default: the project's output).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the tuned model (default: [tune] output, else <output>-tuned).")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def tune_command(project, model, out, force, no_progress):
    """Train the routers of PROJECT's MoE on the [tune] data set (torchrun-aware)."""
    from mixcli.core import load_project

    proj, method = load_project(project)
    if "tune" not in getattr(method, "sections", ()):
        raise MixcliError(f"{proj.where}: method '{method.name}' has no routers to tune")
    settings = read_settings(proj)
    source = model or proj.output_path
    if source is None or not Path(source).is_dir():
        raise MixcliError(f"{proj.where}: the model {source} does not exist; run `mixcli merge {project}` first "
                          "or pass --model")
    target = out or tuned_output(proj)[0]
    from mixcli.engine import check_target
    from mixcli.target import protected_folders

    protected = {"the folder of the model to tune": Path(source), **protected_folders(proj)}
    check_target(Path(target).absolute(), force, protected, proj.file)
    from ._train import train

    result = train(Path(source), Path(target), settings, proj, force=force,
                   progress=not no_progress)
    if result is not None:
        b, a = result["before"], result["after"]
        # without held-out rows the two figures are of two different training batches: say so
        what = "held-out CE" if result["held_out"] else "CE of the first -> last training batch"
        tail = "" if result["held_out"] else "; nothing held out (eval_fraction = 0)"
        click.echo(f"wrote {result['output']} ({what} {b['ce']:.4f} -> {a['ce']:.4f}, "
                   f"aux {b['aux']:.4f} -> {a['aux']:.4f}{tail})")

