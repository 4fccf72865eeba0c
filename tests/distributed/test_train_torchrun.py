"""``fastadapters train`` under ``torchrun --nproc_per_node 2`` (DDP through the Trainer, gloo on the CPU).

The global batch (``--batch-size``) is kept across world sizes: with 2 processes each one accumulates
half as many micro batches. The data set is exactly one global batch, so every optimizer step sees
the same examples whatever the sampler's order, and the adapter 2 processes save equals the one a
single process saves.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dist_launch import torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pipeline_utils import make_base_model_dir, make_records, write_json  # noqa: E402

GLOBAL_BATCH = 8


def _train_args(base, data, out, adapter: str) -> list[str]:
    extra = {"lora": ["--lora-r", "4", "--dropout", "0"], "parallel": ["--bottleneck-size", "8"]}[adapter]
    return ["--base-model", str(base), "--data", str(data), "--output-dir", str(out), "--adapter", adapter,
            *extra, "--batch-size", str(GLOBAL_BATCH), "--micro-batch-size", "2", "--max-steps", "3",
            "--val-set-size", "0", "--learning-rate", "1e-2", "--warmup-steps", "0", "--save-steps", "2",
            "--cutoff-len", "64", "--prompt-style", "alpaca", "--no-progress", "--seed", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun-train")
    base = make_base_model_dir(root, pretrain_steps=0, hidden_size=32)
    data = write_json(root / "data.json", make_records("last", GLOBAL_BATCH, seed=3))
    return root, base, data


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_torchrun_two_processes_save_what_one_process_saves(setup):
    root, base, data = setup
    adapter = "lora"  # the bottleneck adapters under DDP: test_ddp_fsdp.py
    one, two = root / f"one-{adapter}", root / f"two-{adapter}"
    single = subprocess.run([sys.executable, "-m", "fastadapters.cli", "train", *_train_args(base, data, one, adapter)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-4000:]
    # the 2-process run also checkpoints activations (non-reentrant under DDP), which changes no number
    proc = torchrun(["-m", "fastadapters.cli", "train", *_train_args(base, data, two, adapter),
                     "--gradient-checkpointing"], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert proc.stdout.count("saved the") == 1, proc.stdout[-3000:]  # rank 0 reports (and writes) once
    assert "after 3 steps" in proc.stdout
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    moved = max(float(t.abs().max()) for t in a.values())
    assert moved > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    # the intermediate checkpoint (step 2) holds the adapter (no base weights), equal to one process's
    files = set(os.listdir(two / "checkpoint-2"))
    assert {"adapter_config.json", "adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= files
    assert not any(f.startswith(("model", "pytorch_model")) for f in files), files
    a, b = _weights(one / "checkpoint-2"), _weights(two / "checkpoint-2")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"checkpoint-2 {k}: {m}")


def test_global_batch_must_divide_by_world_size(setup, tmp_path, monkeypatch, capsys):
    """What torchrun's WORLD_SIZE does to the batch arithmetic (in process: no launch needed)."""
    from fastadapters import train

    root, base, data = setup
    args = _train_args(base, data, tmp_path / "out", "lora")
    args[args.index("--batch-size") + 1] = "6"  # 6 = 2 x 3, not a multiple of 2 micro x 2 processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.main(args) == 2
    assert "--batch-size 6 is not a multiple of --micro-batch-size 2 x 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("WORLD_SIZE", "4")  # 8 = 2 micro x 4 processes: one micro batch each, no accumulation
    parsed = train.build_parser().parse_args(_train_args(base, data, tmp_path / "out", "lora"))
    assert train._accumulation_steps(parsed) == 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train._accumulation_steps(parsed) == 4


def test_fsdp_flag_without_cuda_is_refused(setup, tmp_path, capsys):
    """accelerate does not shard on a CPU (it would silently run DDP): --fsdp says so instead."""
    from fastadapters import train

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --fsdp can run")
    root, base, data = setup
    assert train.main(_train_args(base, data, tmp_path / "out", "lora") + ["--fsdp"]) == 2
    err = capsys.readouterr().err
    assert "--fsdp needs CUDA GPUs" in err and "drop --fsdp to train with DDP" in err
    assert not (tmp_path / "out").exists()


def test_torchrun_with_validation_set_logs_once_and_finds_no_unused_parameters(setup, tmp_path):
    """With a validation set and no checkpointing (the Trainer's DDP default there is
    find_unused_parameters=True, which warns on every rank and walks the graph each step): rank 0
    alone reports the best checkpoint, and DDP is not asked to look for unused parameters."""
    root, base, _ = setup
    data = write_json(tmp_path / "data.json", make_records("last", GLOBAL_BATCH + 2, seed=4))
    args = _train_args(base, data, tmp_path / "out", "parallel")
    args[args.index("--val-set-size") + 1] = "2"
    proc = torchrun(["-m", "fastadapters.cli", "train", *args, "--eval-steps", "2"], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert proc.stdout.count("step 0/3 | eval loss") == 1, proc.stdout[-3000:]
    assert proc.stdout.count("loading the best checkpoint") == 1, proc.stdout[-3000:]
    assert proc.stdout.count("saved the parallel adapter") == 1, proc.stdout[-3000:]
    assert "find_unused_parameters=True" not in proc.stdout, proc.stdout[-3000:]
