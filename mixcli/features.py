"""The feature a classification head reads from a backbone's output, named by the task folder's
``task.json`` (``"feature"``), for every reader of task folders (WE-MoE adaptation, the
``classification`` evaluator):

- ``"pooler_output"``: the backbone's pooler output (ViT/BERT: dense + tanh over the first
  token; CLIP's vision tower: the layer-normed first token);
- ``"cls"``: the first token's last hidden state;
- ``"mean"``: the mean of the last hidden states over the tokens (padding left out).

Without a ``"feature"``, a head reads the pooler output when the backbone gives one, else the
first token (``"cls"``). Backbones saved without their pooler (``add_pooling_layer=False``)
are rebuilt without it (:func:`pooler_kwargs`) instead of with a randomly initialised one.
Importing this module does not import torch.
"""

from __future__ import annotations

from .errors import MixcliError

FEATURES = ("pooler_output", "cls", "mean")


def task_feature(info: dict, task_json, where: str) -> str | None:
    """The ``"feature"`` of a task.json object (None: the default), or a one-line error."""
    feature = info.get("feature")
    if feature is None or feature in FEATURES:
        return feature
    raise MixcliError(f"{where}: {task_json}: \"feature\" must be " + ", ".join(f'"{f}"' for f in FEATURES)
                      + f", got {feature!r}")


def pooler_kwargs(config: dict, tensor_names) -> dict:
    """``{"add_pooling_layer": False}`` for a backbone whose class builds a pooler by default
    but whose stored tensors hold none (saved with ``add_pooling_layer=False``); else ``{}``."""
    import inspect

    import transformers

    data = dict(config)
    try:
        cfg = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
        model_class = transformers.MODEL_MAPPING[type(cfg)]
    except (KeyError, ValueError, TypeError):
        return {}
    parameter = inspect.signature(model_class.__init__).parameters.get("add_pooling_layer")
    if parameter is None or parameter.default is not True:
        return {}
    if any(name.startswith("pooler.") or ".pooler." in name for name in tensor_names):
        return {}
    return {"add_pooling_layer": False}


def head_features(output, feature: str | None, mask=None, where: str = ""):
    """The vectors ``[batch, hidden]`` a head reads from a backbone ``output``; ``mask`` (the
    attention mask) leaves padding out of the mean."""
    pooled = getattr(output, "pooler_output", None)
    if feature is None:
        feature = "pooler_output" if pooled is not None else "cls"
    if feature == "pooler_output":
        if pooled is None:
            raise MixcliError(f"{where}: the task reads the pooler output (\"feature\": \"pooler_output\" in "
                              "task.json), but the backbone has no pooler; set \"feature\" to \"cls\" or \"mean\"")
        return pooled
    hidden = output.last_hidden_state
    if feature == "mean":
        if mask is None:
            return hidden.mean(1)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return hidden[:, 0]
