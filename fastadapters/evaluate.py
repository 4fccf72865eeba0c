"""``fastadapters eval``: score a base model, or a base model with an adapter, on the LLM-Adapters
math and commonsense test sets with their prompt and answer extraction (``fastadapters.extraction``).

Differences from the original scripts, each a fix: generation is batched with left padding and an
attention mask (theirs padded without a mask, or ran one example at a time), the model is put in
``eval()`` mode (theirs left dropout on in the GPU path), decoding is greedy unless ``--num-beams``
asks for beams (theirs: 4 beams), and ``--adapter`` may be left out to score the base model.

Data: the LLM-Adapters test sets ship with the package (``fastadapters/testsets/llm-adapters/``,
copies of LLM-Adapters' ``dataset/<name>/test.json`` under ODC-By, attribution in its NOTICE.md),
so ``--dataset AddSub`` needs no download; ``--data-dir`` (or $FASTADAPTERS_DATA_DIR) points at
another copy, ``--data`` at one file of the same format.

Output: one JSON line per example (dataset, index, prompt, response, extracted, label, correct) in
``--output``, and a table of accuracy per dataset on stdout. For the math sets both numeric
readings are taken (the paper's last number, and the stricter number after the last answer marker):
the one ``--math-extraction`` picks is scored, the other is shown beside it. Data, adapter and output path are all
checked before the model is loaded and before any file is created; errors print one line on stderr
and return exit code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .cli import CommandParser as _Parser, UsageError, check_device, run_command, show_progress
from .data import DataError, load_records
from .extraction import (AQUA_MODES, DATASETS, MATH_MODES, canonical_dataset, dataset_kind, infer_dataset_rules,
                         label_is_valid, score)
from .prompts import STYLES, evaluation_prompt

MAX_NEW_TOKENS = {"math": 256, "choice": 256, "commonsense": 32}
DTYPES = ("float32", "bfloat16", "float16")
DATA_DIR_ENV = "FASTADAPTERS_DATA_DIR"
#: the LLM-Adapters test sets shipped with the package (ODC-By; attribution in NOTICE.md there)
SHIPPED_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testsets", "llm-adapters")
DESCRIPTION = """\
Score a base model, or a base model with an adapter, on the LLM-Adapters math and commonsense test
sets, with their prompt and answer extraction: one JSON line per example in --output, a table of
accuracy per dataset on stdout."""
EPILOG = """\
where the test sets come from:
  LLM-Adapters (Hu et al., arXiv 2304.01933; github.com/AGI-Edgerunners/LLM-Adapters), folder
  dataset/<name>/test.json. A copy of every set but hellaswag ships with fastadapters
  (fastadapters/testsets/llm-adapters/, ODC-By licence and attribution in its NOTICE.md and
  DATA_LICENSE): --dataset AddSub works without a download. --data-dir points at another copy.

the --data file format (the same as the shipped sets):
  a JSON list (or JSON Lines) of records {"instruction": "<question>", "input": "", "answer": "<label>"}
  ("input" optional, "output" ignored). "answer" is a string: a number ("4", "576.0") for the math
  sets, a letter A-E for AQuA, a label word for a commonsense set ("true"/"false" for boolq,
  "solution1"/"solution2" for piqa, "answer1".."answer5" for ARC, social_i_qa and openbookqa,
  "option1"/"option2" for winogrande, "ending1".."ending4" for hellaswag).

answer extraction (math sets):
  last-number    the paper's rule: the last number in the response ("9 + 1 = 10 apples after 1 day"
                 reads 1); the default, so accuracies compare with the paper's tables
  answer-marker  stricter: the first number after the last "answer is" or "=" ("... = 10 apples
                 after 1 day" reads 10); a response without a marker scores wrong
  Both are computed on every run; the table shows the other beside the one scored.

example:
  fastadapters eval --base-model ./SmolLM2-135M-Instruct --dataset AddSub --limit 5"""




def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastadapters eval", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--base-model", required=True, help="local model directory or transformers model id")
    p.add_argument("--gguf-file", metavar="NAME", default=None,
                   help="load the base model from this GGUF file inside --base-model (dequantized to "
                        "--model-dtype); default: the directory's config.json and weights")
    p.add_argument("--adapter", metavar="PATH", help="adapter directory (fastadapters, PEFT LoRA or LLM-Adapters); none: the base model")
    p.add_argument("--dataset", nargs="+", metavar="NAME",
                   help=f"test sets under --data-dir (<name>/test.json): {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV),
                   help=f"directory holding <name>/test.json (default: ${DATA_DIR_ENV}, else the copy shipped "
                        "with fastadapters: every set but hellaswag)")
    p.add_argument("--data", metavar="PATH",
                   help="one test file instead of --dataset; its rules come from --dataset NAME if given, "
                        "else from its labels (numeric: math, A-E: AQuA, label words: that commonsense set)")
    p.add_argument("--output", metavar="PATH", help="JSON Lines file with one record per example")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded)")
    p.add_argument("--num-beams", type=int, default=1, help="1: greedy (the original used 4)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: 256 for math and AQuA, 32 for commonsense sets")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of each set")
    p.add_argument("--math-extraction", choices=MATH_MODES, default="last-number",
                   help="last-number (the default): the paper's rule, the last number in the response; "
                        "answer-marker: stricter, the number after the last 'answer is' / '=' (see below)")
    p.add_argument("--aqua-extraction", choices=AQUA_MODES, default="first",
                   help="first: the original rule (first capital A-E); strict: the option the response chooses")
    p.add_argument("--prompt-style", choices=STYLES, default="llm-adapters",
                   help="llm-adapters: their evaluation template byte for byte; alpaca: the clean template")
    p.add_argument("--model-dtype", choices=DTYPES, default="float32", help="dtype of the base weights")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar; there is none anyway when stderr is not a terminal (a log file)")
    return p


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def _resolve_sets(args) -> list[tuple[str, str, list[dict]]]:
    """[(display name, rules dataset, records)], every record validated."""
    if args.data is not None:
        if args.dataset and len(args.dataset) > 1:
            raise UsageError("--data takes at most one --dataset (the rules to score it with)")
        rules = None
        if args.dataset:
            try:
                rules = canonical_dataset(args.dataset[0])
            except ValueError as e:
                raise UsageError(str(e)) from None
        path = Path(args.data)
        if rules is None:  # <name>/test.json of a known set: its rules
            try:
                rules = canonical_dataset(path.parent.name)
            except ValueError:
                rules = None
        display = rules or (path.parent.name if path.stem == "test" and path.parent.name else path.stem)
        files = [(display, rules, path)]
    else:
        if not args.dataset:
            raise UsageError("give --dataset NAME [NAME ...] or --data PATH")
        data_dir = args.data_dir or SHIPPED_DATA_DIR
        files = []
        for name in args.dataset:
            try:
                rules = canonical_dataset(name)
            except ValueError as e:
                raise UsageError(str(e)) from None
            path = Path(data_dir) / rules / "test.json"
            if not args.data_dir and not path.is_file():
                raise UsageError(f"--dataset {rules} is not shipped with fastadapters (license or size); get "
                                 f"dataset/{rules}/test.json from github.com/AGI-Edgerunners/LLM-Adapters and pass "
                                 f"--data-dir <folder holding {rules}/test.json>")
            files.append((rules, rules, path))
    sets = []
    for display, rules, path in files:
        try:
            records = load_records(path, require_answer=True, require_output=False)
        except DataError as e:
            raise UsageError(str(e)) from None
        if rules is None:
            rules = infer_dataset_rules([r["answer"] for r in records])
            if rules is None:
                raise UsageError(f"{path}: cannot tell which answer rules fit its labels; pass --dataset NAME "
                                 f"({', '.join(DATASETS)})")
        for i, r in enumerate(records):
            if not label_is_valid(rules, r["answer"]):
                raise UsageError(f"{path}: record {i}: field 'answer' {r['answer']!r} is not a valid {rules} label")
        if args.limit is not None:
            records = records[: args.limit]
        sets.append((display, rules, records))
    return sets


def _check_args(args) -> None:
    for flag in ("batch_size", "num_beams"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be >= 1")
    if args.output is not None:
        out = Path(args.output)
        if out.is_dir():
            raise UsageError(f"--output {out} is a directory")
        if not out.parent.exists() and str(out.parent) not in ("", "."):
            raise UsageError(f"--output: directory {out.parent} does not exist")


def _check_adapter_files(path: str) -> None:
    from .io import read_adapter

    try:
        read_adapter(path)
    except ValueError as e:
        raise UsageError(f"--adapter: {e}") from None


def _load(args):
    from .train import _load_model_and_tokenizer

    device = check_device(args.device)
    model, tokenizer = _load_model_and_tokenizer(args, args.model_dtype)
    if args.adapter is not None:
        import fastadapters as fa

        try:
            fa.load_adapter(model, args.adapter)
        except ValueError as e:
            raise UsageError(f"adapter {args.adapter} does not fit {args.base_model}: {e}") from None
    tokenizer.padding_side = "left"
    model.to(device)
    model.eval()
    return model, tokenizer, device


# ---------------------------------------------------------------------------------------------
# generation and scoring
# ---------------------------------------------------------------------------------------------

def generate_batch(model, tokenizer, prompts: list[str], *, max_new_tokens: int, num_beams: int = 1,
                   device: str = "cpu") -> list[str]:
    """Responses (decoded new tokens, special tokens dropped, stripped) for a left-padded batch."""
    import torch
    from transformers import GenerationConfig

    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    gen = GenerationConfig(do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.bos_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], generation_config=gen)
    new = out[:, enc["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def evaluate_set(model, tokenizer, name: str, rules: str, records: list[dict], args, device: str, sink
                 ) -> tuple[int, int, int | None]:
    """Generate, extract and score one test set; writes JSON lines to ``sink``; returns (correct,
    total, correct under the other math extraction -- None for a set that is not math)."""
    from tqdm.auto import tqdm

    kind = dataset_kind(rules)
    max_new = args.max_new_tokens or MAX_NEW_TOKENS[kind]
    mode = getattr(args, "math_extraction", "last-number")
    other_mode = next(m for m in MATH_MODES if m != mode)
    correct, other_correct = 0, (0 if kind == "math" else None)
    bar = tqdm(total=len(records), desc=name, unit="ex", disable=not show_progress(args.no_progress), file=sys.stderr)
    for start in range(0, len(records), args.batch_size):
        batch = records[start:start + args.batch_size]
        prompts = [evaluation_prompt(r["instruction"], r["input"], style=args.prompt_style) for r in batch]
        responses = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new, num_beams=args.num_beams,
                                   device=device)
        for i, (r, prompt, response) in enumerate(zip(batch, prompts, responses)):
            extracted, ok = score(rules, response, r["answer"], aqua_mode=args.aqua_extraction, math_mode=mode)
            correct += ok
            line = {"dataset": name, "index": start + i, "prompt": prompt, "response": response,
                    "extracted": _jsonable(extracted), "label": r["answer"], "correct": ok}
            if kind == "math":
                other, other_ok = score(rules, response, r["answer"], math_mode=other_mode)
                other_correct += other_ok
                line["math_extraction"] = mode
                line["other_extraction"] = {"math_extraction": other_mode, "extracted": _jsonable(other),
                                            "correct": other_ok}
            if sink is not None:
                sink.write(json.dumps(line) + "\n")
        if sink is not None:
            sink.flush()
        bar.update(len(batch))
        bar.set_postfix(acc=f"{correct / min(start + len(batch), len(records)):.3f}")
    bar.close()
    return correct, len(records), other_correct


def format_table(rows: list[tuple[str, int, int]]) -> str:
    width = max([len("dataset")] + [len(r[0]) for r in rows])
    lines = [f"{'dataset':<{width}}  {'correct':>7}  {'total':>6}  {'accuracy':>8}"]
    for name, correct, total in rows:
        lines.append(f"{name:<{width}}  {correct:>7d}  {total:>6d}  {correct / max(total, 1):>8.4f}")
    if len(rows) > 1:
        c, t = sum(r[1] for r in rows), sum(r[2] for r in rows)
        mean = sum(r[1] / max(r[2], 1) for r in rows) / len(rows)
        lines.append(f"{'(all)':<{width}}  {c:>7d}  {t:>6d}  {c / max(t, 1):>8.4f}  (mean of sets {mean:.4f})")
    return "\n".join(lines)


def extraction_lines(rows: list[tuple[str, int, int, int | None]], mode: str) -> list[str]:
    """One line per math set: its accuracy under the other numeric extraction, beside the one scored."""
    other = next(m for m in MATH_MODES if m != mode)
    label = {"last-number": "last-number (the paper's rule)", "answer-marker": "answer-marker (stricter)"}
    lines = [f"  {name}: {correct}/{total} by {label[mode]}, {other_correct}/{total} by {label[other]}"
             for name, correct, total, other_correct in rows if other_correct is not None]
    if lines:
        lines.insert(0, f"math answers read both ways (scored: --math-extraction {mode}):")
    return lines


def main(argv: list[str] | None = None) -> int:
    return run_command("fastadapters eval", _run, argv)


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    sets = _resolve_sets(args)
    if args.adapter is not None:
        _check_adapter_files(args.adapter)
    model, tokenizer, device = _load(args)

    # everything is checked: only now is the output file created
    sink = open(args.output, "w", encoding="utf-8") if args.output else None
    rows = []
    t0 = time.time()
    try:
        for name, rules, records in sets:
            rows.append((name, *evaluate_set(model, tokenizer, name, rules, records, args, device, sink)))
    finally:
        if sink is not None:
            sink.close()
    what = f"{args.base_model}" + (f" + {args.adapter}" if args.adapter else " (base model)")
    print(f"fastadapters eval: {what}, {time.time() - t0:.1f} s")
    print(format_table([r[:3] for r in rows]))
    for line in extraction_lines(rows, args.math_extraction):
        print(line)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
