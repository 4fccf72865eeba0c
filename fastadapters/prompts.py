"""Prompt templates of the LLM-Adapters pipeline: the training prompt and the evaluation prompt.

Both are the Alpaca instruction template (one form with an ``input`` section, one without). The
LLM-Adapters scripts wrote them as indented triple-quoted strings, so every line after the preamble
starts with 16 spaces, and the training and evaluation versions differ in trailing spaces. Adapters
trained with those scripts have seen exactly those bytes, so ``style="llm-adapters"`` (the default)
reproduces them byte for byte (their ``finetune.py`` for training, ``evaluate.py`` /
``commonsense_evaluate.py`` for evaluation). ``style="alpaca"`` gives the clean template without the
indentation, for new work that does not need to match the paper's checkpoints.

The training prompt is ``prompt + output``; the evaluation prompt is the training prompt's prefix
(everything up to and including the ``### Response:`` line), so a model trained on one is asked the
other.
"""
from __future__ import annotations

STYLES = ("llm-adapters", "alpaca")

_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
_PREAMBLE_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

_IND = " " * 16  # the indentation the original scripts' triple-quoted strings carried into the prompt


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"prompt style: got {style!r}; valid: {', '.join(STYLES)}")


def _assemble(preamble_end: str, blank: str, instruction: str, input: str, indent: str) -> str:
    """Lines of the template; ``preamble_end`` is what follows the preamble's last period on its line,
    ``blank`` the content of the blank lines between sections."""
    parts = []
    if input:
        parts.append(_PREAMBLE_INPUT + preamble_end + "\n")
        parts.append("\n")
        parts.append(f"{indent}### Instruction:\n{indent}{instruction}\n{blank}\n")
        parts.append(f"{indent}### Input:\n{indent}{input}\n{blank}\n")
    else:
        parts.append(_PREAMBLE_NO_INPUT + preamble_end + "\n")
        parts.append("\n")
        parts.append(f"{indent}### Instruction:\n{indent}{instruction}\n{blank}\n")
    parts.append(f"{indent}### Response:\n{indent}")
    return "".join(parts)


def training_prompt(instruction: str, input: str = "", output: str = "", *, style: str = "llm-adapters") -> str:
    """The full training text for one record: template + ``output`` (no EOS; tokenization adds it).

    With ``output=""`` this is the user part whose tokens ``train_on_inputs=False`` masks out.
    """
    _check_style(style)
    if style == "alpaca":
        return _assemble("", "", instruction, input, "") + output
    # LLM-Adapters finetune.py: one trailing space after the preamble with an input, two without;
    # blank lines between sections hold the 16-space indentation.
    end = " " if input else "  "
    return _assemble(end, _IND, instruction, input, _IND) + output


def evaluation_prompt(instruction: str, input: str = "", *, style: str = "llm-adapters") -> str:
    """The prompt the model is asked at evaluation time; the response is what it generates after it."""
    _check_style(style)
    if style == "alpaca":
        return _assemble("", "", instruction, input, "")
    # LLM-Adapters evaluate.py / commonsense_evaluate.py: no trailing space with an input, one
    # without; blank lines between sections are empty.
    end = "" if input else " "
    return _assemble(end, "", instruction, input, _IND)


def split_response(decoded: str) -> str:
    """The response part of a decoded prompt+generation, as the original read it: the text after
    the first ``### Response:``, stripped. Text without the marker is returned stripped."""
    marker = "### Response:"
    if marker in decoded:
        decoded = decoded.split(marker, 1)[1]
    return decoded.strip()
