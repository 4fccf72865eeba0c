"""The research pipeline end to end on CPU: prompts, data, `fastadapters train` for every adapter
type on a tiny llama pretrained in the test, `fastadapters eval`, resume, and the CLI's errors.

The base model learns "which number comes last: a b c" (answer c) in a few hundred AdamW steps; the
adapters are then trained on the shifted task "which number follows the last" (answer c+1 mod 10),
which the base gets wrong, so each adapter type must lower the held-out loss by a set margin and the
adapted model must answer above chance (1/10) through `fastadapters eval`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fastadapters as fa
from fastadapters import cli
from fastadapters.data import DataError, load_records, split_train_val, tokenize_record
from fastadapters.evaluate import main as eval_main
from fastadapters.prompts import evaluation_prompt, split_response, training_prompt
from fastadapters.train import main as train_main
from pipeline_utils import STYLE, make_base_model_dir, make_records, mean_loss, one_line_error, write_json

LOSS_MARGIN = 0.5  # every adapter type must lower the held-out loss on the shifted task by this much

# per adapter type: CLI flags and learning rate for 40 steps of 16 examples
ADAPTER_RUNS = {
    "lora": (["--r", "8", "--alpha", "16"], "1e-2"),
    "series": (["--bottleneck-size", "16"], "2e-2"),
    "pfeiffer": (["--bottleneck-size", "16"], "3e-2"),
    "parallel": (["--bottleneck-size", "16", "--scaling", "learned"], "1e-2"),
    "prefix": (["--num-virtual-tokens", "8", "--prefix-projection", "--encoder-hidden-size", "32"], "1e-2"),
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; tiny matmuls gain nothing from threads
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pipeline")
    base = make_base_model_dir(root, pretrain_steps=150)
    write_json(root / "next.json", make_records("next", 400, seed=5))
    write_json(root / "next_test.json", make_records("next", 40, seed=99))
    write_json(root / "last_test.json", make_records("last", 40, seed=98))
    return root, base


@pytest.fixture(scope="session")
def base_loaded(workdir):
    from transformers import AutoTokenizer

    _, base = workdir
    return AutoTokenizer.from_pretrained(base)


def _load(base, adapter=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        fa.load_adapter(model, adapter)
    return model.eval()


def _train_argv(base, data, out, adapter, *, steps=40, extra=(), lr="1e-2"):
    return ["--base-model", str(base), "--data", str(data), "--output-dir", str(out), "--adapter", adapter,
            *extra, "--batch-size", "16", "--micro-batch-size", "16", "--max-steps", str(steps),
            "--learning-rate", lr, "--warmup-steps", "0", "--val-set-size", "0", "--save-steps", "1000",
            "--logging-steps", "10", "--no-train-on-inputs", "--no-progress", "--prompt-style", STYLE]


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------

def test_llm_adapters_prompt_bytes():
    ind = " " * 16
    assert training_prompt("Q?", "", "A.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request.  \n\n{ind}### Instruction:\n{ind}Q?\n{ind}\n{ind}### Response:\n{ind}A.")
    assert training_prompt("Q?", "ctx", "A.") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. \n\n"
        f"{ind}### Instruction:\n{ind}Q?\n{ind}\n{ind}### Input:\n{ind}ctx\n{ind}\n{ind}### Response:\n{ind}A.")
    assert evaluation_prompt("Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request. \n\n{ind}### Instruction:\n{ind}Q?\n\n{ind}### Response:\n{ind}")
    assert evaluation_prompt("Q?", "ctx") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        f"{ind}### Instruction:\n{ind}Q?\n\n{ind}### Input:\n{ind}ctx\n\n{ind}### Response:\n{ind}")


def test_alpaca_prompt_is_training_prefix():
    for inp in ("", "some context"):
        p = evaluation_prompt("Do it.", inp, style="alpaca")
        assert training_prompt("Do it.", inp, "Done.", style="alpaca") == p + "Done."
        assert p.endswith("### Response:\n") and ("### Input:\nsome context\n\n" in p) == bool(inp)
    with pytest.raises(ValueError, match="valid: llm-adapters, alpaca"):
        training_prompt("x", style="vicuna")
    assert split_response("prompt ### Response:\n  The answer is 3.  ") == "The answer is 3."


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"instruction": "x"}', "expected a JSON list of records, got dict"),
    ("[]", "no records"),
    ('[{"instruction": "a", "output": "b"}, 5]', "record 1: expected an object"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "record 1: missing field 'output'"),
    ('[{"instruction": "a", "output": 3}]', "record 0: field 'output' must be a string, got int"),
    ('[{"instruction": "a", "input": ["x"], "output": "b"}]', "record 0: field 'input' must be a string, got list"),
])
def test_load_records_errors(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_load_records_and_split(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_records(tmp_path / "missing.json")
    path = write_json(tmp_path / "d.json", [{"instruction": f"q{i}", "input": None, "output": "o"} for i in range(10)])
    recs = load_records(path)
    assert recs[0]["input"] == "" and len(recs) == 10
    with pytest.raises(DataError, match="missing field 'answer'"):
        load_records(path, require_answer=True)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in recs[:3]) + "\n")
    assert load_records(jsonl) == recs[:3]
    train, val = split_train_val(recs, 3, seed=42)
    assert len(train) == 7 and len(val) == 3
    assert (train, val) == split_train_val(recs, 3, seed=42)
    assert sorted(r["instruction"] for r in train + val) == sorted(r["instruction"] for r in recs)
    with pytest.raises(DataError, match="leaves no training records"):
        split_train_val(recs, 10)


def test_bundled_training_file_validates():
    # the training file does not ship with the package (only the test sets do): a local copy of
    # LLM-Adapters' data, where there is one
    import os

    path = Path(os.environ.get("FASTADAPTERS_DATA_DIR") or "/work/shared/data/llm-adapters") / "train" / "math_data.json"
    if not path.exists():
        pytest.skip(f"bundled LLM-Adapters data not found at {path}")
    recs = load_records(path, require_answer=True)
    assert len(recs) == 3260 and all(r["input"] == "" for r in recs)


def test_tokenize_record(base_loaded):
    tok = base_loaded
    rec = {"instruction": "Which number comes last: 1 2 3?", "input": "", "output": "The answer is 3."}
    full = tokenize_record(tok, rec, cutoff_len=256, style=STYLE)
    ids = full["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id  # EOS appended when there is room
    assert full["labels"] == ids and full["attention_mask"] == [1] * len(ids)
    assert tok.decode(ids, skip_special_tokens=True) == training_prompt(rec["instruction"], "", rec["output"], style=STYLE)

    masked = tokenize_record(tok, rec, cutoff_len=256, train_on_inputs=False, style=STYLE)
    n_prompt = len(tok(training_prompt(rec["instruction"], "", "", style=STYLE))["input_ids"])
    assert masked["input_ids"] == ids
    assert masked["labels"][:n_prompt] == [-100] * n_prompt and masked["labels"][n_prompt:] == ids[n_prompt:]
    assert tok.decode(masked["labels"][n_prompt:], skip_special_tokens=True) == "The answer is 3."

    cut = tokenize_record(tok, rec, cutoff_len=8, style=STYLE)  # truncated: no room, no EOS
    assert cut["input_ids"] == ids[:8] and tok.eos_token_id not in cut["input_ids"]
    exact = tokenize_record(tok, rec, cutoff_len=len(ids) - 1, style=STYLE)  # fits without EOS: none added
    assert exact["input_ids"] == ids[:-1]


# ---------------------------------------------------------------------------------------------
# train + eval, every adapter type
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def held_out_loss(workdir, base_loaded):
    _, base = workdir
    held = make_records("next", 64, seed=77)
    return held, mean_loss(_load(base), base_loaded, held)


@pytest.mark.parametrize("adapter", list(ADAPTER_RUNS))
def test_train_lowers_loss(workdir, base_loaded, held_out_loss, adapter, capsys):
    root, base = workdir
    held, before = held_out_loss
    assert before > 2 * LOSS_MARGIN  # the base does not know the shifted task
    flags, lr = ADAPTER_RUNS[adapter]
    out = root / f"out_{adapter}"
    assert train_main(_train_argv(base, root / "next.json", out, adapter, extra=flags, lr=lr)) == 0
    log = capsys.readouterr().out
    assert "step 40/40 | epoch" in log and "| loss " in log and "saved the" in log
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    # only the adapter is saved: no full model weights anywhere
    assert not list(out.rglob("model.safetensors")) and not list(out.rglob("pytorch_model.bin"))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["adapter_type"] == ("series" if adapter == "pfeiffer" else adapter)
    if adapter in ("series", "pfeiffer"):
        assert saved["variant"] == ("pfeiffer" if adapter == "pfeiffer" else "houlsby")
    after = mean_loss(_load(base, out), base_loaded, held)
    assert after < before - LOSS_MARGIN, (adapter, before, after)


def test_eval_adapter_above_chance(workdir, capsys):
    root, base = workdir
    adapter = root / "out_lora"
    if not adapter.exists():
        assert train_main(_train_argv(base, root / "next.json", adapter, "lora", extra=ADAPTER_RUNS["lora"][0])) == 0
    out = root / "eval_lora.jsonl"
    rc = eval_main(["--base-model", str(base), "--adapter", str(adapter), "--data", str(root / "next_test.json"),
                    "--output", str(out), "--max-new-tokens", "8", "--batch-size", "16", "--prompt-style", STYLE])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 40
    assert set(lines[0]) == {"dataset", "index", "prompt", "response", "extracted", "label", "correct",
                             "math_extraction", "other_extraction"}  # numeric labels: both readings
    assert [x["index"] for x in lines] == list(range(40))
    acc = sum(x["correct"] for x in lines) / len(lines)
    assert acc > 0.3, acc  # chance is 0.1
    table = capsys.readouterr().out
    assert "accuracy" in table and f"{sum(x['correct'] for x in lines):>7d}" in table


def test_eval_base_model_and_limit(workdir, capsys):
    """No --adapter scores the base model; --limit; a --data-dir with a named set (math rules)."""
    root, base = workdir
    data_dir = root / "sets"
    (data_dir / "gsm8k").mkdir(parents=True, exist_ok=True)
    (data_dir / "gsm8k" / "test.json").write_text((root / "last_test.json").read_text())
    out = root / "eval_base.jsonl"
    rc = eval_main(["--base-model", str(base), "--dataset", "GSM8K", "--data-dir", str(data_dir), "--limit", "24",
                    "--output", str(out), "--max-new-tokens", "8", "--batch-size", "8", "--no-progress",
                    "--prompt-style", STYLE])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 24 and {x["dataset"] for x in lines} == {"gsm8k"}
    assert sum(x["correct"] for x in lines) / 24 > 0.5  # the base knows its own task
    assert "gsm8k" in capsys.readouterr().out

    # several sets in one run: one JSONL, a row each and a total; commonsense rules on boolq
    (data_dir / "boolq").mkdir(exist_ok=True)
    write_json(data_dir / "boolq" / "test.json",
               [{"instruction": r["instruction"], "input": "", "output": "", "answer": "true"}
                for r in make_records("last", 4, seed=4)])
    rc = eval_main(["--base-model", str(base), "--dataset", "gsm8k", "boolq", "--data-dir", str(data_dir),
                    "--limit", "4", "--output", str(out), "--max-new-tokens", "4", "--no-progress",
                    "--prompt-style", STYLE])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["dataset"] for x in lines] == ["gsm8k"] * 4 + ["boolq"] * 4
    assert all(x["extracted"] == "" and not x["correct"] for x in lines[4:])  # no true/false in "The answer is N."
    table = capsys.readouterr().out.splitlines()
    assert table[-5].startswith("gsm8k") and table[-4].startswith("boolq") and table[-3].startswith("(all)")
    # then the math set read the other way too (boolq is no math set: no line)
    assert table[-2].startswith("math answers read both ways") and table[-1].startswith("  gsm8k: ")


@pytest.mark.parametrize("adapter", [None, "prefix", "series"])
def test_batched_generation_matches_single(workdir, adapter):
    """Left padding + attention mask: a batch gives the responses each prompt gets alone (also with
    prefix-tuning, whose prefixes enter through the KV cache, and a series adapter)."""
    from transformers import AutoTokenizer

    from fastadapters.evaluate import generate_batch
    from fastadapters.train import ensure_pad_token

    root, base = workdir
    tok = AutoTokenizer.from_pretrained(base)
    ensure_pad_token(tok)
    tok.padding_side = "left"
    model = _load(base)
    if adapter is not None:
        torch.manual_seed(0)
        fa.patch(model, adapter=adapter, **({"num_virtual_tokens": 4} if adapter == "prefix" else {"bottleneck_size": 8}))
        model.eval()
    recs = make_records("last", 6, seed=3)
    recs[0]["instruction"] = "Which number comes last: 1 2 3 4 5 6 7 8 9 1 2 3 4 5 6 7?"  # forces padding
    prompts = [evaluation_prompt(r["instruction"], style=STYLE) for r in recs]
    batched = generate_batch(model, tok, prompts, max_new_tokens=6)
    single = [generate_batch(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert generate_batch(model, tok, prompts[1:3], max_new_tokens=6, num_beams=2)  # beams run


def test_best_checkpoint_resume_and_peft_format(workdir, capsys):
    """Eval/save every N steps with the best checkpoint reloaded at the end; resuming from a
    checkpoint reproduces the uninterrupted run; --save-format peft writes a PEFT LoRA."""
    from safetensors.torch import load_file

    root, base = workdir
    common = ["--val-set-size", "32", "--eval-steps", "5", "--save-steps", "5", "--save-total-limit", "5"]
    full = root / "ckpt_full"
    argv = _train_argv(base, root / "next.json", full, "lora", steps=10, extra=ADAPTER_RUNS["lora"][0]) + common
    assert train_main(argv + ["--save-format", "peft"]) == 0
    log = capsys.readouterr().out
    assert "eval loss" in log and "loading the best checkpoint" in log
    state = json.loads((full / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"].endswith(("checkpoint-5", "checkpoint-10"))
    ckpt_files = {p.name for p in (full / "checkpoint-5").iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= ckpt_files
    assert "model.safetensors" not in ckpt_files
    # the final adapter is the best checkpoint's, in PEFT format
    peft_cfg = json.loads((full / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA"
    best = load_file(Path(state["best_model_checkpoint"]) / "adapter_model.safetensors")
    final = load_file(full / "adapter_model.safetensors")
    assert set(final) == {"base_model.model." + k for k in best}
    for k in best:
        torch.testing.assert_close(final["base_model.model." + k], best[k], rtol=0, atol=0)
    # eval reads the PEFT-format adapter
    assert eval_main(["--base-model", str(base), "--adapter", str(full), "--data", str(root / "next_test.json"),
                      "--limit", "4", "--max-new-tokens", "4", "--no-progress", "--prompt-style", STYLE]) == 0
    assert "next_test" in capsys.readouterr().out

    # resume from checkpoint-5 in a copy of the run directory: same weights at step 10
    import shutil

    resumed = root / "ckpt_resumed"
    shutil.copytree(full / "checkpoint-5", resumed / "checkpoint-5")
    argv_r = _train_argv(base, root / "next.json", resumed, "lora", steps=10, extra=ADAPTER_RUNS["lora"][0]) + common
    assert train_main(argv_r + ["--resume-from-checkpoint", "last"]) == 0
    a = load_file(full / "checkpoint-10" / "adapter_model.safetensors")
    b = load_file(resumed / "checkpoint-10" / "adapter_model.safetensors")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_reaches_adapters(workdir):
    """A frozen base with gradient checkpointing still trains the adapters (LoRA B starts at zero)."""
    from safetensors.torch import load_file

    root, base = workdir
    out = root / "out_gc"
    argv = _train_argv(base, root / "next.json", out, "lora", steps=3, extra=["--target-modules", "q_proj,v_proj"])
    assert train_main(argv + ["--gradient-checkpointing"]) == 0
    weights = load_file(out / "adapter_model.safetensors")
    b_keys = [k for k in weights if k.endswith("lora_B.weight")]
    assert b_keys and all(("q_proj" in k or "v_proj" in k) for k in b_keys)
    assert all(weights[k].abs().sum() > 0 for k in b_keys)


def test_gradient_checkpointing_trains_prefix_as_without(workdir):
    """--adapter prefix --gradient-checkpointing trains, and to the same prefix as without checkpointing
    (the prefixes reach the checkpointed layers through a read-only cache; patching._prefix_forward)."""
    from safetensors.torch import load_file

    root, base = workdir
    flags, lr = ADAPTER_RUNS["prefix"]
    runs = {}
    for gc in (False, True):
        out = root / f"out_prefix_gc{int(gc)}"
        argv = _train_argv(base, root / "next.json", out, "prefix", steps=3, extra=flags, lr=lr)
        assert train_main(argv + (["--gradient-checkpointing"] if gc else [])) == 0
        runs[gc] = load_file(out / "adapter_model.safetensors")
    assert set(runs[True]) == set(runs[False]) and runs[True]
    for k in runs[False]:
        torch.testing.assert_close(runs[True][k], runs[False][k], rtol=1e-4, atol=1e-6)


def test_same_flags_train_the_same_adapter_twice_in_one_process(workdir):
    """--seed fixes both the adapter's initial weights and the data order: a second identical run in
    the same process (torch's global RNG already moved on) trains the same adapter."""
    from safetensors.torch import load_file

    root, base = workdir
    flags, lr = ADAPTER_RUNS["lora"]
    runs = []
    for i in range(2):
        out = root / f"out_repeat{i}"
        torch.manual_seed(1000 + i)  # whatever the caller's RNG state, --seed decides
        assert train_main(_train_argv(base, root / "next.json", out, "lora", steps=2, extra=flags, lr=lr)) == 0
        runs.append(load_file(out / "adapter_model.safetensors"))
    assert set(runs[0]) == set(runs[1]) and runs[0]
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_bf16_trains_fp32_adapters_on_bf16_base(workdir):
    from safetensors.torch import load_file

    root, base = workdir
    out = root / "out_bf16"
    assert train_main(_train_argv(base, root / "next.json", out, "lora", steps=3) + ["--bf16"]) == 0
    weights = load_file(out / "adapter_model.safetensors")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().sum() > 0 for k, w in weights.items() if k.endswith("lora_B.weight"))


def test_cli_routes_train_and_eval(workdir, capsys):
    root, base = workdir
    assert cli.main(["train", "--help"]) == 0
    assert "--bottleneck-size" in capsys.readouterr().out
    assert cli.main(["eval", "--help"]) == 0
    assert "--aqua-extraction" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# errors: one line on stderr, exit code 2, nothing written
# ---------------------------------------------------------------------------------------------

def test_train_errors(workdir, tmp_path, capsys):
    root, base = workdir
    out = tmp_path / "never"
    argv = lambda data, *extra: _train_argv(base, data, out, "lora", extra=list(extra))  # noqa: E731

    assert train_main(argv(tmp_path / "missing.json")) == 2
    one_line_error(capsys, "data file not found", "missing.json")

    bad = write_json(tmp_path / "bad.json", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}])
    assert train_main(argv(bad)) == 2
    one_line_error(capsys, "record 1", "'output'")

    good = root / "next.json"
    assert train_main(argv(good, "--bottleneck-size", "8")) == 2
    one_line_error(capsys, "--bottleneck-size does not apply to --adapter lora")
    assert train_main(argv(good, "--r", "0")) == 2
    one_line_error(capsys, "LoRAConfig.r")
    assert train_main(argv(good, "--no-such-flag")) == 2
    one_line_error(capsys, "--no-such-flag")
    assert train_main(argv(good) + ["--batch-size", "10", "--micro-batch-size", "4"]) == 2
    one_line_error(capsys, "not a multiple")
    assert train_main(argv(good) + ["--val-set-size", "10", "--eval-steps", "3", "--save-steps", "4"]) == 2
    one_line_error(capsys, "--save-steps 4 must be a multiple of --eval-steps 3")
    assert train_main(argv(good) + ["--save-format", "peft", "--adapter", "series"]) == 2
    one_line_error(capsys, "peft")
    assert train_main(argv(good, "--target-modules", "no_such_proj")) == 2
    one_line_error(capsys, "no_such_proj")
    assert train_main(argv(good) + ["--base-model", str(tmp_path / "no_model")]) == 2
    one_line_error(capsys, "--base-model: no such directory")

    # adapter/model mismatch: starting from an adapter saved on a model of another width
    from pipeline_utils import build_model

    other = build_model(vocab_size=400, hidden_size=32)
    fa.patch(other, adapter="lora", r=8, alpha=16)
    mismatched = fa.save_adapter(other, tmp_path / "other_lora")
    assert train_main(argv(good) + ["--resume-from-checkpoint", mismatched]) == 2
    one_line_error(capsys, "does not fit")
    assert train_main(argv(good) + ["--resume-from-checkpoint", str(tmp_path / "no_ckpt")]) == 2
    one_line_error(capsys, "--resume-from-checkpoint")
    assert not out.exists()


def test_eval_errors(workdir, tmp_path, capsys):
    root, base = workdir
    out = tmp_path / "eval.jsonl"
    common = ["--base-model", str(base), "--output", str(out), "--max-new-tokens", "4"]

    assert eval_main(common + ["--dataset", "gsm9k", "--data-dir", str(tmp_path)]) == 2
    err = one_line_error(capsys, "unknown dataset 'gsm9k'")
    assert "AddSub" in err and "hellaswag" in err

    assert eval_main(common + ["--dataset", "boolq", "--data-dir", str(tmp_path)]) == 2
    one_line_error(capsys, "data file not found", "boolq")

    bad = write_json(tmp_path / "bad.json", [{"instruction": "q", "answer": "true"}, {"instruction": "q"}])
    assert eval_main(common + ["--data", str(bad)]) == 2
    one_line_error(capsys, "record 1", "missing field 'answer'")

    bad_label = write_json(tmp_path / "bl.json", [{"instruction": "q", "answer": "3"}, {"instruction": "q", "answer": "x"}])
    assert eval_main(common + ["--data", str(bad_label), "--dataset", "gsm8k"]) == 2
    one_line_error(capsys, "record 1", "'answer'", "gsm8k")

    assert eval_main(common + ["--data", str(root / "next_test.json"), "--adapter", str(tmp_path / "nope")]) == 2
    one_line_error(capsys, "--adapter")

    # an adapter saved from a model of another width does not fit this base
    from pipeline_utils import build_model

    other = build_model(vocab_size=400, hidden_size=32)
    fa.patch(other, adapter="lora", r=4)
    mismatched = fa.save_adapter(other, tmp_path / "other_lora")
    assert eval_main(common + ["--data", str(root / "next_test.json"), "--adapter", mismatched]) == 2
    one_line_error(capsys, "does not fit")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# a short run on small data (issue 20): progress at every step, defaults scaled, warnings early,
# Ctrl-C in one line
# ---------------------------------------------------------------------------------------------

def _small_run_argv(base, data, out, *extra):
    return ["--base-model", str(base), "--data", str(data), "--output-dir", str(out), "--adapter", "lora",
            "--no-progress", "--prompt-style", STYLE, "--learning-rate", "1e-3", *extra]


def test_short_run_prints_progress_from_the_first_step_and_scales_defaults(workdir, tmp_path, capsys):
    root, base = workdir
    data = write_json(tmp_path / "small.json", make_records("next", 25, seed=3))
    assert train_main(_small_run_argv(base, data, tmp_path / "out", "--max-steps", "3")) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    # the unset data-size flags scaled to 25 records, said once, before training
    scaled = [ln for ln in lines if "defaults scaled to it" in ln]
    assert len(scaled) == 1 and "25 records" in scaled[0]
    assert "--val-set-size 2 (default 2000)" in scaled[0] and "--batch-size 20 (default 128)" in scaled[0]
    assert "--warmup-steps 0 (default 100" in scaled[0]
    assert "23 training / 2 validation examples" in captured.out
    # a progress line at every step, the first one at step 1 (logging every 10 steps prints no loss line)
    progress = [ln for ln in lines if ln.startswith("step ") and "s/step" in ln]
    assert [ln.split(" |")[0] for ln in progress] == ["step 1/3", "step 2/3", "step 3/3"], lines
    assert all("| loss " in ln and "| ETA " in ln for ln in progress)
    assert lines.index(progress[0]) < lines.index(next(ln for ln in lines if ln.startswith("saved the")))
    assert "warm-up" not in captured.err and "--warmup-steps" not in captured.err


def test_batch_larger_than_the_training_set_warns_before_the_model_loads(tmp_path, capsys):
    data = write_json(tmp_path / "small.json", make_records("next", 25, seed=3))
    empty = tmp_path / "not_a_model"
    empty.mkdir()  # loading fails: the warning must already be out
    rc = train_main(_small_run_argv(empty, data, tmp_path / "out", "--batch-size", "128"))
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("fastadapters train: warning: --batch-size 128 is more than the 23 training records")
    assert "give --batch-size 20 or less" in err[0]
    assert "cannot load base model" in err[1]


def test_ctrl_c_during_training_is_one_line_with_the_last_checkpoint(workdir, tmp_path, capsys, monkeypatch):
    import transformers

    root, base = workdir
    calls = []
    real = transformers.Trainer.training_step

    def interrupted_on_the_third(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(transformers.Trainer, "training_step", interrupted_on_the_third)
    out = tmp_path / "out"
    argv = _train_argv(base, root / "next.json", out, "lora", steps=10) + ["--save-steps", "1"]
    assert train_main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert "interrupted at step 2/10" in err[0] and str(out / "checkpoint-2") in err[0]
    assert "--resume-from-checkpoint last" in err[0]
