"""The stem: every non-expert tensor (embeddings, norms, un-mixed projections, lm_head).

``stem = "base"`` copies the base (mergekit), ``"average"`` takes the uniform mean over the
expert source models (moetify ``--merge_base``), any other name is a registered tensor-wise
merge method (``ties``, ``task_arithmetic``...) applied across the expert source models with
the base as its base, its parameters given in ``stem_params``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mixcli import MixcliError
from mixcli.architecture import head_source
from mixcli.params import check_setting
from mixcli.plan import OutputTensor
from mixcli.seeding import derive_seed


@dataclass
class StemPlan:
    kind: str  # "base", "average" or "merge"
    base: object  # Checkpoint
    sources: list = field(default_factory=list)  # Checkpoints merged (average / merge)
    method: object = None  # MergeMethod
    shared: dict = field(default_factory=dict)
    per_model: dict = field(default_factory=dict)


def stem_sources(context, recipe, where: str) -> StemPlan:
    base = context.models[recipe.base]
    distinct = list(dict.fromkeys(recipe.experts))
    if recipe.stem == "base":
        if recipe.stem_params:
            raise MixcliError(f"{where}: stem_params apply to a merge-method stem, not stem = \"base\"")
        return StemPlan("base", base)
    if recipe.stem == "average":
        return StemPlan("average", base, [context.models[name] for name in distinct])
    from mixcli.components import MergeMethod
    from mixcli.plugins import get_registry

    method = get_registry().methods.get(recipe.stem)
    if not isinstance(method, MergeMethod):
        raise MixcliError(f"{where}: stem must be \"base\", \"average\" or a merge method (e.g. \"ties\", "
                          f"\"task_arithmetic\"), got '{recipe.stem}'")
    others = [name for name in distinct if name != recipe.base]
    if not others:
        raise MixcliError(f"{where}: stem '{recipe.stem}' needs experts other than the base to merge")
    specs = method.param_specs
    shared, per_model = {}, {}
    for key, value in recipe.stem_params.items():
        if key not in specs:
            raise MixcliError(f"{where}: stem_params: unknown parameter '{key}' for method '{method.name}'")
    for key, spec in specs.items():
        value = recipe.stem_params.get(key, spec.default)
        if spec.required and key not in recipe.stem_params:
            if key == "weight":  # task vectors of all experts, equally weighted, unless given
                value = 1.0
            else:
                raise MixcliError(f"{where}: stem_params: method '{method.name}' needs '{key}' ({spec.help})")
        if spec.per_model:
            values = value if isinstance(value, list) else [value] * len(others)
            if len(values) != len(others):
                raise MixcliError(f"{where}: stem_params: '{key}' needs one value per merged model "
                                  f"({', '.join(others)}), got {len(values)}")
            per_model[spec.field] = [spec.check(v, f"{where}: stem_params") for v in values]
        else:
            shared[spec.field] = value if value is None else check_setting(spec, value, f"{where}: stem_params")
    if method.check is not None:
        try:
            method.check(**shared, **per_model)
        except MixcliError as error:
            raise MixcliError(f"{where}: stem_params: {error}") from None
    return StemPlan("merge", base, [context.models[name] for name in others], method, shared, per_model)


class _StemCompute:
    def __init__(self, plan: StemPlan, base_name: str, names: list[str], code: str, seed):
        self.plan, self.base_name, self.names, self.code, self.seed = plan, base_name, names, code, seed

    def __call__(self):
        import torch

        from mixcli.safetensors_io import torch_dtype

        plan, dtype = self.plan, torch_dtype(self.code)
        base = plan.base.tensor(self.base_name)
        if plan.kind == "base" or not base.is_floating_point():
            return base.to(dtype)
        if plan.kind == "average":
            total = torch.zeros(base.shape, dtype=torch.float32)
            for ckpt, name in zip(plan.sources, self.names):
                total += ckpt.tensor(name).to(torch.float32)
            return (total / len(plan.sources)).to(dtype)
        tensors = [ckpt.tensor(name).to(torch.float32) for ckpt, name in zip(plan.sources, self.names)]
        kwargs = {**plan.shared, **plan.per_model}
        if self.seed is not None:
            kwargs["seed"] = self.seed
        return plan.method.merge(tensors, base.to(torch.float32), **kwargs).to(dtype)


def _stored(ckpt, name: str) -> str:
    """``name`` in ``ckpt``: itself, or the embedding a tied model uses as its head."""
    return name if name in ckpt.tensors else head_source(ckpt)


def stem_tensor(plan: StemPlan, name: str, code: str, context) -> OutputTensor:
    base_name = _stored(plan.base, name)
    names = [_stored(ckpt, name) for ckpt in plan.sources]
    info = plan.base.tensors[base_name]
    reads = [(plan.base, base_name)] + list(zip(plan.sources, names))
    seed = derive_seed(context.seed, name) if plan.method is not None and plan.method.random else None
    details = {"kind": "stem", "stem": plan.kind if plan.method is None else plan.method.name}
    return OutputTensor(name, info.shape, code if info.floating else info.dtype,
                        _StemCompute(plan, base_name, names, code if info.floating else info.dtype, seed),
                        reads, details)
