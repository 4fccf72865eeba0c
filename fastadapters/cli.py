"""The `fastadapters` command line: one sub-command per job, each owned by its own module.

    fastadapters bench   training-step table on an embedded default model (fastadapters.bench)
    fastadapters train   fine-tune an adapter like LLM-Adapters' finetune.py (fastadapters.train)
    fastadapters eval    score a model/adapter on the LLM-Adapters test sets (fastadapters.evaluate)

Each module exposes ``main(argv) -> int``; this file only routes, so importing it stays cheap.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

COMMANDS = {
    "bench": ("fastadapters.bench", "time training steps: frozen base, PEFT LoRA, fastadapters adapters"),
    "train": ("fastadapters.train", "fine-tune an adapter on an Alpaca-format JSON file"),
    "eval": ("fastadapters.evaluate", "evaluate a base model or adapter on math/commonsense test sets"),
    "serve": ("fastadapters.serving.serve", "OpenAI-compatible server: one base model, many adapters of every type"),
}


class UsageError(Exception):
    """A problem with a command's flags or inputs: reported as one line on stderr, exit code 2."""


class CommandParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, no usage dump, no SystemExit) on a bad flag."""

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
