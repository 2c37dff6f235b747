"""The routed building blocks (torch): routers, routing groups, routed Linears.

A *routing group* is the set of Linears of one upscaled block (an MLP: ``fc1``/``fc2``,
``gate/up/down_proj``, ViT's ``intermediate.dense``/``output.dense``...). Its router reads the
block input (the input of its first Linear), averages the per-token coefficients over the
tokens of each sample (over real tokens when the model got an ``attention_mask``) and every
Linear of the group mixes its task vectors with those coefficients, per Linear, so the
nonlinearities between them see the merged weights (weight-ensembling, spec §1.3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """``d_in`` → ``K`` raw coefficients (no softmax): depth 0 = a constant bias, 1 = Linear,
    2 = Linear-ReLU-Linear. The last bias starts at λ, weights at N(0, 0.01²) (spec §1.1)."""

    def __init__(self, d_in: int, k: int, depth: int, hidden: int, init_lambda: float = 0.3,
                 position_dim: int = 0):
        super().__init__()
        self.depth, self.position_dim = depth, position_dim
        if depth == 0:
            self.bias = nn.Parameter(torch.full((k,), float(init_lambda)))
        elif depth == 1:
            self.fc = nn.Linear(d_in + position_dim, k)
        elif depth == 2:
            self.fc1 = nn.Linear(d_in + position_dim, hidden)
            self.fc2 = nn.Linear(hidden, k)
        else:
            raise ValueError(f"router depth must be 0, 1 or 2, got {depth}")

    def forward(self, h: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        if self.depth == 0:
            return self.bias.expand(*h.shape[:-1], -1)
        if self.position_dim:
            pe = position_encoding(layer or 0, self.position_dim).to(h.device, h.dtype)
            h = torch.cat([pe.expand(*h.shape[:-1], -1), h], dim=-1)
        if self.depth == 1:
            return self.fc(h)
        return self.fc2(F.relu(self.fc1(h)))


def position_encoding(layer: int, dim: int) -> torch.Tensor:
    """``[sin(l·ω_j)…, cos(l·ω_j)…]`` with ``ω_j = 10000^(−2j/D)`` (E-WEMoE, spec §3)."""
    j = torch.arange(dim // 2, dtype=torch.float64)
    omega = 10000.0 ** (-2.0 * j / dim)
    return torch.cat([torch.sin(layer * omega), torch.cos(layer * omega)]).float()


def soft_top_k(c: torch.Tensor, k: int) -> torch.Tensor:
    """Rank-one MoE's soft top-k over the whole coefficient vector: ``c ⊙ σ(100 (c − τ_k))``."""
    if k <= 0 or k >= c.shape[-1]:
        return c
    tau = torch.topk(c, k, dim=-1).values[..., -1:]
    return c * torch.sigmoid(100.0 * (c - tau))


class RoutingState:
    """Shared by every group of one model: flags and the per-forward context."""

    def __init__(self, batch_reduce: bool = False):
        self.batch_reduce = batch_reduce
        self.token_mask: torch.Tensor | None = None  # [B, T] of the current forward, if any
        self.forced: torch.Tensor | None = None  # coefficients forced on every group ([K] or [B, K])
        self.preference: torch.Tensor | None = None  # PWE-MoE: the router input
        self.record: list | None = None  # when a list, groups append their coefficients


class RoutingGroup:
    """One upscaled block: its router, its layer index and the coefficients of the last input."""

    def __init__(self, router: Router, state: RoutingState, layer: int, select_k: int = -1):
        self.router, self.state, self.layer, self.select_k = router, state, layer, select_k
        self._input = None
        self.last: torch.Tensor | None = None

    def reset(self) -> None:
        self._input, self.last = None, None

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """Coefficients for block input ``x``: ``[K]`` (one merge) or ``[B, K]`` (per sample)."""
        if self._input is x and self.last is not None:  # gate_proj and up_proj read the same x
            return self.last
        st = self.state
        if st.forced is not None:
            c = st.forced.to(x.device, torch.float32)
        elif st.preference is not None:
            c = self.router(st.preference.to(x.device, torch.float32)).float()
        elif self.router.depth == 0:
            c = self.router.bias.float()
        else:
            r = self.router(x, self.layer).float()
            if r.dim() == 3:  # [B, T, K]: mean over the tokens of each sample
                mask = st.token_mask
                if mask is not None and tuple(mask.shape) == tuple(r.shape[:2]):
                    m = mask.to(r.device, r.dtype).unsqueeze(-1)
                    r = (r * m).sum(1) / m.sum(1).clamp_min(1.0)
                else:
                    r = r.mean(1)
            c = r.mean(0) if st.batch_reduce else r
        c = soft_top_k(c, self.select_k)
        if st.record is not None:
            st.record.append((self.layer, c))
        self._input, self.last = x, c
        return c

    def current(self, x: torch.Tensor) -> torch.Tensor:
        if self.last is None:  # a group whose first Linear did not run: route on this input
            return self.coefficients(x)
        return self.last


def _expand(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficients ``[B, K]`` broadcast over the token dimensions of ``x``."""
    return c.reshape(c.shape[0], *([1] * (x.dim() - 2)), c.shape[1])


class WELinear(nn.Module):
    """``y = (W0 + Σ c_i ΔW_i) x + (b0 + Σ c_i Δb_i)``: a Linear with routed task vectors."""

    def __init__(self, in_features: int, out_features: int, experts: int, bias: bool,
                 dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        self.delta_weight = nn.Parameter(torch.empty(experts, out_features, in_features, **kw), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False)
            self.delta_bias = nn.Parameter(torch.empty(experts, out_features, **kw), requires_grad=False)
        else:
            self.bias = self.delta_bias = None
        self.group: RoutingGroup | None = None
        self.is_entry = False

    def merged(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The plain Linear's (weight, bias) for one coefficient vector ``c`` [K]."""
        c = c.to(self.weight.dtype)
        w = self.weight + torch.einsum("n,noi->oi", c, self.delta_weight)
        b = None if self.bias is None else self.bias + c @ self.delta_bias
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.group.coefficients(x) if self.is_entry else self.group.current(x)
        if c.dim() == 1:
            return F.linear(x, *self.merged(c))
        c = c.to(x.dtype)
        y = F.linear(x, self.weight, self.bias)
        tokens = x[0].numel() // self.in_features  # tokens per sample
        if self.in_features <= tokens * c.shape[1]:  # cheaper: one merged weight per sample
            w = torch.einsum("bn,noi->boi", c, self.delta_weight)
            flat = x.reshape(x.shape[0], -1, self.in_features)
            y = y + torch.bmm(flat, w.transpose(1, 2)).reshape(y.shape)
        else:  # cheaper: n extra matmuls on the batch, combined per sample
            d = torch.einsum("...i,noi->...no", x, self.delta_weight)
            y = y + (d * _expand(c, x).unsqueeze(-1)).sum(-2)
        if self.delta_bias is not None:
            y = y + _expand(c @ self.delta_bias, x)
        return y


class RankOneLinear(nn.Module):
    """Rank-one MoE Linear: ``W = W0 + Σ_j c_j σ_j u_j v_jᵀ``; bias static ``b0 + λ Σ Δb_i``."""

    def __init__(self, in_features: int, out_features: int, components: int, bias: bool,
                 dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        self.expert_u = nn.Parameter(torch.empty(components, out_features, **kw), requires_grad=False)  # σ·u
        self.expert_v = nn.Parameter(torch.empty(components, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None
        self.group: RoutingGroup | None = None
        self.is_entry = False

    def merged(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = c.to(self.weight.dtype)
        return self.weight + torch.einsum("k,ko,ki->oi", c, self.expert_u, self.expert_v), self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.group.coefficients(x) if self.is_entry else self.group.current(x)
        if c.dim() == 1:
            return F.linear(x, *self.merged(c))
        y = F.linear(x, self.weight, self.bias)
        proj = F.linear(x, self.expert_v) * _expand(c.to(x.dtype), x)  # [..., K]
        return y + proj @ self.expert_u


def prune_magnitude(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero every entry with ``|t| <= q``, ``q`` the ``ratio`` quantile of ``|t|`` with linear
    interpolation between order statistics (``torch.quantile``'s rule, any tensor size)."""
    if ratio <= 0:
        return t.clone()
    flat = t.detach().abs().flatten().float()
    n = flat.numel()
    pos = ratio * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    vlo = torch.kthvalue(flat, lo + 1).values
    vhi = torch.kthvalue(flat, hi + 1).values if hi != lo else vlo
    q = vlo + (pos - lo) * (vhi - vlo)
    return t * (t.abs().float() > q).to(t.dtype)


def routed_linears(model: nn.Module):
    """``(name, module)`` of every routed Linear in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (WELinear, RankOneLinear))]
