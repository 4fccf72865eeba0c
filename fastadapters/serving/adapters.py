"""The engine's adapter registry: public names, their versions on the model, and path confinement.

A served adapter has a public name (what a request's ``model`` field says, any string) and an
internal name on the patched model (``fa_serve_<n>``, a fresh ``n`` for every load). A reload of a
public name therefore creates a new internal adapter: nothing cached per adapter (the store's
slots, a prefix's keys/values) can be served stale, and requests still running on the previous
version finish on it. An unload removes the public name at once (new requests get "unknown
model") and deletes the internal adapter when its last running request is done.

Runtime loads are confined to the ``adapter_roots`` given at start-up: the path is resolved
(symlinks included) and must lie inside one of the resolved roots; with no roots, runtime loading
is off. Adapters named on the command line are trusted and may live anywhere.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import torch

__all__ = ["AdapterEntry", "AdapterRegistry", "AdapterError", "UnknownAdapter", "PathNotAllowed", "confine"]


class AdapterError(ValueError):
    """A bad load / unload request (HTTP 400)."""


class UnknownAdapter(AdapterError):
    """No adapter by that name (HTTP 404)."""


class PathNotAllowed(AdapterError):
    """A runtime load from outside the adapter roots, or with runtime loading off (HTTP 403)."""


@dataclass(eq=False)
class AdapterEntry:
    name: str
    path: str
    internal: str
    adapter_type: str
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (H, P, D)
    refs: int = 0  # requests admitted and not finished
    unloaded: bool = False
    created: int = 0
    metadata: dict = field(default_factory=dict)


def confine(path: str, roots: list[str]) -> str:
    """``path`` resolved; AdapterError unless it lies inside one of ``roots`` (resolved too)."""
    if not roots:
        raise PathNotAllowed("runtime adapter loading is off: start the server with --adapter-root DIR")
    if not isinstance(path, str) or not path:
        raise AdapterError(f"lora_path: got {path!r}; valid: a directory under {roots}")
    real = os.path.realpath(path)
    for root in roots:
        base = os.path.realpath(root)
        if os.path.commonpath([real, base]) == base:
            return real
    raise PathNotAllowed(f"lora_path {path!r} resolves to {real!r}, which is outside the adapter roots {roots}")


class AdapterRegistry:
    def __init__(self):
        self.entries: dict[str, AdapterEntry] = {}  # public name -> current version
        self._counter = itertools.count()

    def new_internal_name(self) -> str:
        return f"fa_serve_{next(self._counter)}"

    def get(self, name: str) -> AdapterEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise UnknownAdapter(f"the model {name!r} does not exist; served: {self.names()}")
        return entry

    def names(self) -> list[str]:
        return list(self.entries)
