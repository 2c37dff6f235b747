"""The output plan shared by every method of this plugin (imports torch; loaded by ``build``).

Non-upscaled tensors are task arithmetic ``θ0 + λ_shared Σ τ_i``; every Linear of an upscaled
block keeps the pretrained weight and bias plus the method's expert tensors; routers are
initialised from the project seed. Nothing is read before the engine writes a tensor.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

from mixcli import MixcliError
from mixcli.architecture import check_layer_count
from mixcli.backbone import checkpoint_names, find_blocks, meta_backbone, renamer
from mixcli.features import pooler_kwargs
from mixcli.plan import OutputPlan, OutputTensor
from mixcli.provenance import record_input_hashes

from . import __version__

PLUGIN_FORMAT = "mixcli-wemoe/1"
CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


@dataclass
class Spec:
    """What a method decides; :func:`plan` does the rest."""

    method: str
    kinds: tuple = ("mlp",)  # block kinds to upscale
    expert_kind: str = "dense"  # "dense" (task vectors) or "rank_one"
    router_input: str = "hidden"
    config: dict = field(default_factory=dict)  # extra WEMoEConfig fields
    # (linear path, attr, base tensor, expert tensors) -> {suffix: (shape, compute)}; None = dense
    experts: Callable | None = None
    delta: Callable | None = None  # transform of one dense task-vector tensor (pruning)


def init_router(router, seed: int, index: int, std: float, lam: float) -> None:
    """Spec §1.1: weights N(0, std²), hidden bias 0, last bias λ; seeded per router."""
    import torch

    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:router:{index}".encode()))
    with torch.no_grad():
        for name, p in router.named_parameters():
            if name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.fill_(0.0)
        last = {0: "bias", 1: "fc.bias", 2: "fc2.bias"}[router.depth]
        dict(router.named_parameters())[last].fill_(lam)


def plan(context, spec: Spec) -> OutputPlan:
    import torch

    from .modeling import WEMoEConfig, WEMoEModel

    project, p = context.project, context.params
    where = f"{project.where}: [method]"
    if project.base is None:
        raise MixcliError(f"{where}: base is missing; name the pretrained model, e.g. base = \"base\"")
    base = context.models[project.base]
    experts = [name for name in context.models if name != project.base]
    if not experts:
        raise MixcliError(f"{where}: {spec.method} needs at least one fine-tuned model besides the base")
    for name, ckpt in context.models.items():
        check_layer_count(ckpt, project.models[name].where)
    base_cfg = dict(base.config)
    # a base saved without its pooler (add_pooling_layer=False) is rebuilt without one
    backbone_kwargs = pooler_kwargs(base_cfg, base.tensors)
    backbone = meta_backbone(base_cfg, f"{project.models[project.base].where}", kwargs=backbone_kwargs)
    blocks = find_blocks(backbone, spec.kinds, tuple(p.get("modules") or ()))
    if not blocks:
        what = " and ".join(spec.kinds)
        filt = f" matching modules = {p.get('modules')}" if p.get("modules") else ""
        raise MixcliError(f"{where}: no {what} blocks{filt} found in the base model "
                          f"('{base_cfg.get('model_type')}'); {spec.method} needs recognisable "
                          "Linear blocks (fc1/fc2, gate/up/down_proj, intermediate/output.dense, ...)")
    rename = renamer(backbone)
    maps = {name: checkpoint_names(backbone, ckpt, project.models[name].where, rename)
            for name, ckpt in context.models.items()}
    for name in experts:
        for key, src in maps[name].items():
            a, b = context.models[name].tensors[src], base.tensors[maps[project.base][key]]
            if a.shape != b.shape:
                raise MixcliError(f"{project.models[name].where}: tensor '{key}' has shape {list(a.shape)}, "
                                  f"the base has {list(b.shape)}; all models must share one architecture")
    lam, shared = p["init_lambda"], p.get("shared_lambda")
    shared = lam if shared is None else shared
    routed = {path: block for block in blocks for path in block.linears}
    state = backbone.state_dict()
    first = base.tensors[maps[project.base][next(iter(state))]].dtype
    chosen = project.out_dtype or project.dtype  # [output] dtype, else [method] dtype, else the base's
    out_code = CODES[chosen] if chosen else first if first in ("F16", "BF16", "F64") else "F32"

    def read(model: str, key: str):
        return context.models[model].tensor(maps[model][key]).to(torch.float32)

    def reads(key: str):
        return [(context.models[m], maps[m][key]) for m in [project.base] + experts]

    def cast(t):
        return t.to(_dtype(out_code)).contiguous()

    tensors: list[OutputTensor] = []

    def add(name, shape, compute, key=None, details=None):
        tensors.append(OutputTensor(name, tuple(shape), out_code, compute, reads(key) if key else [],
                                    details or {}))

    for key, value in state.items():
        path, _, attr = key.rpartition(".")
        shape = tuple(value.shape)
        if path not in routed:
            def ta(key=key):
                t0 = read(project.base, key)
                return cast(t0 + shared * sum(read(m, key) - t0 for m in experts))
            add(f"backbone.{key}", shape, ta, key, {"merge": "task_arithmetic", "lambda": shared})
            continue
        if spec.expert_kind == "rank_one":
            for suffix, (oshape, fn) in spec.experts(path, attr, key, shape, read, experts, project.base, p).items():
                add(f"backbone.{path}.{suffix}", oshape, lambda fn=fn: cast(fn()), key, {"merge": "rank_one"})
            continue
        add(f"backbone.{key}", shape, lambda key=key: cast(read(project.base, key)), key, {"merge": "pretrained"})

        def deltas(key=key):
            t0 = read(project.base, key)
            out = [read(m, key) - t0 for m in experts]
            if spec.delta is not None:
                out = [spec.delta(d) for d in out]
            return cast(torch.stack(out))
        add(f"backbone.{path}.delta_{attr}", (len(experts), *shape), deltas, key, {"merge": "task_vectors"})

    config = {"backbone_config": base_cfg, "backbone_kwargs": backbone_kwargs, "method": spec.method,
              "num_experts": len(experts),
              "expert_names": experts, "blocks": [vars(b) for b in blocks],
              "router_hidden_layers": p["router_hidden_layers"], "init_lambda": lam, "shared_lambda": shared,
              "batch_reduce": p.get("batch_reduce", False), "expert_kind": spec.expert_kind,
              "router_input": spec.router_input, **spec.config}
    config["mixcli"] = {
        "format": PLUGIN_FORMAT, "plugin_version": __version__, "method": spec.method, "seed": context.seed,
        "parameters": {k: v for k, v in p.items()},
        # sha256 is filled in when the output is written (finalize): planning reads no weight
        "inputs": {name: {"path": str(ckpt.path), "role": "base" if name == project.base else "expert",
                          "sha256": None} for name, ckpt in context.models.items()},
        "adapt": None}
    wconfig = WEMoEConfig(**config)
    with torch.device("meta"):
        skeleton = WEMoEModel(wconfig)
    std = p.get("router_std", 0.01)
    for index, router in enumerate(skeleton.routers):
        for name, value in router.state_dict().items():
            def compute(router=router, index=index, name=name):
                import copy

                live = copy.deepcopy(router).to_empty(device="cpu")
                init_router(live, context.seed, index, std, lam)
                return cast(live.state_dict()[name])
            add(f"routers.{index}.{name}", value.shape, compute, details={"merge": "router_init"})
    expected = set(skeleton.state_dict())
    produced = {t.name for t in tensors}
    if expected != produced:  # a bug, not a user mistake
        raise RuntimeError(f"plan/model mismatch: {sorted(expected ^ produced)[:5]}")
    out = wconfig.to_dict()
    out["architectures"] = ["WEMoEModel"]
    out["dtype"] = {"F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(out_code, "float32")
    out.pop("torch_dtype", None)
    notes = [f"{len(blocks)} upscaled blocks, {len(experts)} experts, {len(skeleton.routers)} routers"]
    folders = {name: ckpt.path for name, ckpt in context.models.items()}
    return OutputPlan(config=out, tensors=tensors, donor=base, notes=notes,
                      finalize=lambda folder: record_input_hashes(folder, folders))


def _dtype(code_or_dtype):
    import torch

    if not isinstance(code_or_dtype, str):
        return code_or_dtype
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}.get(
        code_or_dtype, torch.float32)


def model_from_plan(plan: OutputPlan, device: str = "cpu"):
    """The planned model in memory (no files written), float32: every tensor computed once, in
    the dtype the plan writes, and copied into the model's own parameter."""
    import torch

    from .modeling import WEMoEConfig, WEMoEModel

    config = WEMoEConfig.from_dict({k: v for k, v in plan.config.items() if k != "architectures"})
    model = WEMoEModel(config).float()
    state = model.state_dict()  # shares the parameters' storage
    if set(state) != {t.name for t in plan.tensors}:  # a bug, not a user mistake
        raise RuntimeError(f"plan/model mismatch: {sorted(set(state) ^ {t.name for t in plan.tensors})[:5]}")
    with torch.no_grad():
        for tensor in plan.tensors:
            state[tensor.name].copy_(tensor.compute())
            for ckpt, name in tensor.reads:
                ckpt.release(name)
    return model.to(device).eval()
