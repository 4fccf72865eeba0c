"""The engine's adapter registry: public names, their versions on the model, and path confinement.

A served adapter has a public name (what a request's ``model`` field says, any string) and an
internal name on the patched model (``fa_serve_<n>``, a fresh ``n`` for every load). A reload of a
public name therefore creates a new internal adapter: nothing cached per adapter (the store's
slots, a prefix's keys/values) can be served stale, and requests still running on the previous
version finish on it. An unload removes the public name at once (new requests get "unknown
model") and deletes the internal adapter when its last running request is done.

Runtime loads are confined to the ``adapter_roots`` given at start-up (``confine``): a relative
``lora_path`` is taken under a root (the first one that has it), never under the server's working
directory; the folder is resolved (symlinks included) and must lie inside one of the resolved roots,
and so must every file in it -- a weights file that is a symlink to elsewhere is refused, as is
anything that is not a regular file (a FIFO, a device); subfolders are not read by the loaders
and not checked. The files' total size is checked against a
limit before any is read (``default_max_adapter_bytes``: a rank-128 LoRA on every linear layer of the
base model, in float32). Error messages quote only what the client sent, never a resolved path
outside the roots or the server's working directory. With no roots, runtime loading is off.
Adapters named on the command line are trusted and may live anywhere. Weights that are not finite
(NaN / inf) are refused at every load (``nonfinite_adapter_tensor``).
"""
from __future__ import annotations

import itertools
import os
import stat
from dataclasses import dataclass, field

import torch

__all__ = ["AdapterEntry", "AdapterRegistry", "AdapterError", "UnknownAdapter", "PathNotAllowed", "confine",
           "default_max_adapter_bytes", "nonfinite_adapter_tensor", "show"]


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


def show(text, limit: int = 80) -> str:
    """``repr(text)`` for an error message, cut to ``limit`` characters (echoed names stay short) and
    safe to encode (a lone surrogate is written as an escape)."""
    r = repr(text) if isinstance(text, str) else repr(type(text).__name__)
    if len(r) > limit:
        r = r[:limit] + f"...' ({len(text)} characters)"
    return r.encode("utf-8", "backslashreplace").decode("utf-8")


def _inside(real: str, base: str) -> bool:
    return os.path.commonpath([real, base]) == base


def confine(path: str, roots: list[str], max_bytes: int | None = None) -> str:
    """The adapter folder ``path`` resolved, after checking that it and every file in it lie inside one
    of ``roots`` (resolved too), that every file is a regular file, and (``max_bytes``) that their
    total size is within the limit -- all before anything is read. A relative ``path`` is taken under
    the first root that has it (else the first root). PathNotAllowed (403) / AdapterError (400)
    otherwise; messages quote ``path`` as given, nothing resolved outside the roots."""
    if not roots:
        raise PathNotAllowed("runtime adapter loading is off: start the server with --adapter-root DIR")
    if not isinstance(path, str) or not path or "\x00" in path:
        raise AdapterError(f"lora_path: got {show(path)}; valid: a folder under an --adapter-root "
                           "(absolute, or relative to the root)")
    bases = [os.path.realpath(r) for r in roots]
    if os.path.isabs(path):
        candidates = [path]
    else:
        candidates = [os.path.join(b, path) for b in bases]
        candidates = [c for c in candidates if os.path.exists(c)] or candidates[:1]
    real = os.path.realpath(candidates[0])
    base = next((b for b in bases if _inside(real, b)), None)
    if base is None:
        raise PathNotAllowed(f"lora_path {show(path)} is outside the adapter roots; valid: a folder under an "
                             "--adapter-root (a relative path is taken under the root)")
    if not os.path.isdir(real):
        raise AdapterError(f"lora_path {show(path)}: no adapter folder there")
    total = 0
    for entry in sorted(os.listdir(real)):  # the loaders read files in the folder itself, not below it
        full = os.path.join(real, entry)
        if os.path.isdir(full):
            continue
        target = os.path.realpath(full)
        rel = show(entry)
        if not any(_inside(target, b) for b in bases):
            raise PathNotAllowed(f"lora_path {show(path)}: the file {rel} links outside the adapter roots; "
                                 "valid: files that are inside a root")
        try:
            st = os.stat(target)
        except OSError:
            raise AdapterError(f"lora_path {show(path)}: the file {rel} cannot be read (a broken link?)") from None
        if not stat.S_ISREG(st.st_mode):
            raise AdapterError(f"lora_path {show(path)}: {rel} is not a regular file")
        total += st.st_size
    if max_bytes is not None and total > max_bytes:
        raise AdapterError(f"lora_path {show(path)}: its files hold {total} bytes, more than the limit of "
                           f"{max_bytes} (--max-adapter-bytes)")
    return real


def private_copy(folder: str, roots: list[str], max_bytes: int | None, shown: str) -> str:
    """Copy the adapter files of ``folder`` (already checked by ``confine``) into a new private
    temporary folder and return it; the caller loads from the copy and removes it. Each file is
    opened once, without following a link in its last component (``O_NOFOLLOW``), and checked on the
    open descriptor -- a regular file, inside the size limit counted as it is read -- so a file
    swapped for a link or a larger file between ``confine``'s check and the read is refused, never
    read. Messages quote ``shown`` (the path as the client gave it)."""
    import shutil
    import tempfile

    bases = [os.path.realpath(r) for r in roots]
    out = tempfile.mkdtemp(prefix="fastadapters-adapter-")
    total = 0
    try:
        for entry in sorted(os.listdir(folder)):
            full = os.path.join(folder, entry)
            if os.path.isdir(full):
                continue
            target = os.path.realpath(full)  # confine allowed links that stay inside a root
            if not any(_inside(target, b) for b in bases):
                raise PathNotAllowed(f"lora_path {show(shown)}: the file {show(entry)} links outside the adapter "
                                     "roots; valid: files that are inside a root")
            try:
                fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            except OSError:
                raise AdapterError(f"lora_path {show(shown)}: the file {show(entry)} cannot be opened as a regular "
                                   "file") from None
            with os.fdopen(fd, "rb") as src:
                st = os.fstat(src.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise AdapterError(f"lora_path {show(shown)}: {show(entry)} is not a regular file")
                with open(os.path.join(out, entry), "wb") as dst:
                    while True:
                        chunk = src.read(1 << 20)
                        if not chunk:
                            break
                        total += len(chunk)
                        if max_bytes is not None and total > max_bytes:
                            raise AdapterError(f"lora_path {show(shown)}: its files hold more than the limit of "
                                               f"{max_bytes} bytes (--max-adapter-bytes)")
                        dst.write(chunk)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def default_max_adapter_bytes(model, rank: int = 128, floor: int = 16 << 20) -> int:
    """A size limit for a runtime-loaded adapter folder, from the base model's shapes: a LoRA of rank
    ``rank`` on every linear layer, in float32, plus 1 MiB for the config and file headers; at least
    ``floor``. (For SmolLM2-135M: about 157 MB, against 538 MB of base weights.)"""
    import torch.nn as nn

    params = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and w is not None and w.dim() == 2):
            params += rank * (w.shape[0] + w.shape[1])
    return max(floor, 4 * params + (1 << 20))


def nonfinite_adapter_tensor(model, internal: str) -> str | None:
    """The name of the first parameter or buffer of adapter ``internal`` on ``model`` that holds a NaN
    or inf (as ``module.path``, the internal name left out), or None when all are finite."""
    key = "." + internal
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if (key + "." in name or name.endswith(key)) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name.replace(key, "")
    return None


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
