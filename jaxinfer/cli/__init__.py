"""`jaxinfer <command> [--flags]`: each command is a module defining its absl flags and `main`.

Only the chosen command's module is imported, so each command sees only its own flags.
User errors (bad flags, missing files) print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from functools import partial

COMMANDS = {
    "generate": ("jaxinfer.cli.generate", "batch generation: JSONL prompts in, JSONL completions out"),
    "quickstart": ("jaxinfer.cli.quickstart", "build the embedded model if needed and run a demo"),
    "train": ("jaxinfer.cli.train", "pretrain or fine-tune a model on text (resumable)"),
    "train-draft": ("jaxinfer.cli.train_draft", "train Medusa draft heads on a frozen model"),
    "convert": ("jaxinfer.cli.convert", "convert between Hugging Face and orbax checkpoints"),
    "quantize": ("jaxinfer.cli.quantize", "quantize a model's weights (int8/int4/fp8/...) into a "
                 "checkpoint generate serves"),
    "compile": ("jaxinfer.cli.compile", "compile for a TPU (or lower for a GPU) not here: "
                "memory per device"),
}


def usage() -> str:
  lines = ["usage: jaxinfer <command> [--flags]   (jaxinfer <command> --help for flags)", ""]
  lines += [f"  {name:<11} {desc}" for name, (_, desc) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  if command not in COMMANDS:
    print(f"jaxinfer: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    sys.exit(2)
  module = importlib.import_module(COMMANDS[command][0])
  from absl import app, flags
  rest = argv[2:]
  if not any(a.startswith(("--verbosity", "-v")) for a in rest):
    rest = ["--verbosity=-1"] + rest  # library INFO logs (orbax, jax) only on request
  argv = [f"jaxinfer {command}"] + rest
  app.define_help_flags()
  try:  # (absl would print two lines and exit 1)
    flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (jaxinfer {command} --help lists the flags)")
  app.run(partial(_interruptible, module.main), argv=argv)


def _interruptible(command_main, argv: list[str]) -> None:
  """Ctrl-C ends the command with one line and status 130. What it wrote is kept: records and
  checkpoints are written whole (generate resumes from them, train with --resume)."""
  try:
    command_main(argv)
  except KeyboardInterrupt:
    print("interrupted; what was written is kept (generate resumes from it when run again, "
          "train with --resume)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)  # (not the interpreter's shutdown: threads still running would abort it)


def no_positional_args(argv: list[str]) -> None:
  """Every option is a --flag; a stray word is almost always a typo."""
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; all options are --flags")


def fail(message: str) -> None:
  """Ends the process with a one-line user error."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)
