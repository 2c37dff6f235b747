"""Parameter-space genome: mergekit-evolve's genotype layout and decoding, exactly (spec §2.1),
so that a genotype or a best recipe compares across the two tools.

A genotype is ``x[G, M, F+1, P]`` flattened row-major: ``G`` layer groups, ``M`` models,
``F`` filters plus the catch-all (last), ``P`` genes per model (weight, or weight and
density, or slerp's t). It decodes to an ordinary mixcli recipe (a project as a dict).
"""

from __future__ import annotations

import math

from mixcli.errors import MixcliError

from .settings import SearchSettings


class Genome:
    """Genotypes of one [search] table over models with ``layers`` decoder layers."""

    def __init__(self, settings: SearchSettings, layers: int, skeleton: dict):
        self.settings = settings
        self.layers = layers
        granularity = settings.layer_granularity
        if granularity and layers % granularity:
            raise MixcliError(f"{settings.where} layer_granularity {granularity} must divide the models' layer "
                              f"count {layers}")
        self.groups = layers // granularity if granularity else 1
        self.span = granularity or layers
        self.models = settings.models
        self.sets = len(settings.filters) + 1
        self.genes = settings.genes
        self.skeleton = skeleton  # the recipe around the genes: models, method, output

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.groups, len(self.models), self.sets, len(self.genes))

    @property
    def dimension(self) -> int:
        return math.prod(self.shape)

    def initial(self) -> list[float]:
        """Weights 1/M and every other gene 1 (no pruning); ``random_init``: each gene U[0, 1),
        drawn from the search's seed."""
        if self.settings.random_init:
            import numpy as np

            return [float(v) for v in np.random.default_rng(self.settings.seed).random(self.dimension)]
        per_model = [1.0 / len(self.models) if gene in ("weight", "t") else 1.0 for gene in self.genes]
        return per_model * (self.dimension // len(self.genes))

    def binary(self) -> list[int]:
        return []  # no on/off genes in parameter space

    def gene(self, x, g: int, m: int, f: int, p: int) -> float:
        groups, models, sets, genes = self.shape
        return float(x[((g * models + m) * sets + f) * genes + p])

    def _value(self, x, g, m, f, p) -> float:
        raw = self.gene(x, g, m, f, p)
        if self.genes[p] == "density":
            return min(max(abs(raw), 0.0), 1.0)
        return raw if self.settings.allow_negative_weights else abs(raw)

    def _setting(self, x, groups, m, p):
        """One model's value of gene ``p`` over ``groups``: a scalar, or a gradient over the
        groups; with filters a filtered list of those, catch-all last."""
        def over_groups(f):
            values = [self._value(x, g, m, f, p) for g in groups]
            return values[0] if len(values) == 1 else values

        if not self.settings.filters:
            return over_groups(0)
        return ([{"filter": filt, "value": over_groups(i)} for i, filt in enumerate(self.settings.filters)]
                + [{"value": over_groups(len(self.settings.filters))}])

    def decode(self, x) -> dict:
        """The recipe of genotype ``x`` (a project as a dict, ready for TOML)."""
        if len(x) != self.dimension:
            raise ValueError(f"genotype has {len(x)} genes, the genome {self.dimension}")
        recipe = _copy(self.skeleton)
        base = self.settings.base
        if self.settings.method == "slerp":
            recipe["slices"] = [self._slerp_slice(x, g) for g in range(self.groups)]
            recipe["method"].pop("base", None)
            return recipe
        if self.settings.smooth:
            for m, model in enumerate(self.models):
                for p, gene in enumerate(self.genes):
                    recipe["models"][model][gene] = self._setting(x, range(self.groups), m, p)
            return recipe
        slices = []
        for g in range(self.groups):
            layer_range = [g * self.span, (g + 1) * self.span]
            sources = []
            for m, model in enumerate(self.models):
                source = {"model": model, "layer_range": layer_range}
                for p, gene in enumerate(self.genes):
                    source[gene] = self._setting(x, [g], m, p)
                sources.append(source)
            if base is not None and base not in self.models:
                sources.append({"model": base, "layer_range": layer_range})
            slices.append({"sources": sources})
        recipe["slices"] = slices
        return recipe

    def _slerp_slice(self, x, g: int) -> dict:
        """The two models with the largest raw weight genes; t = the second of their softmax."""
        raw = [self.gene(x, g, m, 0, 0) for m in range(len(self.models))]
        first, second = sorted(range(len(raw)), key=lambda m: -raw[m])[:2]  # stable: ties keep model order
        import torch  # mergekit's softmax, in float64, to the last bit

        t = torch.softmax(torch.tensor([raw[first], raw[second]], dtype=torch.float64), 0)[1].item()
        layer_range = [g * self.span, (g + 1) * self.span]
        return {"sources": [{"model": self.models[first], "layer_range": layer_range},
                            {"model": self.models[second], "layer_range": layer_range}],
                "base": self.models[first], "t": t}


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
