"""Helpers for the pipeline tests: a byte-level BPE tokenizer trained in code, a tiny llama built from
a config, synthetic Alpaca-format tasks, and a quick in-process pretraining loop.

Nothing is downloaded: the tokenizer is trained on the synthetic records (about a second), the model
is initialised from a ``LlamaConfig`` and both are saved to a directory that the CLI then loads as
``--base-model``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from fastadapters.data import tokenize_records
from fastadapters.prompts import evaluation_prompt, training_prompt

# The tests use the clean Alpaca template: the LLM-Adapters one differs between training and
# evaluation in whitespace, which a real LLM shrugs off but a model trained for seconds does not.
STYLE = "alpaca"


# -- synthetic tasks ----------------------------------------------------------------------------
# Base task ("last"): name the last of three digits. Shifted task ("next"): name the digit after the
# last one (mod 10). Both answer "The answer is N." so the numeric extraction reads N; chance is 1/10.

def make_records(task: str, n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = (rng.randrange(10) for _ in range(3))
        if task == "last":
            instruction, ans = f"Which number comes last: {a} {b} {c}?", c
        elif task == "next":
            instruction, ans = f"Which number follows the last: {a} {b} {c}?", (c + 1) % 10
        else:
            raise ValueError(task)
        out.append({"instruction": instruction, "input": "", "output": f"The answer is {ans}.",
                    "answer": f"{float(ans)}"})
    return out


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# -- tokenizer and model ------------------------------------------------------------------------

def build_tokenizer(texts: list[str]):
    """A byte-level BPE (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2; BOS added; no pad token) as a
    transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_model(vocab_size: int, seed: int = 0, hidden_size: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def corpus_for_tokenizer() -> list[str]:
    texts = []
    for task in ("last", "next"):
        for r in make_records(task, 200, seed=123):
            for style in ("alpaca", "llm-adapters"):
                texts.append(training_prompt(r["instruction"], r["input"], r["output"], style=style))
                texts.append(evaluation_prompt(r["instruction"], r["input"], style=style))
    return texts


def pad_batch(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), n), pad_id)
    mask = torch.zeros((len(features), n), dtype=torch.long)
    labels = torch.full((len(features), n), -100)
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        ids[i, :k] = torch.tensor(f["input_ids"])
        mask[i, :k] = 1
        labels[i, :k] = torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pretrain(model, tokenizer, records, steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> float:
    """Plain AdamW loop on the training prompts (labels on the response only); returns the last loss."""
    feats = tokenize_records(tokenizer, records, cutoff_len=128, train_on_inputs=False, style=STYLE)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    model.train()
    loss = None
    for _ in range(steps):
        batch = pad_batch(rng.sample(feats, batch_size), tokenizer.eos_token_id)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def mean_loss(model, tokenizer, records, train_on_inputs: bool = False) -> float:
    """Mean token loss over ``records`` (response tokens only by default)."""
    feats = tokenize_records(tokenizer, records, cutoff_len=128, train_on_inputs=train_on_inputs, style=STYLE)
    model.eval()
    batch = pad_batch(feats, tokenizer.eos_token_id)
    return float(model(**batch).loss)


def make_base_model_dir(root: Path, pretrain_steps: int = 200, hidden_size: int = 64, name: str = "base") -> Path:
    """Train tokenizer + tiny llama on the base task (``pretrain_steps`` AdamW steps of 32 examples)
    and save both to ``root/name``."""
    tokenizer = build_tokenizer(corpus_for_tokenizer())
    model = build_model(len(tokenizer), hidden_size=hidden_size)
    if pretrain_steps:
        pretrain(model, tokenizer, make_records("last", 2000, seed=1), steps=pretrain_steps)
    out = root / name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def one_line_error(capsys, *needles) -> str:
    """The captured stderr: exactly one line, holding every needle (the CLI's error contract)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err
