"""`fastadapters eval` out of the box (issue 20): the LLM-Adapters test sets ship with the package
with their licence and attribution, `eval --help` says where they come from and what a --data file
holds, and the sample run -- `--dataset AddSub --limit N` on SmolLM2, no --data-dir -- scores both
numeric readings (the paper's last number and the stricter answer marker) side by side."""
from __future__ import annotations

import fnmatch
import json
import os
import sys

import pytest
import torch

from fastadapters.evaluate import SHIPPED_DATA_DIR, main as eval_main
from fastadapters.extraction import DATASETS
from pipeline_utils import one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = [d for d in DATASETS if d != "hellaswag"]


def test_the_test_sets_ship_with_their_licence_and_attribution():
    for name in SHIPPED:
        records = json.load(open(os.path.join(SHIPPED_DATA_DIR, name, "test.json"), encoding="utf-8"))
        assert records and all(isinstance(r["answer"], str) and "instruction" in r for r in records), name
    notice = open(os.path.join(SHIPPED_DATA_DIR, "NOTICE.md"), encoding="utf-8").read()
    assert "LLM-Adapters" in notice and "2304.01933" in notice and "ODC-By" in notice
    assert "Open Data Commons Attribution License" in open(os.path.join(SHIPPED_DATA_DIR, "DATA_LICENSE")).read()
    # pyproject's package-data takes every shipped file into a wheel
    if sys.version_info >= (3, 11):
        import tomllib

        globs = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]["package-data"]
        patterns = globs["fastadapters"]
        pkg = os.path.join(ROOT, "fastadapters")
        for dirpath, _, files in os.walk(SHIPPED_DATA_DIR):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), pkg).replace(os.sep, "/")
                assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not in package-data"


def test_eval_help_says_where_the_sets_come_from_and_the_file_format(capsys):
    assert eval_main(["--help"]) == 0
    text = capsys.readouterr().out
    for needle in ("dataset/<name>/test.json", "AGI-Edgerunners/LLM-Adapters", "ships with fastadapters",
                   '"answer": "<label>"', "a number (\"4\", \"576.0\")", "--math-extraction",
                   "answer-marker", "last-number", "the paper's rule"):
        assert needle in text, needle


def test_a_set_that_is_not_shipped_says_where_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FASTADAPTERS_DATA_DIR", raising=False)
    assert eval_main(["--base-model", str(tmp_path), "--dataset", "hellaswag"]) == 2
    one_line_error(capsys, "--dataset hellaswag is not shipped", "AGI-Edgerunners/LLM-Adapters", "--data-dir")


def test_sample_eval_run_needs_no_data_dir(smollm2_folder, tmp_path, capsys, monkeypatch):
    """The README's sample, shortened (3 examples, 24 new tokens, one thread): no --data-dir."""
    monkeypatch.delenv("FASTADAPTERS_DATA_DIR", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path / "addsub.jsonl"
    try:
        rc = eval_main(["--base-model", smollm2_folder, "--dataset", "AddSub", "--limit", "3", "--max-new-tokens",
                        "24", "--device", "cpu", "--output", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    text = capsys.readouterr().out
    assert "AddSub" in text and "math answers read both ways (scored: --math-extraction last-number):" in text
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1, 2]
    shipped = json.load(open(os.path.join(SHIPPED_DATA_DIR, "AddSub", "test.json")))
    assert [r["label"] for r in lines] == [r["answer"] for r in shipped[:3]]
    correct = sum(r["correct"] for r in lines)
    other = sum(r["other_extraction"]["correct"] for r in lines)
    assert all(r["math_extraction"] == "last-number" and r["other_extraction"]["math_extraction"] == "answer-marker"
               for r in lines)
    assert (f"AddSub: {correct}/3 by last-number (the paper's rule), {other}/3 by answer-marker (stricter)"
            in text), text
