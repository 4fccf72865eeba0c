"""``fastadapters train``: fine-tune one adapter on an Alpaca-format JSON file, like LLM-Adapters'
``finetune.py`` (same prompt, tokenization, batch arithmetic and Trainer loop), without its bugs:

- gradient checkpointing works on a full-precision or bf16 base (non-reentrant checkpointing plus
  input grads, so a frozen base still back-propagates into the adapters), not only in 8-bit, and
  for every adapter type (prefixes included: see ``patching._prefix_forward``);
- ``--target-modules`` is honoured for every adapter type that has target modules;
- the best checkpoint (lowest eval loss) is loaded back at the end before the adapter is saved;
- checkpoints and the final output hold only adapter weights (``fastadapters.save_adapter``), and
  resuming restores them with ``fastadapters.load_adapter`` plus the Trainer's optimizer state.

Adapter-only checkpoints are implemented in :class:`AdapterTrainer`, a ``transformers.Trainer`` whose
three weight hooks are replaced: ``save_model`` (what a checkpoint or the end writes; every rank calls it),
``_load_from_checkpoint`` (resume) and ``_load_best_model`` (best checkpoint at the end). Everything
else (optimizer, scheduler, RNG and trainer state files, rotation, evaluation) is the stock Trainer.

Every argument is checked, the data is read and validated and the adapter config is built before
anything is written; errors print one line on stderr and return exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any

from .cli import CommandParser as _Parser, UsageError, check_device, run_command, show_progress
from .config import ADAPTER_SPELLINGS
from .data import DataError, load_records, split_train_val, tokenize_records
from .prompts import STYLES

ADAPTERS = tuple(ADAPTER_SPELLINGS)  # the API's spellings (config.py), so CLI and API agree
SAVE_FORMATS = ("fastadapters", "peft")
PEFT_FORMAT_ADAPTERS = ("lora", "prefix")  # adapter types io.save_adapter writes in PEFT format
DESCRIPTION = """\
Fine-tune one adapter on an Alpaca-format JSON file, like LLM-Adapters' finetune.py: the same prompt,
tokenization, batch arithmetic and Trainer loop. Only the adapter's weights are trained and saved (in
checkpoints too); with a validation set the best checkpoint (lowest eval loss) is loaded back at the end."""
EPILOG = """\
example:
  fastadapters train --base-model ./llama --data math_10k.json --output-dir out/lora \\
      --adapter lora --r 32 --alpha 64 --lr 3e-4 --num-epochs 3 --limit 1000 --val-set-size 100"""
DTYPES = ("float32", "bfloat16", "float16")

# LLM-Adapters' defaults, made for 10k-170k records. Left unset, a flag keeps its default on such data
# and scales down on a small data set (scale_defaults says which, before the model loads).
DEFAULT_BATCH, DEFAULT_MICRO_BATCH, DEFAULT_VAL_SET, DEFAULT_WARMUP = 128, 4, 2000, 100
SCALED_NOTE = " (scaled down on a small data set; the run says so)"

# CLI flag (argparse dest) -> config field. Which fields apply is read from the config dataclass.
FIELD_FLAGS = {
    "r": "r",
    "alpha": "alpha",
    "dropout": "dropout",
    "use_rslora": "use_rslora",
    "bottleneck_size": "bottleneck_size",
    "non_linearity": "non_linearity",
    "scaling": "scaling",
    "init": "init",
    "variant": "variant",
    "target_modules": "target_modules",
    "num_virtual_tokens": "num_virtual_tokens",
    "prefix_projection": "prefix_projection",
    "encoder_hidden_size": "encoder_hidden_size",
}




def _scaling(value: str):
    if value == "learned":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'learned', got {value!r}") from None


def _modules(values: list[str]) -> list[str]:
    """--target-modules words: separate arguments, or one quoted argument with commas and/or spaces
    ("q_proj v_proj", "q_proj, v_proj"); module names hold neither."""
    return [s for v in values for s in v.replace(",", " ").split()]


def _config_defaults(dest: str) -> str:
    """The config defaults behind an adapter flag left unset: "8", or "0.0 for lora, 0.1 for series"."""
    from .config import CONFIG_CLASSES

    if FIELD_FLAGS.get(dest) is None:
        return ""
    found: dict[str, Any] = {}
    for kind, cls in CONFIG_CLASSES.items():
        for f in dataclasses.fields(cls):
            if f.name == FIELD_FLAGS[dest] and f.default is not dataclasses.MISSING and f.default is not None:
                found[kind] = f.default
    if not found:
        return ""
    if len(set(map(repr, found.values()))) == 1:
        return str(next(iter(found.values())))
    return ", ".join(f"{v} for {k}" for k, v in found.items())


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastadapters train", description=DESCRIPTION, epilog=EPILOG)
    g = p.add_argument_group("data and model")
    g.add_argument("--base-model", required=True, help="local model directory or transformers model id")
    g.add_argument("--gguf-file", metavar="NAME", default=None,
                   help="load the base model from this GGUF file inside --base-model (dequantized to "
                        "--model-dtype); default: the directory's config.json and weights")
    g.add_argument("--data", required=True, help="Alpaca-format JSON (or .jsonl): instruction, input, output")
    g.add_argument("--output-dir", required=True, help="where checkpoints and the final adapter go")
    g.add_argument("--cutoff-len", type=int, default=256, help="maximum tokens per example (truncated)")
    g.add_argument("--val-set-size", type=int, default=None,
                   help=f"records held out for evaluation (0: none); default: {DEFAULT_VAL_SET}, or a tenth of "
                        f"the records when {DEFAULT_VAL_SET} would be more than a fifth of them")
    g.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use only the first N records of --data (before the validation split); default: all")
    g.add_argument("--train-on-inputs", action=argparse.BooleanOptionalAction, default=True,
                   help="also compute the loss on the prompt tokens (false: mask them with -100)")
    g.add_argument("--prompt-style", choices=STYLES, default="llm-adapters",
                   help="llm-adapters: their template byte for byte; alpaca: the clean template")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to train (default: cuda when a GPU is visible, else cpu); pick GPUs with "
                        "CUDA_VISIBLE_DEVICES or torchrun")
    g.add_argument("--model-dtype", choices=DTYPES, default=None,
                   help="dtype of the base weights (default: bfloat16 with --bf16, else float32)")

    a = p.add_argument_group("adapter (unset fields take the config's defaults)")
    a.add_argument("--adapter", choices=ADAPTERS, default="lora",
                   help="series = houlsby = the Houlsby placement (AdapterH); pfeiffer = series with the Pfeiffer "
                        "placement (AdapterP); the same spellings as fastadapters.patch(adapter=...)")
    a.add_argument("--r", "--lora-r", dest="r", type=int, help="LoRA rank")  # --lora-r: torchrun rejects --r
    a.add_argument("--alpha", type=float, help="LoRA alpha")
    a.add_argument("--dropout", type=float, help="LoRA / bottleneck dropout")
    a.add_argument("--use-rslora", action=argparse.BooleanOptionalAction, default=None, help="LoRA scaling alpha/sqrt(r)")
    a.add_argument("--bottleneck-size", type=int, help="series/parallel bottleneck width")
    a.add_argument("--non-linearity", help="series/parallel activation (tanh, relu, gelu, silu, swish, sigmoid)")
    a.add_argument("--scaling", type=_scaling, help="series/parallel output scaling: a number or 'learned'")
    a.add_argument("--init", help="series/parallel init: bert (LLM-Adapters' own; changes the model's outputs before "
                        "any training) or zero_up (up-projection at zero: starts as the identity)")
    a.add_argument("--variant", choices=("houlsby", "pfeiffer"),
                   help="series placement (same as --adapter houlsby / pfeiffer)")
    a.add_argument("--target-modules", nargs="+", metavar="NAME",
                   help="module-name suffixes to adapt (space or comma separated; each must match a module), or "
                        "all-linear (every linear but the output head); default: the architecture's")
    a.add_argument("--num-virtual-tokens", type=int, help="prefix length")
    a.add_argument("--prefix-projection", action=argparse.BooleanOptionalAction, default=None,
                   help="prefix through an MLP (Li & Liang)")
    a.add_argument("--encoder-hidden-size", type=int, help="width of the prefix MLP")
    for action in a._group_actions:  # unset fields take the config's defaults: show those
        shown = _config_defaults(action.dest)
        if shown:
            action.help = f"{action.help} (default: {shown})"

    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=int, default=None,
                   help=f"examples per optimizer step; default: {DEFAULT_BATCH}, or the training records rounded "
                        "down to a multiple of --micro-batch-size when there are fewer")
    t.add_argument("--micro-batch-size", type=int, default=None,
                   help=f"examples per forward pass (the rest is gradient accumulation); default: "
                        f"{DEFAULT_MICRO_BATCH}, or fewer when there are fewer training records")
    t.add_argument("--num-epochs", type=float, default=3, help="passes over the training records")
    t.add_argument("--max-steps", type=int, default=-1,
                   help="stop after this many optimizer steps (overrides --num-epochs; -1: off)")
    t.add_argument("--learning-rate", "--lr", type=float, default=3e-4, metavar="LR", help="peak learning rate")
    t.add_argument("--warmup-steps", type=int, default=None,
                   help=f"linear warm-up steps; default: {DEFAULT_WARMUP}, or a tenth of the run when "
                        f"{DEFAULT_WARMUP} would be more than half of it")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--lr-scheduler", default="linear",
                   help="transformers scheduler name (linear, cosine, constant, constant_with_warmup, ...)")
    t.add_argument("--bf16", action="store_true",
                   help="bf16: base weights in bfloat16, adapters in fp32 (autocast only with --model-dtype "
                        "float32); meant for a GPU: on a CPU it runs, with a warning, far slower than fp32")
    t.add_argument("--fp16", action="store_true", help="fp16 mixed precision (needs a CUDA GPU; refused on a CPU)")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (less memory, more time)")
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard with FSDP2 (per decoder layer and at the root) instead of DDP; needs CUDA")
    t.add_argument("--eval-steps", type=int, default=200, help="evaluate on the validation set every N steps")
    t.add_argument("--eval-at-start", action=argparse.BooleanOptionalAction, default=True,
                   help="with a validation set, also evaluate before the first step (the step-0 eval loss)")
    t.add_argument("--save-steps", type=int, default=200, help="write a checkpoint every N steps")
    t.add_argument("--save-total-limit", type=int, default=3, help="checkpoints kept (with a validation set the best one is kept too)")
    t.add_argument("--logging-steps", type=int, default=10,
                   help="print a loss line (with epoch, learning rate, grad norm) every N steps; a progress "
                        "line (step, loss, time per step, ETA) comes at every step of a run of up to "
                        f"{PROGRESS_EVERY_STEP_UP_TO} steps, else at least every {PROGRESS_HEARTBEAT_S:g} s")
    t.add_argument("--group-by-length", action="store_true", help="batch examples of similar length together")
    t.add_argument("--seed", type=int, default=42, help="seed for the validation split, init and data order")
    t.add_argument("--resume-from-checkpoint", metavar="PATH",
                   help="a checkpoint-N directory, 'last' (newest in --output-dir), or a saved adapter (weights only)")
    t.add_argument("--save-format", choices=SAVE_FORMATS, default="fastadapters",
                   help=f"format of the final adapter (peft: {' and '.join(PEFT_FORMAT_ADAPTERS)} adapters, "
                        "read by peft.PeftModel.from_pretrained)")
    t.add_argument("--report-to", default="none", help="Trainer integrations (none, wandb, tensorboard, ...)")
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bar (loss lines are still printed); there is none anyway when stderr is "
                        "not a terminal (a log file gets plain lines)")
    t.add_argument("--overwrite-output-dir", action="store_true", help="allow a non-empty --output-dir")
    return p


# ---------------------------------------------------------------------------------------------
# validation (nothing is written here)
# ---------------------------------------------------------------------------------------------

def adapter_config(args) -> Any:
    """The validated adapter config for ``args`` (UsageError naming the flag or field otherwise)."""
    from .config import CONFIG_CLASSES, make_config

    kind, implied = ADAPTER_SPELLINGS[args.adapter]
    cls = CONFIG_CLASSES[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    fields: dict[str, Any] = {}
    for dest, fld in FIELD_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if dest == "target_modules":
            value = _modules(value)
        if fld not in names:
            flag = "--" + dest.replace("_", "-")
            raise UsageError(f"{flag} does not apply to --adapter {args.adapter} "
                             f"(its fields: {', '.join(sorted(names))})")
        fields[fld] = value
    for fld, value in implied.items():  # e.g. --adapter pfeiffer fixes variant=pfeiffer
        if fields.get(fld, value) != value:
            raise UsageError(f"--adapter {args.adapter} conflicts with --{fld.replace('_', '-')} {fields[fld]}")
        fields[fld] = value
    try:
        return make_config(kind, **fields)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_args(args) -> None:
    # unset flags are checked at their defaults here; scale_defaults keeps what it scales consistent
    batch = DEFAULT_BATCH if args.batch_size is None else args.batch_size
    micro = DEFAULT_MICRO_BATCH if args.micro_batch_size is None else args.micro_batch_size
    if micro < 1 or batch < 1:
        raise UsageError("--batch-size and --micro-batch-size must be >= 1")
    if args.batch_size is not None or args.micro_batch_size is not None:
        if batch % micro:
            raise UsageError(f"--batch-size {batch} is not a multiple of --micro-batch-size {micro}")
        if batch % (micro * _world_size()):
            raise UsageError(f"--batch-size {batch} is not a multiple of --micro-batch-size "
                             f"{micro} x {_world_size()} processes")
    if args.val_set_size is not None and args.val_set_size < 0:
        raise UsageError(f"--val-set-size must be >= 0, got {args.val_set_size}")
    if args.cutoff_len < 1:
        raise UsageError(f"--cutoff-len must be >= 1, got {args.cutoff_len}")
    if args.bf16 and args.fp16:
        raise UsageError("--bf16 and --fp16 are exclusive")
    if args.save_format == "peft" and ADAPTER_SPELLINGS[args.adapter][0] not in PEFT_FORMAT_ADAPTERS:
        raise UsageError(f"--save-format peft holds {' and '.join(PEFT_FORMAT_ADAPTERS)} adapters only (PEFT has "
                         f"no bottleneck adapters); use --save-format fastadapters for --adapter {args.adapter}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.val_set_size is None or args.val_set_size > 0:
        if args.eval_steps < 1 or args.save_steps < 1:
            raise UsageError("--eval-steps and --save-steps must be >= 1")
        if args.save_steps % args.eval_steps:
            raise UsageError(f"--save-steps {args.save_steps} must be a multiple of --eval-steps {args.eval_steps} "
                             "so that the best checkpoint can be reloaded at the end")
    if args.max_steps == 0 or (args.max_steps < 0 and args.num_epochs <= 0):
        raise UsageError("nothing to train: give --num-epochs > 0 or --max-steps > 0")
    # checked here, before the model loads, rather than by the optimizer or TrainingArguments later
    # (a traceback, or an error naming their --logging_steps spelling)
    for flag, value in (("--learning-rate", args.learning_rate), ("--weight-decay", args.weight_decay)):
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag} must be a finite number >= 0, got {value:g}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.logging_steps < 1:
        raise UsageError(f"--logging-steps must be >= 1, got {args.logging_steps}")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32 - 1] (numpy's seed range), got {args.seed}")


def scale_defaults(args, n_records: int) -> tuple[list[str], list[str]]:
    """Fill the unset data-size flags for ``n_records`` records (after --limit), in place.

    LLM-Adapters' defaults stay on data of their size; on a small data set each unset flag scales
    down: --val-set-size to a tenth of the records when 2000 would be more than a fifth; --batch-size
    to the training records (rounded down to a multiple of the micro batch x processes) when there are
    fewer than 128, --micro-batch-size with it below 4; --warmup-steps to a tenth of the run when 100
    would be more than half of it. Returns (notes: what was scaled, warnings: an explicit batch that
    the training set cannot fill), both printed before the model loads."""
    notes, warnings = [], []
    world = _world_size()
    if args.val_set_size is None:
        args.val_set_size = DEFAULT_VAL_SET
        if DEFAULT_VAL_SET * 5 > n_records:
            args.val_set_size = n_records // 10
            notes.append(f"--val-set-size {args.val_set_size} (default {DEFAULT_VAL_SET})")
    n_train = n_records - args.val_set_size
    if args.micro_batch_size is None:
        args.micro_batch_size = DEFAULT_MICRO_BATCH
        if args.batch_size is None and 0 < n_train < DEFAULT_MICRO_BATCH * world:
            args.micro_batch_size = max(n_train // world, 1)
            notes.append(f"--micro-batch-size {args.micro_batch_size} (default {DEFAULT_MICRO_BATCH})")
    unit = args.micro_batch_size * world
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH
        if n_train < DEFAULT_BATCH:
            args.batch_size = max(n_train // unit, 1) * unit
            notes.append(f"--batch-size {args.batch_size} (default {DEFAULT_BATCH})")
    if 0 < n_train < args.batch_size:
        warnings.append(
            f"--batch-size {args.batch_size} is more than the {n_train} training records: the batch is never "
            f"filled (each epoch is one optimizer step on all {n_train}), so --num-epochs counts steps; give "
            f"--batch-size {max(n_train // unit, 1) * unit} or less")
    if args.warmup_steps is None:
        args.warmup_steps = DEFAULT_WARMUP
        steps = planned_steps(args, n_train)
        if 2 * DEFAULT_WARMUP > steps:
            args.warmup_steps = steps // 10
            notes.append(f"--warmup-steps {args.warmup_steps} (default {DEFAULT_WARMUP}, the run has {steps} steps)")
    return notes, warnings


def planned_steps(args, n_train: int) -> int:
    """Optimizer steps the run will take: --max-steps, else epochs x steps per epoch (the Trainer's
    count: a last partial batch is a step of its own)."""
    if args.max_steps > 0:
        return args.max_steps
    per_epoch = max(math.ceil(n_train / args.batch_size), 1)
    return max(math.ceil(args.num_epochs * per_epoch), 1)


def _training_device(args) -> str:
    """The device to train on (--device checked: one line when CUDA is asked for and absent). --fp16
    needs CUDA (refused on a CPU, where it used to run in fp32 without a word); --bf16 runs on a CPU
    but far slower than fp32 (one step of SmolLM2-135M: 170 s against 6 s), so it warns."""
    device = check_device(args.device)
    if device != "cpu":
        return device
    if args.fp16:
        why = "--device cpu trains on the CPU" if args.device == "cpu" else "none is visible"
        raise UsageError(f"--fp16 needs a CUDA GPU and {why}; drop --fp16 to train in fp32 (fastest on a CPU)")
    if args.bf16 or args.model_dtype in ("bfloat16", "float16"):
        what = "--bf16" if args.bf16 else f"--model-dtype {args.model_dtype}"
        print(f"fastadapters train: warning: {what} on a CPU: half-precision matmuls run far slower than fp32 "
              "here (about 28x per step measured on SmolLM2-135M); drop it to train in fp32", file=sys.stderr,
              flush=True)
    return device


def _world_size() -> int:
    return max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)


def _is_main_process() -> bool:
    """Global rank 0 (torchrun sets RANK), or the only process: it prints the run's summary lines."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _fsdp_kwargs(args, model, device: str) -> dict[str, Any]:
    """TrainingArguments for ``--fsdp``: FSDP2 through accelerate, one unit per decoder layer and the
    root, applied by the Trainer after ``patch`` (the order sharding needs). A UsageError where it
    cannot run: accelerate shards only CUDA models (on a CPU it would silently train with DDP)."""
    if not args.fsdp:
        return {}
    from .distributed import decoder_layers, prepare_for_fully_shard

    if device == "cpu":  # the device this run trains on (--device cpu on a GPU machine too)
        raise UsageError("--fsdp needs CUDA GPUs: accelerate does not shard a model on the CPU (it would "
                         "silently train with DDP); drop --fsdp to train with DDP under torchrun")
    layers = sorted({type(m).__name__ for m in decoder_layers(model)})
    if not layers:
        raise UsageError(f"--fsdp: found no decoder layers to shard in {type(model).__name__}")
    prepare_for_fully_shard(model)  # learned scalings: 0-d parameters cannot be sharded
    return {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": layers,
                                          "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}}


def _accumulation_steps(args) -> int:
    """batch = micro batch x accumulation x processes (torchrun sets WORLD_SIZE), as the original."""
    return max(args.batch_size // (args.micro_batch_size * _world_size()), 1)


def _resume_target(args) -> tuple[str | None, str | None]:
    """(trainer checkpoint to resume, adapter directory to start from); both None when not resuming."""
    r = args.resume_from_checkpoint
    if r is None:
        return None, None
    if r == "last":
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            raise UsageError(f"--resume-from-checkpoint last: no checkpoint-N directory in {args.output_dir}")
        return last, None
    if not os.path.isdir(r):
        raise UsageError(f"--resume-from-checkpoint: no such directory: {r}")
    if os.path.isfile(os.path.join(r, "trainer_state.json")):
        return r, None
    from .io import read_adapter

    try:
        read_adapter(r)
    except ValueError as e:
        raise UsageError(f"--resume-from-checkpoint: neither a Trainer checkpoint nor an adapter: {e}") from None
    return None, r


# schedulers that ignore warmup_steps
_NO_WARMUP_SCHEDULERS = ("constant", "reduce_lr_on_plateau")


def warmup_never_ends(warmup_steps: int, total_steps: int, scheduler: str = "linear") -> bool:
    """True when a linear warm-up of ``warmup_steps`` does not finish within ``total_steps`` steps."""
    return scheduler not in _NO_WARMUP_SCHEDULERS and total_steps > 0 and warmup_steps >= max(total_steps, 1)


def short_warmup_message(warmup_steps: int, total_steps: int, lr: float) -> str:
    # the Trainer's linear warm-up sets step k's rate to lr * k / warmup (k = 0 .. total - 1)
    peak = lr * (total_steps - 1) / warmup_steps
    return (f"fastadapters train: warning: --warmup-steps {warmup_steps} is not shorter than the run's "
            f"{total_steps} optimizer step{'s' if total_steps != 1 else ''}: the learning rate ramps up the whole run and peaks at {peak:.2e}, "
            f"never reaching --learning-rate {lr:g}; give --warmup-steps below {total_steps} (0: none)")


def _checkpointing_kwargs(enabled: bool) -> dict[str, Any]:
    """Non-reentrant activation checkpointing, under the TrainingArguments name of this transformers
    version (``activation_checkpointing`` since 5.2x, ``gradient_checkpointing`` before)."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing_kwargs" in names else "gradient_checkpointing"
    return {key: enabled, key + "_kwargs": {"use_reentrant": False} if enabled else None}


def check_base_model_path(name: str, gguf_file: str | None = None) -> None:
    """A --base-model written as a path must exist (otherwise it would be tried as a hub id); a local
    directory with GGUF files but no config.json needs --gguf-file (transformers' own error there is
    about the tokenizer); a --gguf-file must be in the directory."""
    path = os.path.expanduser(name)
    if name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name:
        if not os.path.isdir(path):
            raise UsageError(f"--base-model: no such directory: {name}")
    if not os.path.isdir(path):
        return  # a hub id
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if gguf_file is not None:
        if not os.path.isfile(os.path.join(path, gguf_file)):
            raise UsageError(f"--gguf-file {gguf_file}: not in {name}; its GGUF files: {ggufs or 'none'}")
    elif ggufs and not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"--base-model {name} has no config.json, only GGUF weights; pass --gguf-file "
                         f"{ggufs[0]}" + (f" (or one of {ggufs[1:]})" if len(ggufs) > 1 else ""))


def unmark_dequantized_gguf(model, gguf_file: str) -> None:
    """A GGUF model that transformers dequantized while loading (its legacy loader; on a CPU, or
    without the ``kernels`` package) holds plain float weights but can stay marked as quantized
    (``hf_quantizer``, ``is_quantized``), so the Trainer refuses to train it ("purely quantized
    models") and save_pretrained refuses to write it. Drop the marker when every parameter and buffer
    is a float tensor; a GGUF model kept in quantized blocks is refused in one line."""
    if getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False):
        return
    packed = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_floating_point()]
    if packed:
        raise UsageError(f"--gguf-file {gguf_file}: transformers kept its weights quantized ({packed[0]} is "
                         "not a float tensor); fastadapters adapts float layers: load it dequantized (without the `kernels` package) "
                         "or convert it to safetensors first")
    from .merging import clear_quantization_marker

    clear_quantization_marker(model)


def load_error_line(e: Exception) -> str:
    """One line from a loading error (transformers' tokenizer errors run over several lines)."""
    text = " ".join(ln.strip() for ln in str(e).strip().splitlines() if ln.strip())
    return (text[:400] + " ...") if len(text) > 400 else (text or type(e).__name__)


def quiet_transformers() -> None:
    """No weight-loading progress bars or info logs: the CLI's own lines and errors stay readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def gguf_progress(show: bool):
    """transformers' GGUF loader draws its own tqdm bar ("Converting and de-quantizing GGUF
    tensors...", ``tqdm.auto`` called directly, so transformers' ``disable_progress_bar`` does not
    reach it): in a log file its redraws pile up. Without a terminal (``show`` False) the loader's
    bar is built disabled for the duration of the block; the module attribute is restored after."""
    try:
        from transformers import modeling_gguf_pytorch_utils as loader
    except ImportError:  # a transformers without the GGUF loader: nothing to quiet
        loader = None
    bar = getattr(loader, "tqdm", None)
    if show or bar is None:
        yield
        return
    loader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        loader.tqdm = bar


def _load_model_and_tokenizer(args, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_base_model_path(args.base_model, args.gguf_file)
    quiet_transformers()
    gguf = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.base_model, **gguf)
        with gguf_progress(show_progress(getattr(args, "no_progress", False))):
            model = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=getattr(torch, dtype_name), **gguf)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load base model {args.base_model!r}: {load_error_line(e)}") from None
    if args.gguf_file:
        unmark_dequantized_gguf(model, args.gguf_file)
    ensure_pad_token(tokenizer)
    return model, tokenizer


def ensure_pad_token(tokenizer) -> None:
    """LLM-Adapters padded with id 0 (LLaMA's unk) so that pad differs from EOS; without a pad
    token we use unk when there is one, else EOS (labels are padded with -100 either way)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token


# ---------------------------------------------------------------------------------------------
# Trainer pieces
# ---------------------------------------------------------------------------------------------

def _trainer_classes():
    """AdapterTrainer and the loss-line callbacks (built lazily: importing transformers is slow)."""
    import torch
    from transformers import Trainer, TrainerCallback
    from transformers.trainer import TRAINING_ARGS_NAME
    from transformers.trainer_callback import ProgressCallback

    from . import io as fa_io

    class AdapterTrainer(Trainer):
        """Trainer whose checkpoints hold only the adapter (fastadapters format)."""

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            # every rank comes here (checkpoints too): save_adapter gathers a sharded adapter and
            # global rank 0 writes it, once
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            fa_io.save_adapter(self.model, output_dir)
            if self.args.should_save:
                torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

        # the loss of the optimizer step in progress (on this rank), summed over its micro-batches as
        # the Trainer scales them; a tensor, read (one sync) only when a progress line is printed
        step_loss = None

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.step_loss = loss if self.step_loss is None else self.step_loss + loss
            return loss

        def take_step_loss(self) -> float | None:
            loss, self.step_loss = self.step_loss, None
            return None if loss is None else float(loss)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
            fa_io.load_adapter(self.model if model is None else model, resume_from_checkpoint)

        def _load_best_model(self) -> None:
            best = self.state.best_model_checkpoint
            if self.is_world_process_zero():  # every rank loads it; one line says so
                print(f"loading the best checkpoint {best} (eval loss {self.state.best_metric:.4f})", flush=True)
            fa_io.load_adapter(self.model, best)

    def loss_line(state, logs: dict) -> str | None:
        step = f"step {state.global_step}/{state.max_steps}"
        if "loss" in logs:
            parts = [step, f"epoch {logs.get('epoch', state.epoch or 0):.2f}", f"loss {logs['loss']:.4f}"]
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.2e}")
            if logs.get("grad_norm") is not None:
                parts.append(f"grad-norm {float(logs['grad_norm']):.3f}")
            return " | ".join(parts)
        if "eval_loss" in logs:
            return f"{step} | eval loss {logs['eval_loss']:.4f}"
        if "train_runtime" in logs:
            return (f"done: {state.global_step} steps in {logs['train_runtime']:.1f} s, "
                    f"mean train loss {logs.get('train_loss', float('nan')):.4f}")
        return None

    class LossLineProgress(ProgressCallback):
        """The stock progress bar (steps, rate, ETA) with the last step's loss beside it, and a
        readable line per log instead of a dict."""

        def __init__(self, trainer=None):
            super().__init__()
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            loss = self.trainer.take_step_loss() if self.trainer is not None else None
            if self.training_bar is not None and loss is not None:
                self.training_bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

        def on_log(self, args, state, control, logs=None, **kwargs):
            line = loss_line(state, logs or {})
            if line and state.is_world_process_zero:
                if self.training_bar is not None:
                    self.training_bar.write(line)
                else:
                    print(line, flush=True)

    class ShortWarmupWarning(TrainerCallback):
        """Warns (rank 0) when the linear warm-up outlasts the run: the learning rate never reaches
        --learning-rate (LLM-Adapters' 100 warm-up steps against a short --max-steps run)."""

        def on_train_begin(self, args, state, control, **kwargs):
            scheduler = getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type))
            w = args.warmup_steps  # a count, or below 1 a fraction of the run (TrainingArguments' rule)
            warmup = int(w) if w >= 1 else math.ceil(state.max_steps * w)
            if state.is_world_process_zero and warmup_never_ends(warmup, state.max_steps, scheduler):
                print(short_warmup_message(warmup, state.max_steps, args.learning_rate),
                      file=sys.stderr, flush=True)

    class LossLinePrinter(TrainerCallback):
        """Without a terminal (a log file, a pipe): plain lines. The loss lines every --logging-steps,
        and progress lines -- ``step k/N | loss x | s/step | ETA`` -- at every step of a run of up to
        PROGRESS_EVERY_STEP_UP_TO steps, otherwise whenever PROGRESS_HEARTBEAT_S passed since the last
        line; within a long step (many micro-batches on a slow machine) a micro-batch line after
        PROGRESS_HEARTBEAT_S of silence. A run is never silent for long, however loaded the machine."""

        def __init__(self, trainer=None):
            self.trainer = trainer
            self.t0 = self.last = time.monotonic()
            self.first_step = 0
            self.micro = 0

        def _say(self, state, line: str) -> None:
            self.last = time.monotonic()
            if state.is_world_process_zero:
                print(line, flush=True)

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = self.last = time.monotonic()
            self.first_step = state.global_step

        def on_substep_end(self, args, state, control, **kwargs):
            self.micro += 1
            if time.monotonic() - self.last >= PROGRESS_HEARTBEAT_S:
                self._say(state, f"step {state.global_step + 1}/{state.max_steps}: micro-batch {self.micro}/"
                                 f"{args.gradient_accumulation_steps} done, {time.monotonic() - self.t0:.0f} s "
                                 "into the run")

        def on_step_end(self, args, state, control, **kwargs):
            self.micro = 0
            loss = self.trainer.take_step_loss() if self.trainer is not None else None
            now = time.monotonic()
            if state.max_steps > PROGRESS_EVERY_STEP_UP_TO and now - self.last < PROGRESS_HEARTBEAT_S:
                return
            done = state.global_step - self.first_step
            per_step = (now - self.t0) / max(done, 1)
            parts = [f"step {state.global_step}/{state.max_steps}"]
            if loss is not None:
                parts.append(f"loss {loss:.4f}")
            parts += [f"{per_step:.2f} s/step", f"ETA {_duration(per_step * (state.max_steps - state.global_step))}"]
            self._say(state, " | ".join(parts))

        def on_log(self, args, state, control, logs=None, **kwargs):
            line = loss_line(state, logs or {})
            if line:
                self._say(state, line)

    return AdapterTrainer, LossLineProgress, LossLinePrinter, ShortWarmupWarning


PROGRESS_EVERY_STEP_UP_TO = 100  # a run of up to this many steps prints a progress line at every step
PROGRESS_HEARTBEAT_S = 30.0  # otherwise (and within a step) a line at least this often


def _duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def main(argv: list[str] | None = None) -> int:
    rc = None
    try:
        rc = run_command("fastadapters train", _run, argv)
        return rc
    finally:
        _close_process_group(in_step=rc == 0)


def _close_process_group(in_step: bool) -> None:
    """Under torchrun, tear the process group down before the interpreter exits: a rank that exits
    with gloo's threads still running can abort ("terminate called without an active exception",
    exit -6) after a run that succeeded. ``in_step``: every rank finished normally, so they first
    meet at a barrier (a rank that failed is ended by torchrun, so no barrier waits on it)."""
    dist = sys.modules.get("torch.distributed")  # never imported (--help, a usage error): nothing to close
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if in_step:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    # 1. inputs, cheapest first; nothing is written until all of them passed
    try:
        records = load_records(args.data)
        if args.limit is not None:
            records = records[: args.limit]
        notes, warnings = scale_defaults(args, len(records))
        if len(records) <= args.val_set_size:
            kept = f" (--limit {args.limit} kept {len(records)})" if args.limit is not None else ""
            raise UsageError(f"--val-set-size {args.val_set_size} leaves no training records: {args.data} has "
                             f"{len(records)}{kept}; give a smaller --val-set-size (0: no validation set)")
        train_records, val_records = split_train_val(records, args.val_set_size, seed=args.seed)
    except DataError as e:
        raise UsageError(str(e)) from None
    config = adapter_config(args)
    resume_checkpoint, resume_adapter = _resume_target(args)
    if (os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and resume_checkpoint is None
            and not args.overwrite_output_dir):
        raise UsageError(f"--output-dir {args.output_dir} is not empty; pass --overwrite-output-dir or "
                         "--resume-from-checkpoint")
    device = _training_device(args)
    if _is_main_process():  # before the model loads: a wrong batch is seen before minutes of loading
        if notes:
            print(f"fastadapters train: {len(records)} records is a small data set; defaults scaled to it: "
                  f"{', '.join(notes)}. Set a flag to override.", flush=True)
        for w in warnings:
            print(f"fastadapters train: warning: {w}", file=sys.stderr, flush=True)
    dtype_name = args.model_dtype or ("bfloat16" if args.bf16 else "float32")
    model, tokenizer = _load_model_and_tokenizer(args, dtype_name)

    from transformers import DataCollatorForSeq2Seq, TrainingArguments, set_seed

    import fastadapters as fa
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # the adapter's initial weights follow --seed, whatever ran before (torchrun, distributed loading,
    # an earlier run in this process): every rank, and a single process, start from the same adapter
    set_seed(args.seed)
    try:
        fa.patch(model, config=config)
    except ValueError as e:
        raise UsageError(f"adapter does not fit {args.base_model}: {e}") from None
    # a checkpoint to resume must fit the adapter built from the flags: check (and load) it here,
    # where a mismatch is one line, rather than inside Trainer.train
    for path in (resume_adapter, resume_checkpoint):
        if path is not None:
            try:
                fa.load_adapter(model, path)
            except ValueError as e:
                raise UsageError(f"--resume-from-checkpoint {path} does not fit {args.base_model} with these "
                                 f"adapter flags: {e}") from None
    if args.fp16:  # fp16 autocast needs fp32 master weights for what trains (as PEFT does)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    # 2. tokenize
    tokenizer.padding_side = "right"
    tok_kwargs = dict(cutoff_len=args.cutoff_len, train_on_inputs=args.train_on_inputs, style=args.prompt_style)
    train_data = tokenize_records(tokenizer, train_records, **tok_kwargs)
    val_data = tokenize_records(tokenizer, val_records, **tok_kwargs) if val_records else None

    if _is_main_process():
        shown, where = config.to_dict(), ""
        if shown.get("adapter_type") != "prefix":  # the targets the architecture's default or all-linear resolved to
            from .patching import _require_state

            state = _require_state(model)
            paths = state.kinds.get(state.active, {})
            shown["target_modules"] = sorted({path.rsplit(".", 1)[-1] for path in paths})
            where = f" on {len(paths)} modules"
        print(f"fastadapters train: {args.adapter} adapter on {args.base_model}: "
              f"{json.dumps(shown, sort_keys=True)}{where}")
        print(f"{len(train_data)} training / {len(val_data or [])} validation examples; "
              f"{fa.trainable_parameters(model)}", flush=True)

    if args.gradient_checkpointing:
        # a frozen base gives the checkpointed blocks inputs without grad; make the embeddings'
        # output require grad so the adapters inside still receive gradients
        model.enable_input_require_grads()
    model.config.use_cache = False

    has_val = val_data is not None
    progress = show_progress(args.no_progress)
    targs_kwargs = dict(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.micro_batch_size,
        per_device_eval_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=_accumulation_steps(args),
        num_train_epochs=args.num_epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_scheduler,
        # --bf16 loads the base in bf16 and trains the (fp32) adapters without autocast: the adapter
        # ops take the mixed dtypes themselves. Autocast only when the base was kept in another dtype.
        bf16=args.bf16 and dtype_name != "bfloat16",
        fp16=args.fp16,
        **_checkpointing_kwargs(args.gradient_checkpointing),
        # patch freezes everything but the active adapter, and every trainable parameter takes part in
        # each forward: DDP need not search for unused ones (the Trainer's default without
        # checkpointing is True, which costs a graph traversal per step and warns on every rank)
        ddp_find_unused_parameters=False,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=args.eval_steps if has_val else None,
        eval_on_start=has_val and args.eval_at_start,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss" if has_val else None,
        greater_is_better=False if has_val else None,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=args.report_to,
        seed=args.seed,
        data_seed=args.seed,  # the sampler's order from --seed alone, not from torch's global RNG state
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=device != "cpu",
        use_cpu=device == "cpu",  # lets --bf16 run on a CPU (autocast) instead of refusing
        **_fsdp_kwargs(args, model, device),
    )
    try:
        targs = TrainingArguments(**targs_kwargs)
    except ValueError as e:
        raise UsageError(f"invalid training arguments: {e}") from None
    AdapterTrainer, LossLineProgress, LossLinePrinter, ShortWarmupWarning = _trainer_classes()
    trainer = AdapterTrainer(
        model=model,
        args=targs,
        train_dataset=train_data,
        eval_dataset=val_data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LossLineProgress(trainer) if progress else LossLinePrinter(trainer))
    trainer.add_callback(ShortWarmupWarning())

    t0 = time.time()
    try:
        trainer.train(resume_from_checkpoint=resume_checkpoint)
    except KeyboardInterrupt:
        # Ctrl-C: one line (not the Trainer's traceback) and where to pick up
        if _is_main_process():
            last = _last_checkpoint(args.output_dir)
            where = (f"the last checkpoint is {last} (resume with --resume-from-checkpoint last)" if last else
                     f"no checkpoint was written yet (one every --save-steps {args.save_steps} steps)")
            print(f"\nfastadapters train: interrupted at step {trainer.state.global_step}/{trainer.state.max_steps} "
                  f"after {time.time() - t0:.0f} s; {where}", file=sys.stderr, flush=True)
        return 130
    model.eval()
    fa.save_adapter(model, args.output_dir, format=args.save_format)
    best = ""
    if trainer.state.best_metric is not None and math.isfinite(trainer.state.best_metric):
        best = f"; best eval loss {trainer.state.best_metric:.4f} ({trainer.state.best_model_checkpoint})"
    if _is_main_process():
        print(f"saved the {args.adapter} adapter ({args.save_format} format) to {args.output_dir} "
              f"after {trainer.state.global_step} steps, {time.time() - t0:.1f} s{best}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
