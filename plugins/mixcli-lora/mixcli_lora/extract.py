"""extract-lora: the difference between a fine-tune and its base as a PEFT LoRA adapter, by a
truncated float32 SVD of each module's weight difference, one module at a time.

Per Linear (and Embedding, with ``embed_lora``) module: ``Δ = W_ft − W_base``, ``U S Vᵀ = svd(Δ)``,
rank ``k = min(max_rank, #{S > sv_epsilon})``, ``A = √S_k·V_kᵀ``, ``B = U_k·√S_k`` (or ``A = S_k·V_kᵀ``,
``B = U_k`` without ``distribute_scale``); embeddings are decomposed transposed, as PEFT stores
them. Every module gets scale 1 (``lora_alpha = r`` per module). Modules that are not low-rank
adaptable (norms, embeddings without ``embed_lora``, ``save_modules``) are saved whole as
``modules_to_save``; rank-0 modules (every singular value below the threshold) are left out
and reported, so PEFT can always load the result.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mixcli.architecture import head_name, head_source, is_tied
from mixcli.errors import MixcliError

from .adapter import PREFIX


@dataclass
class Settings:
    max_rank: int = 128  # rank cap per module (mergekit's --max-rank)
    sv_epsilon: float = 0.0  # keep only singular values above this, when > 0 (mergekit's --sv-epsilon)
    distribute_scale: bool = True  # split √S between A and B; else S goes to A
    embed_lora: bool = False  # decompose embeddings instead of saving them whole
    save_modules: tuple[str, ...] = ()  # modules saved whole (full name or last component)
    include: tuple[str, ...] = ()  # re.search on module names: only these...
    exclude: tuple[str, ...] = ()  # ...and not these
    skip_undecomposable: bool = False  # leave out changed norms etc. instead of saving them whole
    device: str = "cpu"  # where the SVDs run


@dataclass
class ModuleResult:
    module: str
    kind: str  # "lora", "saved" (modules_to_save), "dropped" (rank 0), "skipped" (filtered out)
    rank: int | None
    shape: tuple
    delta_norm: float  # ‖Δ‖_F over the module's weight and bias
    residual_norm: float  # ‖Δ − reconstruction‖_F

    @property
    def error(self) -> float:
        return self.residual_norm / self.delta_norm if self.delta_norm else 0.0


@dataclass
class Extraction:
    tensors: dict  # the adapter file's contents
    config: dict  # adapter_config.json
    results: list[ModuleResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def total_error(self) -> float:
        """‖Δ − reconstruction‖ / ‖Δ‖ over every changed tensor of the model."""
        delta = math.sqrt(sum(r.delta_norm ** 2 for r in self.results))
        return math.sqrt(sum(r.residual_norm ** 2 for r in self.results)) / delta if delta else 0.0


def model_modules(config: dict, where: str) -> list[tuple[str, str, bool]]:
    """(module name, "linear" | "embedding" | "other", has a bias) for every module holding a
    ``weight``, from a weightless (meta-device) instance of the model's class."""
    import torch
    import transformers

    from mixcli.plugins import register_architectures

    names = config.get("architectures") or []
    model_class = getattr(transformers, names[0], None) if names else None
    if model_class is None:  # perhaps a plugin's architecture (importing those takes a while)
        register_architectures()
    try:
        cfg = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = (model_class._from_config(cfg) if model_class is not None
                     else transformers.AutoModelForCausalLM.from_config(cfg))
    except Exception as error:  # unknown architecture, broken config
        raise MixcliError(f"{where}: cannot build the model's class from its config.json to find its modules "
                          f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    out = []
    for name, module in model.named_modules():
        if module._parameters.get("weight") is None:
            continue
        kind = ("embedding" if isinstance(module, torch.nn.Embedding) else
                "linear" if isinstance(module, torch.nn.Linear) else "other")
        out.append((name, kind, module._parameters.get("bias") is not None))
    return out


def _selected(module: str, settings: Settings) -> bool:
    if settings.include and not any(re.search(p, module) for p in settings.include):
        return False
    return not any(re.search(p, module) for p in settings.exclude)


def _norm(tensor) -> float:
    return float(tensor.double().norm()) if tensor.numel() else 0.0


def extract(base, finetune, settings: Settings, base_label: str) -> Extraction:
    """The adapter taking ``base`` to ``finetune`` (two checkpoints), module by module."""
    modules = model_modules(finetune.config, "--model")
    for name in finetune.tensors:
        if name not in base.tensors:
            raise MixcliError(f"--base: the base model has no tensor '{name}' (the fine-tune has it); the "
                              "models must share one architecture")
    for name in base.tensors:
        if name not in finetune.tensors:
            raise MixcliError(f"--model: the fine-tune has no tensor '{name}' (the base has it); the models "
                              "must share one architecture")
    result = Extraction(tensors={}, config={})
    ranks: dict[str, int] = {}
    saved: list[str] = []
    flags = {"biased": False, "unbiased": []}
    tied = is_tied(finetune)
    if tied and settings.embed_lora:
        # PEFT applies an embedding LoRA to the input side only, not to the tied head
        result.warnings.append("the model ties its head to its input embeddings: they are saved whole, "
                               "not decomposed (--embed-lora)")
        settings = dataclasses.replace(settings, embed_lora=False)
    for module, kind, has_bias in modules:
        names = [f"{module}.weight"] + ([f"{module}.bias"] if has_bias else [])
        names = [n for n in names if n in finetune.tensors]
        if not names or not names[0].endswith(".weight"):
            continue  # tied to another module's weight, or not stored
        try:
            _module(result, module, kind, names, base, finetune, settings, ranks, saved, flags)
        finally:  # the pages of the tensors read go back: one module in memory at a time
            for n in names:
                finetune.release(n)
                base.release(n)
    embedding = head_source(finetune) if tied else None
    if embedding is not None and f"{PREFIX}{embedding}" in result.tensors:
        # the head is the embedding: PEFT re-ties it to the saved copy (ensure_weight_tying),
        # given the head's key too; otherwise the head would stay the base's embedding
        result.tensors[f"{PREFIX}{head_name(finetune)}"] = result.tensors[f"{PREFIX}{embedding}"].clone()
    if not ranks:
        raise MixcliError("no module has a low-rank difference to extract (every module is unchanged, saved "
                          "whole, dropped by --sv-epsilon or filtered out); lower --sv-epsilon or change the "
                          "include/exclude patterns")
    biased = flags["biased"]
    if not biased:  # no bias changed: keep the adapter plain
        result.tensors = {k: v for k, v in result.tensors.items() if not k.endswith(".lora_B.bias")}
    elif flags["unbiased"]:
        first = flags["unbiased"][0]
        result.warnings.append(f"bias deltas saved with lora_bias = true; modules without a bias (first: "
                               f"'{first}') make PEFT's merge_and_unload refuse the adapter, though "
                               "it loads and runs (mixcli applies it)")
    r = max(ranks.values())
    pattern = {m: k for m, k in ranks.items() if k != r}
    architectures = finetune.config.get("architectures") or [""]
    result.config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if architectures[0].endswith("ForCausalLM") else None,
        "base_model_name_or_path": base_label,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),  # alpha = rank everywhere: every module has scale 1
        "target_modules": list(ranks),  # full names: exactly these modules, no others
        "modules_to_save": saved or None,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_bias": biased,
        "init_lora_weights": True,
        "inference_mode": True,
        "ensure_weight_tying": embedding is not None and f"{PREFIX}{embedding}" in result.tensors,
    }
    return result


def _module(result: Extraction, module: str, kind: str, names: list[str], base, finetune, settings: Settings,
            ranks: dict, saved: list, flags: dict) -> None:
    """Decompose, save or leave out one module, recording what was done in ``result``."""
    import torch

    ft = [finetune.tensor(n) for n in names]
    old = [base.tensor(n) for n in names]
    resized = ft[0].shape != old[0].shape
    if resized and not (kind == "embedding" or module.endswith("lm_head")):
        raise MixcliError(f"--model: tensor '{names[0]}' has shape {list(ft[0].shape)} but the base's is "
                          f"{list(old[0].shape)}; the models must share one architecture")
    if not resized and all(torch.equal(a, b) for a, b in zip(ft, old)):
        return
    deltas = [ft[0].float()] if resized else [a.float() - b.float() for a, b in zip(ft, old)]
    norm = math.sqrt(sum(_norm(d) ** 2 for d in deltas))
    shape = tuple(ft[0].shape)
    if not _selected(module, settings):
        result.results.append(ModuleResult(module, "skipped", None, shape, norm, norm))
        return
    whole = (resized or module in settings.save_modules or module.rsplit(".", 1)[-1] in settings.save_modules
             or kind == "other" or (kind == "embedding" and not settings.embed_lora)
             or not torch.any(deltas[0] != 0))
    if whole:
        if kind == "other" and settings.skip_undecomposable and module not in settings.save_modules:
            result.results.append(ModuleResult(module, "skipped", None, shape, norm, norm))
            return
        for n, tensor in zip(names, ft):
            result.tensors[f"{PREFIX}{n}"] = tensor.clone()
        saved.append(module)
        if kind == "embedding" or resized:
            result.warnings.append(f"saving '{module}' whole (modules_to_save)"
                                   + (f"; its vocabulary differs from the base's: resize the base's token "
                                      f"embeddings to {shape[0]} before loading the adapter in PEFT"
                                      if resized else ""))
        result.results.append(ModuleResult(module, "saved", None, shape, norm, 0.0))
        return
    embedding = kind == "embedding"
    matrix = deltas[0].T if embedding else deltas[0]
    U, S, Vh = torch.linalg.svd(matrix.to(settings.device), full_matrices=False)
    U, S, Vh = U.cpu(), S.cpu(), Vh.cpu()
    rank = min(settings.max_rank, S.numel())
    if settings.sv_epsilon > 0:
        rank = min(rank, int((S > settings.sv_epsilon).sum()))
    if rank == 0:
        result.results.append(ModuleResult(module, "dropped", 0, shape, norm, norm))
        return
    s = S[:rank]
    if settings.distribute_scale:
        A, B = s.sqrt()[:, None] * Vh[:rank], U[:, :rank] * s.sqrt()
    else:
        A, B = s[:, None] * Vh[:rank], U[:, :rank].contiguous()
    dtype = ft[0].dtype
    A, B = A.to(dtype).contiguous(), B.to(dtype).contiguous()
    residual = _norm(matrix - B.float() @ A.float()) ** 2
    stem = f"{PREFIX}{module}"
    if embedding:
        result.tensors[f"{stem}.lora_embedding_A"], result.tensors[f"{stem}.lora_embedding_B"] = A, B
    else:
        result.tensors[f"{stem}.lora_A.weight"], result.tensors[f"{stem}.lora_B.weight"] = A, B
    if len(deltas) > 1:
        if torch.any(deltas[1] != 0):
            flags["biased"] = True
        bias = deltas[1].to(dtype)
        result.tensors[f"{stem}.lora_B.bias"] = bias
        residual += _norm(deltas[1] - bias.float()) ** 2
    elif not embedding:
        flags["unbiased"].append(module)
    ranks[module] = rank
    result.results.append(ModuleResult(module, "lora", rank, shape, norm, math.sqrt(residual)))


def write_adapter(extraction: Extraction, target: Path, force: bool, base_label: str, model_label: str,
                  protected: dict[str, Path]) -> Path:
    """Write the adapter folder atomically, as a merge writes its output (see mixcli.target): a
    marked temporary folder beside ``target`` renamed into place, the target locked meanwhile;
    the input folders in ``protected`` are never written over."""
    import json
    import shutil

    from safetensors.torch import save_file

    from mixcli.target import SignalGuard, check_target, make_scratch, publish, remove_leftovers, target_lock

    target = Path(target).absolute()
    check_target(target, force, protected)
    target.parent.mkdir(parents=True, exist_ok=True)
    with SignalGuard() as signals, target_lock(target):
        check_target(target, force, protected)
        remove_leftovers(target)
        scratch = make_scratch(target)
        try:
            save_file(extraction.tensors, str(scratch / "adapter_model.safetensors"), metadata={"format": "pt"})
            (scratch / "adapter_config.json").write_text(json.dumps(extraction.config, indent=2) + "\n")
            (scratch / "README.md").write_text(_card(extraction, base_label, model_label))
            publish(scratch, target, signals)
        except OSError as error:
            shutil.rmtree(scratch, ignore_errors=True)
            raise MixcliError(f"cannot write {target}: {error.strerror or error}; nothing was written") from None
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return target


def _card(extraction: Extraction, base_label: str, model_label: str) -> str:
    from mixcli import __version__

    counts = {kind: sum(r.kind == kind for r in extraction.results) for kind in ("lora", "saved", "dropped", "skipped")}
    return f"""---
library_name: peft
base_model: {base_label}
tags:
- mixcli
- lora
---
# LoRA extracted from `{model_label}`

`mixcli extract-lora` (mixcli {__version__}): the difference between `{model_label}` and its base
`{base_label}` as a LoRA adapter (rank up to {extraction.config['r']}).
{counts['lora']} modules decomposed, {counts['saved']} saved whole, {counts['dropped']} dropped (rank 0),
{counts['skipped']} left out; relative reconstruction error of the whole difference
{extraction.total_error:.3g}.

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "path/to/this/folder")
```
"""
