"""Training beyond one device: what the rest of the package needs to know about DDP and FSDP2.

The order is always **patch first, then wrap or shard**. ``DistributedDataParallel`` and FSDP2's
``fully_shard`` take over the parameters that exist when they are called: a parameter added later
(an adapter patched into an already-sharded model) is never all-gathered or reduced, so ranks
would silently drift apart. ``patch`` therefore refuses a sharded model (``sharding_of`` says why),
and ``shard_model`` applies FSDP2 the way our adapters need it: one unit per decoder layer (each
``AdapterLinear`` sits inside the layer that owns its base weight and adapter weights, so every
kernel reads unsharded tensors inside that unit's forward) and one at the root (embeddings, head,
final norm and the prefix-tuning encoder).

Saving from a sharded run (``fastadapters.io.save_adapter``) gathers each adapter tensor with
``full_tensor`` -- a collective, so every rank calls ``save_adapter`` -- and only global rank 0
writes; the others wait for it and raise if it failed.

The same order holds for changing which adapters exist or train: ``set_adapter`` to another adapter,
``delete_adapter`` and ``unpatch`` on a sharded or wrapped model are refused
(``refuse_adapter_change_if_sharded``). FSDP2 fixes its reduce dtype and its gradient set from the
parameters that need a gradient when it first runs, and keeps references to every parameter it
sharded; DDP builds its buckets from the parameters that needed a gradient when it was built. Setting
the adapter that is already active changes nothing and is allowed. An unsharded distributed run (DDP) needs no
collective: rank 0 writes, the others return at once.

This module imports only torch, so every layer of the package may use it.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

__all__ = ["sharding_of", "refuse_adapter_change_if_sharded", "shard_model", "decoder_layers", "prepare_for_fully_shard", "full_tensor", "copy_whole",
           "rank_and_world", "write_on_rank0"]


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def sharding_of(model: nn.Module) -> str | None:
    """How a data-parallel wrapper took over ``model`` ("FSDP2 (fully_shard)", "FSDP1
    (FullyShardedDataParallel)", "DistributedDataParallel", "DTensor parameters"), or None when it
    is a plain module whose parameters are plain tensors (parameters added now would be seen)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover
        FSDP1 = ()
    for mod in model.modules():
        if FSDPModule and isinstance(mod, FSDPModule):
            return "FSDP2 (fully_shard)"
        if FSDP1 and isinstance(mod, FSDP1):
            return "FSDP1 (FullyShardedDataParallel)"
        if isinstance(mod, DDP):
            return "DistributedDataParallel"
    for p in model.parameters():
        if _is_dtensor(p):
            return "DTensor parameters"
    return None


def refuse_adapter_change_if_sharded(model: nn.Module, call: str) -> None:
    """Raise ValueError when ``model`` is sharded or wrapped for data parallelism (``sharding_of``):
    ``call`` (e.g. "set_adapter(model, 'b')") would change which parameters exist or need a gradient
    after the wrapper took them over, so ranks would drift apart or FSDP would keep parameters the
    model no longer has. Nothing is changed; the message says which order works instead.

    A model inside a ``DistributedDataParallel`` carries no mark of it: passing ``ddp.module`` is
    not detected, so switch adapters before wrapping."""
    how = sharding_of(model)
    if how is None:
        return
    raise ValueError(
        f"{call} on a model already wrapped for data parallelism ({how}) is refused; nothing was changed. "
        "The wrapper took over the parameters that existed and needed a gradient when it was built, so "
        "adding, removing or switching the training adapter now would leave ranks out of step. Choose the "
        "adapter (set_adapter / delete_adapter / unpatch) on the plain model first, then wrap it in "
        "DistributedDataParallel or shard it (fastadapters.distributed.shard_model); a sharded model can be "
        "saved (fastadapters.save_adapter) and loaded unsharded to change it")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model, in order: instances of its
    ``_no_split_modules`` classes, else of transformers' ``GradientCheckpointingLayer``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        try:
            from transformers.modeling_layers import GradientCheckpointingLayer
        except ImportError:  # pragma: no cover - very old transformers
            GradientCheckpointingLayer = None
        if GradientCheckpointingLayer is not None:
            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return layers


def shard_model(model: nn.Module, *, mp_policy=None, reshard_after_forward: bool = True, mesh=None,
                layers: Iterable[nn.Module] | None = None) -> nn.Module:
    """FSDP2 for a (patched) model: ``fully_shard`` on each decoder layer, then on the root.

    Call it after ``fastadapters.patch`` / ``load_adapter``: adapters added to a sharded model would
    never be reduced, so ``patch`` refuses one. ``mp_policy`` is passed through (e.g.
    ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``); ``layers``
    overrides the decoder-layer lookup (``decoder_layers``). 0-d parameters (learned adapter
    scalings) become 1-element vectors first, as ``fully_shard`` requires. Returns the model,
    sharded in place.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    already = sharding_of(model)
    if already is not None:
        raise ValueError(f"this model is already wrapped ({already}); shard_model takes a plain (patched) model")
    layers = list(decoder_layers(model) if layers is None else layers)
    if not layers:
        raise ValueError(f"found no decoder layers in {type(model).__name__} (neither its _no_split_modules "
                         f"{list(getattr(model, '_no_split_modules', None) or [])} nor GradientCheckpointingLayer "
                         "instances); pass layers=[...] to shard per layer")
    prepare_for_fully_shard(model)
    kwargs = {"mp_policy": mp_policy if mp_policy is not None else MixedPrecisionPolicy()}
    if mesh is not None:
        kwargs["mesh"] = mesh
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model


def prepare_for_fully_shard(model: nn.Module) -> None:
    """``fully_shard`` refuses 0-d parameters (a learned adapter scaling is one): each becomes a
    1-element vector, which every op takes alike (``fastadapters.io`` saves it as a scalar again).
    ``shard_model`` calls it; call it yourself before another tool (accelerate) shards the model."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.dim() == 0:
                mod._parameters[name] = nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind ``t``: a DTensor is gathered (a collective: every rank must call),
    a plain tensor is returned as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def copy_whole(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy ``whole`` (the full tensor) into ``param``: a plain tensor takes it as it is, a DTensor
    keeps its own part (cut locally on every rank: no communication). Call under ``no_grad``."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        local = param.to_local()
        whole = whole.reshape(param.shape).to(device=local.device, dtype=param.dtype)
        param.copy_(distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None))
    else:
        param.copy_(whole.reshape(param.shape))


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of the default process group; (0, 1) when none is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def write_on_rank0(write: Callable[[], None], every_rank: bool) -> None:
    """Run ``write`` on global rank 0 only (everywhere when there is no process group).

    ``every_rank``: all ranks are here (a sharded save); they return only once rank 0 has written,
    and if rank 0 failed, every rank raises (rank 0 its own error, the others a RuntimeError that
    quotes it) -- none waits forever, and none goes on as if the files existed.
    """
    rank, world = rank_and_world()
    if not every_rank or world == 1:
        if rank == 0:
            write()
        return
    import torch.distributed as dist

    error = None
    if rank == 0:
        try:
            write()
        except BaseException as e:  # reported to the other ranks, then raised here
            error = e
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, src=0)
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"global rank 0 could not write the adapter: {status[0]}")
