"""The slices of a tensor-wise merge: which layers of which models feed each run of output
layers ([[slices]], mergekit's ``slices``; a plain [models] merge is one slice)."""

from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import Checkpoint
from .errors import MixcliError
from .project import Project


@dataclass
class Source:
    """One source of a slice: a model, the first of its layers the slice takes, its parameters."""

    model: str
    ckpt: Checkpoint
    start: int
    params: dict
    where: str


@dataclass
class Slice:
    """Output layers taken from the same layers of every source (the [models] merge: one slice)."""

    sources: list[Source]
    length: int
    base: str | None
    params: dict
    where: str


def slices(project: Project, models: dict[str, Checkpoint]) -> list[Slice]:
    """The slices of a tensor-wise merge: [[slices]], or all of [models] as one."""
    if project.slices is None:
        sources = [Source(name, ckpt, 0, {}, project.models[name].where) for name, ckpt in models.items()]
        lengths = {s.ckpt.num_layers or 0 for s in sources}
        if len(lengths) > 1:
            counts = ", ".join(f"'{s.model}' {s.ckpt.num_layers}" for s in sources)
            raise MixcliError(f"{project.where}: [models] have different layer counts ({counts}); "
                              "merge them layer by layer with [[slices]]")
        return [Slice(sources, lengths.pop(), project.base, {}, f"{project.where}: [models]")]
    out = []
    for piece in project.slices:
        sources, lengths = [], set()
        for source in piece.sources:
            ckpt = models[source.model]
            total = ckpt.num_layers
            start, end = source.layer_range or (0, total or 0)
            if total is None and source.layer_range is not None:
                raise MixcliError(f"{source.where}: model '{source.model}' has no layer count in its "
                                  "config.json, so layer_range cannot apply")
            if end > (total or 0):
                raise MixcliError(f"{source.where}: layer_range [{start}, {end}] is out of range: "
                                  f"model '{source.model}' has {total} layers (0..{total - 1})")
            sources.append(Source(source.model, ckpt, start, source.params, source.where))
            lengths.add(end - start)
        if len(lengths) > 1:
            raise MixcliError(f"{piece.where}: all sources must span the same number of layers, got "
                              f"{sorted(lengths)}")
        out.append(Slice(sources, lengths.pop(), piece.base or project.base, piece.params, piece.where))
    return out
