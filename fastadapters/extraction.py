"""Answer extraction and scoring for the LLM-Adapters test sets, rule for rule as the original.

The rules (LLM-Adapters ``evaluate.py`` and ``commonsense_evaluate.py``), which the paper's tables
were computed with:

- numeric sets (AddSub, MultiArith, SingleEq, gsm8k, SVAMP, mawps): remove every comma, take the
  last match of ``-?\\d+\\.?\\d*`` as a float (no match: +inf, never correct), correct when it is
  within 1e-3 of ``float(answer)``. The last number is not always the answer ("9 + 1 = 10 apples
  after 1 day" reads 1); ``math_mode="answer-marker"`` is the stricter reading (see
  :func:`extract_number_after_marker`), kept apart so the default stays comparable with the paper;
- AQuA: the first capital letter A-E anywhere in the response, compared with the label letter. This
  reads the "A" of "A:" or the "B" of "Bob" as the choice; ``aqua_mode="strict"`` is the corrected
  reading (see :func:`extract_choice_strict`);
- commonsense sets: the first occurrence of one of the set's label words (case-sensitive), compared
  with the label string: boolq ``true|false``, piqa ``solution1|solution2``, social_i_qa / ARC /
  openbookqa ``answer1..answer5``, hellaswag ``ending1..ending4``, winogrande ``option1|option2``.
"""
from __future__ import annotations

import math
import re
from typing import Any

MATH_DATASETS = ("AddSub", "MultiArith", "SingleEq", "gsm8k", "SVAMP", "mawps")
CHOICE_DATASETS = ("AQuA",)
COMMONSENSE_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    # the original used one answer1-5 pattern for all four (social_i_qa has 3 choices, openbookqa 4,
    # ARC 4 or 5); a wider pattern only matters for responses naming a choice that does not exist.
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
}
DATASETS = MATH_DATASETS[:5] + ("AQuA",) + MATH_DATASETS[5:] + (
    "boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa", "hellaswag")
AQUA_MODES = ("first", "strict")
MATH_MODES = ("last-number", "answer-marker")
NUMERIC_TOLERANCE = 1e-3

_NUMBER = re.compile(r"-?\d+\.?\d*")
_LETTER = re.compile(r"[A-E]")
_COMMONSENSE_RE = {name: re.compile("|".join(words)) for name, words in COMMONSENSE_LABELS.items()}


def canonical_dataset(name: str) -> str:
    """The canonical spelling of a dataset name (case-insensitive match), or ValueError listing them."""
    for d in DATASETS:
        if d.lower() == name.lower():
            return d
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


def dataset_kind(name: str) -> str:
    """``"math"`` (numeric answer), ``"choice"`` (AQuA letter) or ``"commonsense"`` (label word)."""
    name = canonical_dataset(name)
    if name in MATH_DATASETS:
        return "math"
    if name in CHOICE_DATASETS:
        return "choice"
    return "commonsense"


def extract_number(response: str) -> float:
    """The last number in ``response`` after removing commas; ``inf`` when there is none."""
    found = _NUMBER.findall(response.replace(",", ""))
    if not found:
        return math.inf
    try:
        return float(found[-1])
    except ValueError:  # cannot happen with this pattern; kept as the original guarded it
        return math.inf


_MARKER = re.compile(r"answer\s+is|=", re.I)


def extract_number_after_marker(response: str) -> float:
    """The stricter numeric reading: the first number after the last answer marker -- "answer is"
    (any case, as in "The answer is 10") or "=" (as in "9 + 1 = 10") -- commas removed; ``inf``
    (never correct) when the response has no marker or no number after it."""
    text = response.replace(",", "")
    markers = list(_MARKER.finditer(text))
    if not markers:
        return math.inf
    m = _NUMBER.search(text, markers[-1].end())
    return float(m.group(0)) if m else math.inf


def extract_choice_first(response: str) -> str:
    """The original AQuA rule: the first capital A-E anywhere in the stripped response, or ''."""
    m = _LETTER.search(response.strip())
    return m.group(0) if m else ""


_STRICT_PATTERNS = (
    # "the answer is (D)", "Answer: D", "answer is option C", "correct answer is: (b)", "answer: b".
    # A capital letter, or any letter in parentheses, is the choice; a lone lowercase one only when
    # no word follows it: in "the answer is a number" / "answer is e.g. 5" it is an article / an
    # abbreviation, not choice A / E.
    re.compile(r"(?i:answer\s*(?:is|:)?\s*:?\s*(?:option|choice)?)\s*"
               r"(?:\(\s*([A-Ea-e])\s*\)|([A-E])\s*\)?(?![A-Za-z0-9])|([a-e])\s*\)?(?![A-Za-z0-9])(?!\s*[A-Za-z])"
               r"(?!\.[A-Za-z]))"),
    re.compile(r"\(([A-E])\)"),  # a parenthesised choice, as the options are written
    re.compile(r"(?<![A-Za-z0-9])([A-E])[).:]?\s*$"),  # a bare letter ending the response
)


def extract_choice_strict(response: str) -> str:
    """Corrected AQuA reading: the choice the response commits to, or ''.

    In order: the last "answer is X" / "answer: (X)" / "answer is option X" statement; else the last
    parenthesised ``(X)``; else a lone letter A-E ending the response. Letters inside words ("Bob",
    "A:" at the start of a rationale) are never read as the choice, nor is a lowercase letter after
    "answer is" that a word follows (the article of "the answer is a number", "e.g.").
    """
    text = response.strip()
    for pattern in _STRICT_PATTERNS:
        found = pattern.findall(text)
        if found:
            last = found[-1]
            return (last if isinstance(last, str) else next(g for g in last if g)).upper()
    return ""


def extract_label(dataset: str, response: str) -> str:
    """The first label word of ``dataset``'s set in the stripped response, or ''."""
    m = _COMMONSENSE_RE[canonical_dataset(dataset)].search(response.strip())
    return m.group(0) if m else ""


def extract(dataset: str, response: str, *, aqua_mode: str = "first", math_mode: str = "last-number") -> Any:
    """The prediction the rules of ``dataset`` read from ``response`` (float, letter or label word)."""
    if aqua_mode not in AQUA_MODES:
        raise ValueError(f"aqua_mode: got {aqua_mode!r}; valid: {', '.join(AQUA_MODES)}")
    if math_mode not in MATH_MODES:
        raise ValueError(f"math_mode: got {math_mode!r}; valid: {', '.join(MATH_MODES)}")
    kind = dataset_kind(dataset)
    if kind == "math":
        return extract_number_after_marker(response) if math_mode == "answer-marker" else extract_number(response)
    if kind == "choice":
        return extract_choice_strict(response) if aqua_mode == "strict" else extract_choice_first(response)
    return extract_label(dataset, response)


def is_correct(dataset: str, predicted: Any, label: str) -> bool:
    """Scoring as the original: numeric within 1e-3 of ``float(label)``, otherwise string equality."""
    if dataset_kind(dataset) == "math":
        return abs(float(label) - float(predicted)) <= NUMERIC_TOLERANCE
    return predicted == label


def score(dataset: str, response: str, label: str, *, aqua_mode: str = "first",
          math_mode: str = "last-number") -> tuple[Any, bool]:
    """``(extracted, correct)`` for one response."""
    predicted = extract(dataset, response, aqua_mode=aqua_mode, math_mode=math_mode)
    return predicted, is_correct(dataset, predicted, label)


def label_is_valid(dataset: str, label: Any) -> bool:
    """Whether ``label`` is a well-formed answer for ``dataset`` (checked before evaluating)."""
    if not isinstance(label, str):
        return False
    kind = dataset_kind(dataset)
    if kind == "math":
        try:
            return math.isfinite(float(label))
        except ValueError:
            return False
    if kind == "choice":
        return label in ("A", "B", "C", "D", "E")
    return label in COMMONSENSE_LABELS[canonical_dataset(dataset)]


def infer_dataset_rules(labels: list[str]) -> str | None:
    """For ``--data PATH`` without ``--dataset``: a dataset whose rules fit every label, or None.

    Numeric labels read as math (gsm8k rules, the same for all numeric sets), A-E as AQuA, label words
    as the first commonsense set whose label words contain them all.
    """
    if not labels:
        return None
    for name in ("gsm8k", "AQuA", "boolq", "piqa", "social_i_qa", "winogrande", "hellaswag"):
        if all(label_is_valid(name, lab) for lab in labels):
            return name
    return None
