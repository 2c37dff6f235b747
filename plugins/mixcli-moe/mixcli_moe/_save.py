"""Writing a tuned model: the input's tensors streamed through unchanged except the trained
ones, in the input's layout and dtypes, atomically (mixcli's engine: a temporary folder
beside the target, renamed at the end), with the tuning log and loss curve beside them."""

from __future__ import annotations

import json
from pathlib import Path

from mixcli import MixcliError
from mixcli.checkpoint import Checkpoint, open_safetensors, read_config
from mixcli.plan import OutputPlan, OutputTensor

from ._target import to_v5

SKIP = {"config.json", "model.safetensors.index.json", "README.md"}


class _Trained:
    def __init__(self, value, code):
        self.value, self.code = value, code

    def __call__(self):
        from mixcli.safetensors_io import torch_dtype

        return self.value.to(torch_dtype(self.code)).contiguous()


class _Same:
    def __init__(self, ckpt, name):
        self.ckpt, self.name = ckpt, name

    def __call__(self):
        return self.ckpt.tensor(self.name)


def loss_curve(history: list[dict], before, after) -> bytes:
    from mixcli.training import loss_curve as curve

    steps = [h["step"] for h in history]
    points = {"held-out CE": ([0, steps[-1]], [before["ce"], after["ce"]])} if before and after else None
    return curve(steps, {"train loss (CE + coef * aux)": [h["loss"] for h in history],
                         "train CE": [h["ce"] for h in history]}, "mixcli tune: router tuning", points=points)


def save_tuned(source: Path, target: Path, model, trainable: list[str], settings, log: dict, project,
               force: bool) -> Path:
    from mixcli import core
    from mixcli.engine import write_plan

    ckpt = Checkpoint(name="tuned", path=source, config=read_config(source, "mixcli tune"),
                      tensors=open_safetensors(source, "mixcli tune"))
    state = dict(model.named_parameters())
    by_file = {}
    for name in ckpt.tensors:
        by_file.setdefault(to_v5(name), []).append(name)
    tensors = []
    written = set()
    for name, info in ckpt.tensors.items():
        key = to_v5(name)
        if key in trainable:
            if len(by_file[key]) != 1:
                raise MixcliError(f"mixcli tune: '{key}' is stored as several tensors ({by_file[key][0]}, ...) in "
                                  f"{source}; train_modules cannot include per-expert 4.x-layout tensors")
            value = state[key].detach().cpu()
            if tuple(value.shape) != tuple(info.shape):
                raise MixcliError(f"mixcli tune: '{key}' has shape {list(value.shape)} in the model and "
                                  f"{list(info.shape)} in {source}")
            tensors.append(OutputTensor(name, info.shape, info.dtype, _Trained(value, info.dtype), [],
                                        {"kind": "trained"}))
            written.add(key)
        else:
            tensors.append(OutputTensor(name, info.shape, info.dtype, _Same(ckpt, name), [(ckpt, name)]))
    missing = sorted(set(trainable) - written)
    if missing:
        raise MixcliError(f"mixcli tune: trained parameter '{missing[0]}' has no tensor in {source}")
    config = dict(ckpt.config)
    config["router_aux_loss_coef"] = settings.aux_loss_coef
    extra = {path.name: path.read_bytes() for path in source.iterdir()
             if path.is_file() and path.suffix != ".safetensors" and path.name not in SKIP
             and path not in ckpt.tokenizer_files()}
    extra["tune_log.json"] = (json.dumps(log, indent=2, default=str) + "\n").encode()
    extra["tune_loss.png"] = loss_curve(log["history"], log["before"], log["after"])
    if settings.save_routers:
        import safetensors.torch

        routers = {name: state[name].detach().cpu().contiguous() for name in trainable}
        extra["routers.safetensors"] = safetensors.torch.save(routers)
    plan = OutputPlan(config=config, tensors=tensors, donor=ckpt, extra_files=extra)
    recipe = core.recipe(project)
    card = core.card(project, core.get_registry(), recipe, title=Path(target).name, step=(
        "its routers were then trained by `mixcli tune` on the recipe's [tune] data (tune_log.json, "
        "tune_loss.png): `mixcli merge mixcli.toml --out MERGED` and `mixcli tune mixcli.toml --model MERGED "
        "--out NEW` repeat both steps."))
    return write_plan(plan, target, force=force, recipe=recipe, card=card, progress=False,
                      protected={"the folder of the model to tune": source}, project_file=project.file)
