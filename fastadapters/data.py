"""Alpaca-format data for the pipeline: loading and validating records, tokenizing them for training.

A data file is a JSON list of objects (or JSON Lines, one object a line) with string fields
``instruction``, ``output``, optional ``input`` and, for evaluation, ``answer``. Problems are reported
as :class:`DataError` naming the file, the record index and the field, before anything is trained or
written.

Tokenization follows LLM-Adapters' ``finetune.py``: the training prompt (``prompts.training_prompt``)
truncated to ``cutoff_len`` tokens, EOS appended when the text does not already end with it and there
is room, labels a copy of the ids; with ``train_on_inputs=False`` the labels of the prompt part (the
tokens of the prompt without the output) are set to -100.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .prompts import training_prompt

IGNORE_INDEX = -100


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, record and field."""


def load_records(path: str | Path, *, require_answer: bool = False, require_output: bool = True) -> list[dict[str, str]]:
    """Read and validate an Alpaca-format file; returns records with ``input`` defaulted to ''.

    Raises :class:`DataError` for a missing file, invalid JSON, a top level that is not a list, a
    record that is not an object, a missing required field or a field that is not a string.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        raw = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    if not raw:
        raise DataError(f"{path}: no records")
    required = ["instruction"] + (["output"] if require_output else []) + (["answer"] if require_answer else [])
    records = []
    for i, rec in enumerate(raw):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i}: expected an object with fields {required}, got {type(rec).__name__}")
        for name in required:
            if name not in rec:
                raise DataError(f"{path}: record {i}: missing field {name!r}")
        for name in ("instruction", "input", "output", "answer"):
            if name in rec and not isinstance(rec[name], str):
                if name == "input" and rec[name] is None:
                    continue
                raise DataError(f"{path}: record {i}: field {name!r} must be a string, got {type(rec[name]).__name__}")
        out = {k: v for k, v in rec.items()}
        out["input"] = rec.get("input") or ""
        out.setdefault("output", "")
        records.append(out)
    return records


def split_train_val(records: list[Any], val_set_size: int, seed: int = 42) -> tuple[list[Any], list[Any]]:
    """Shuffle with ``seed`` and hold out ``val_set_size`` records (0: no validation set)."""
    if val_set_size < 0:
        raise DataError(f"val-set-size must be >= 0, got {val_set_size}")
    if val_set_size >= len(records):
        raise DataError(f"val-set-size {val_set_size} leaves no training records (the data has {len(records)})")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val = [records[i] for i in order[:val_set_size]]
    train = [records[i] for i in order[val_set_size:]]
    return train, val


def _encode(tokenizer, text: str, cutoff_len: int, add_eos: bool) -> list[int]:
    ids = tokenizer(text, truncation=True, max_length=cutoff_len, padding=False)["input_ids"]
    ids = list(ids)
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
        ids.append(eos)
    return ids


def tokenize_record(tokenizer, record: dict[str, str], *, cutoff_len: int = 256, train_on_inputs: bool = True,
                    add_eos: bool = True, style: str = "llm-adapters") -> dict[str, list[int]]:
    """``{input_ids, attention_mask, labels}`` for one record (see the module docstring)."""
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}")
    full = training_prompt(record["instruction"], record.get("input", ""), record.get("output", ""), style=style)
    ids = _encode(tokenizer, full, cutoff_len, add_eos)
    labels = list(ids)
    if not train_on_inputs:
        user = training_prompt(record["instruction"], record.get("input", ""), "", style=style)
        n_user = len(_encode(tokenizer, user, cutoff_len, add_eos=False))
        labels = [IGNORE_INDEX] * min(n_user, len(ids)) + labels[n_user:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_records(tokenizer, records: list[dict[str, str]], **kwargs) -> list[dict[str, list[int]]]:
    """:func:`tokenize_record` over a list (a list is a map-style dataset for ``Trainer``)."""
    return [tokenize_record(tokenizer, r, **kwargs) for r in records]
