"""The `fastadapters` command line: one sub-command per job, each owned by its own module.

    fastadapters bench   benchmark tables on embedded default models (fastadapters.bench)
    fastadapters train   fine-tune an adapter like LLM-Adapters' finetune.py (fastadapters.train)
    fastadapters eval    score a model/adapter on the LLM-Adapters test sets (fastadapters.evaluate)

Each module exposes ``main(argv) -> int``; this file routes to it and holds what the commands share:
the error contract (:class:`UsageError`: one line on stderr, exit code 2), the argument parser
(no prefix abbreviations, defaults shown in ``--help``), the ``--device`` check and the rule for
progress bars. Importing it stays cheap: a command reads its arguments before it imports torch or
transformers, so ``--help`` and a mistyped flag answer at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

COMMANDS = {
    "bench": ("fastadapters.bench.command", "time training steps: frozen base, PEFT LoRA, fastadapters adapters"),
    "train": ("fastadapters.train", "fine-tune an adapter on an Alpaca-format JSON file"),
    "eval": ("fastadapters.evaluate", "evaluate a base model or adapter on math/commonsense test sets"),
    "serve": ("fastadapters.serving.serve", "OpenAI-compatible server: one base model, many adapters of every type"),
}


class UsageError(Exception):
    """A problem with a command's flags or inputs: reported as one line on stderr, exit code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (unless it is None or an off switch, or the help already says
    what the default is) and keeps the description's and epilog's line breaks as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in text:
            return text
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """argparse for the sub-commands: a bad flag raises UsageError (one line, no usage dump, no
    SystemExit); a flag must be spelled out in full (``--lr`` is never taken for ``--lr-scheduler``);
    ``--help`` shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(message)


def run_command(prog: str, run: Callable[[list[str]], int], argv: list[str] | None) -> int:
    """``run(argv)`` with the commands' shared error contract: UsageError -> one line, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)


def check_device(spec: str | None, flag: str = "--device") -> str:
    """The device a command runs on: ``spec`` checked against this torch build and machine (a
    UsageError naming what is available otherwise), or cuda when available, else cpu."""
    import torch

    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {spec!r} is not a device; valid: cpu, cuda, cuda:N, ...") from None
    if device.type == "cpu":
        return spec
    if device.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:  # ROCm is "cuda" too
            raise UsageError(f"{flag} {spec}: this torch build ({torch.__version__}) has no CUDA support; "
                             f"use {flag} cpu, or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if count == 0:
            raise UsageError(f"{flag} {spec}: no CUDA device is visible (torch {torch.__version__}, "
                             f"CUDA_VISIBLE_DEVICES); use {flag} cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"{flag} {spec}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
        return spec
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise UsageError(f"{flag} {spec}: no {device.type} device is available here; use {flag} cpu")
    return spec


def show_progress(no_progress: bool, stream=None) -> bool:
    """Progress bars only on a terminal: in a log file (stream not a TTY) a bar's redraws leave
    escape codes and repeated lines, so the commands print plain lines there instead."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not no_progress and bool(isatty and isatty())


def _usage() -> str:
    lines = ["usage: fastadapters <command> [options]", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\nRun `fastadapters <command> --help` for the options of one command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"fastadapters: unknown command {cmd!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
