"""Shared cases for tests/csrc: popularity patterns of per-row slots, a random adapter store of
mixed ranks and activations, and the multi-adapter semantics written row by row in fp64 (the
independent check of ``multi_adapter_ref``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PATTERNS = ("distinct", "uniform", "skewed", "identical")


def make_row_slot(pattern: str, M: int, S: int, base_frac: float, gen: torch.Generator):
    """Per-row slots in a popularity pattern, with about base_frac of the rows base (-1)."""
    if pattern == "distinct":
        slots = torch.arange(M) % S
    elif pattern == "uniform":
        slots = torch.randint(0, S, (M,), generator=gen)
    elif pattern == "skewed":  # Zipf-like: slot 0 most popular
        w = torch.tensor([1.0 / (i + 1) ** 1.5 for i in range(S)])
        slots = torch.multinomial(w, M, replacement=True, generator=gen)
    elif pattern == "identical":
        slots = torch.full((M,), S // 2)
    else:
        raise KeyError(pattern)
    base = torch.rand(M, generator=gen) < base_frac
    return torch.where(base, torch.full_like(slots, -1), slots).to(torch.int32)


def make_store(S, R, K, N, dtype, gen, sizes=None, acts=None):
    down = torch.randn(S, R, K, generator=gen).to(dtype) / math.sqrt(K)
    up = torch.randn(S, N, R, generator=gen).to(dtype) / math.sqrt(R)
    if sizes is None:
        sizes = torch.randint(0, R + 1, (S,), generator=gen)
    sizes = torch.as_tensor(sizes, dtype=torch.int32)
    if acts is None:
        acts = torch.arange(S) % 6
    acts = torch.as_tensor(acts, dtype=torch.int32)
    scales = (torch.rand(S, generator=gen) + 0.5).to(torch.float32)
    return down, up, sizes, scales, acts


def loop_reference(y0, x, row_slot, down, up, sizes, scales, act_ids):
    """The semantics row by row, in fp64, exactly as written in the module docstring."""
    acts = [lambda t: t, torch.tanh, torch.relu, lambda t: F.gelu(t), F.silu, torch.sigmoid]
    y = y0.double().clone()
    for m in range(x.shape[0]):
        s = int(row_slot[m])
        if s < 0:
            continue
        r = int(sizes[s])
        h = acts[int(act_ids[s])](down[s, :r, :].double() @ x[m].double())
        y[m] = y0[m].double() + float(scales[s]) * (up[s, :, :r].double() @ h)
    return y
