"""Data-flow-space genome (spec §3.2): which layers of which models run in which order, and
with what input scale.

A genotype is the indicator ``I`` over ``T = M·r`` slots (the ``M`` layers of the searched
models laid out in order, repeated ``repeats`` times; slot ``t`` is on the path iff
``I_t > 0``), then the scale genes: none (``scales = "none"``: unit scales, a stock
architecture), one per (source model → source model) pair (``"pair"``, row-major), or one per
(layer → layer) pair of the laid-out layers (``"matrix"``, ``M×M``). A path outside
``min_path_length``..``max_path_length`` is infeasible: it decodes to None, is not built and
scores worst. Decoded paths are ``layer_path`` recipes of :mod:`mixcli_evolve.dfs`.
"""

from __future__ import annotations

from .recipe import BEST_MODEL
from .settings import SearchSettings


class PathGenome:
    def __init__(self, settings: SearchSettings, layer_counts: dict[str, int], models: dict[str, str]):
        self.settings = settings
        self.layer_counts = {name: layer_counts[name] for name in settings.models}
        self.models = models  # name -> absolute path, in the settings' order
        self.layers = sum(self.layer_counts.values())
        self.slots = self.layers * settings.repeats
        self.owner = [name for name, count in self.layer_counts.items() for _ in range(count)]
        kinds = len(self.layer_counts)
        self.scale_genes = {"none": 0, "pair": kinds * kinds, "matrix": self.layers * self.layers}[settings.scales]
        self.max_length = settings.max_path_length or self.slots
        self.skeleton = {"models": dict(models), "layers": self.layer_counts, "repeats": settings.repeats,
                         "scales": settings.scales, "embed_from": settings.embed_from,
                         "head_from": settings.head_from, "dtype": settings.dtype}

    @property
    def shape(self) -> tuple[int, int]:
        return (self.slots, self.scale_genes)

    @property
    def dimension(self) -> int:
        return self.slots + self.scale_genes

    def binary(self) -> list[int]:
        return list(range(self.slots))

    def initial(self) -> list[float]:
        """The first model's layers on in the first repeat (the first model itself), every scale 1;
        ``random_init``: each indicator gene U[-1, 1), each scale U[0.5, 1.5), from the seed."""
        if self.settings.random_init:
            import numpy as np

            rng = np.random.default_rng(self.settings.seed)
            return ([float(v) for v in rng.uniform(-1, 1, self.slots)]
                    + [float(v) for v in rng.uniform(0.5, 1.5, self.scale_genes)])
        first = next(iter(self.layer_counts.values()))
        indicator = [0.5 if t < first else -0.5 for t in range(self.slots)]
        return indicator + [1.0] * self.scale_genes

    def scale_matrix(self, genes):
        """The ``M×M`` layer-to-layer scales of the scale genes, or None (unit scales)."""
        if self.settings.scales == "none":
            return None
        if self.settings.scales == "matrix":
            return [list(genes[i * self.layers:(i + 1) * self.layers]) for i in range(self.layers)]
        names = list(self.layer_counts)
        kinds = len(names)
        index = {name: n for n, name in enumerate(names)}
        return [[genes[index[self.owner[i]] * kinds + index[self.owner[j]]] for j in range(self.layers)]
                for i in range(self.layers)]

    def decode(self, x) -> dict | None:
        """The ``layer_path`` recipe of genotype ``x``, or None for an infeasible path."""
        from .dfs import decode_indicator, path_recipe

        if len(x) != self.dimension:
            raise ValueError(f"genotype has {len(x)} genes, the genome {self.dimension}")
        indicator, genes = list(x[:self.slots]), [float(v) for v in x[self.slots:]]
        steps = decode_indicator(indicator, self.layer_counts, self.settings.repeats, self.scale_matrix(genes))
        if not self.settings.min_path_length <= len(steps) <= self.max_length:
            return None
        return path_recipe(steps, self.models, embed_from=self.settings.embed_from,
                           head_from=self.settings.head_from, output=BEST_MODEL, dtype=self.settings.dtype)
