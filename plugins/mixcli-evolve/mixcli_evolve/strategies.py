"""Search strategies on the ``cmaes`` package (ask/tell; mixcli keeps the budget and the
scheduling): full-covariance CMA-ES, with margin (CMAwM) for on/off genes, and separable CMA-ES
for large genomes."""

from __future__ import annotations

from mixcli import SearchStrategy


class CmaesStrategy:
    """One generation at a time over a ``cmaes`` optimiser. With on/off genes (``binary``) it is
    CMA-ES with margin: those genes are asked as -1 (off) or 1 (on), in bounds [-1, 1], and the
    rest stay continuous."""

    def __init__(self, x0, sigma0: float, popsize: int, seed: int, binary=(), separable: bool = False):
        import numpy as np
        from cmaes import CMA, CMAwM, SepCMA

        mean = np.asarray(x0, dtype=float)
        self.popsize = popsize
        self._raw: list = []
        self._margin = bool(binary)
        if self._margin:
            bounds = np.tile([-np.inf, np.inf], (len(mean), 1))
            steps = np.zeros(len(mean))
            for index in binary:
                bounds[index] = [-1.0, 1.0]
                steps[index] = 2.0
                mean[index] = min(max(mean[index], -1.0), 1.0)
            self._optimizer = CMAwM(mean=mean, sigma=sigma0, bounds=bounds, steps=steps, seed=seed,
                                    population_size=popsize)
        else:
            kind = SepCMA if separable else CMA
            self._optimizer = kind(mean=mean, sigma=sigma0, seed=seed, population_size=popsize)

    def ask(self) -> list[list[float]]:
        genotypes, self._raw = [], []
        for _ in range(self.popsize):
            asked = self._optimizer.ask()
            encoded, raw = asked if self._margin else (asked, asked)
            genotypes.append([float(v) for v in encoded])
            self._raw.append(raw)
        return genotypes

    def tell(self, genotypes, losses) -> None:
        if len(losses) != len(self._raw):
            raise ValueError(f"told {len(losses)} losses for a generation of {len(self._raw)}")
        self._optimizer.tell(list(zip(self._raw, [float(v) for v in losses])))


def _cma(x0, sigma0, popsize, seed, binary=()):
    return CmaesStrategy(x0, sigma0, popsize, seed, binary)


def _sep_cma(x0, sigma0, popsize, seed, binary=()):
    if binary:
        return CmaesStrategy(x0, sigma0, popsize, seed, binary)  # margin needs the full covariance
    return CmaesStrategy(x0, sigma0, popsize, seed, separable=True)


STRATEGIES = (
    SearchStrategy(name="cma", summary="CMA-ES (cmaes package); with margin (CMAwM) for on/off genes", create=_cma),
    SearchStrategy(name="sep_cma", summary="separable CMA-ES (diagonal covariance, for large genomes)",
                   create=_sep_cma),
)
