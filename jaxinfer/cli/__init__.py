"""`jaxinfer <command> [--flags]`: each command is a module defining its absl flags and `main`.

Only the chosen command's module is imported, so each command sees only its own flags.
User errors (bad flags, missing files) print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from functools import partial

from jaxinfer.platform import skip_an_absent_tpu

COMMANDS = {
    "generate": ("jaxinfer.cli.generate", "batch generation: JSONL prompts in, JSONL completions out"),
    "quickstart": ("jaxinfer.cli.quickstart", "build the embedded model if needed and run a demo"),
    "train": ("jaxinfer.cli.train", "pretrain or fine-tune a model on text (resumable)"),
    "train-draft": ("jaxinfer.cli.train_draft",
                    "train draft heads (Medusa, Hydra, EAGLE) on a frozen model"),
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
  # Until the command runs nothing is written: Ctrl-C while importing (JAX takes a second or
  # two) ends the process at once, not as a KeyboardInterrupt that a library's callback could
  # swallow or a traceback through the imports.
  _on_sigint(_interrupted_before_start)
  skip_an_absent_tpu()
  module = importlib.import_module(COMMANDS[command][0])
  from absl import app, flags
  rest = argv[2:]
  if any(a in ("-h", "--help", "-?", "--helpshort", "--helpfull") for a in rest):
    print(command_help(command, full="--helpfull" in rest))
    sys.exit(0)
  if not any(a.startswith(("--verbosity", "-v")) for a in rest):
    rest = ["--verbosity=-1"] + rest  # library INFO logs (orbax, jax) only on request
  argv = [f"jaxinfer {command}"] + rest
  app.define_help_flags()
  try:  # (absl would print two lines and exit 1)
    flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (jaxinfer {command} --help lists the flags)")
  app.run(partial(_interruptible, module.main), argv=argv)


# flags naming files or directories: "~/x" is the home directory's x, as a shell would read it
# (bash leaves the "~" of "--output=~/x" as it is: written there, it became a directory "~" here)
PATH_FLAGS = ("cache_dir", "compilation_cache", "data", "draft_heads", "draft_model",
              "hidden_cache", "metrics_output", "model", "output", "output_dir", "prompts",
              "workdir")


def _expand_home(values) -> None:
  for name in PATH_FLAGS:
    if name in values and isinstance(values[name].value, str) and \
        values[name].value.startswith("~"):
      setattr(values, name, os.path.expanduser(values[name].value))


def command_help(command: str, full: bool = False) -> str:
  """The command's summary and its own flags, by name (absl's --help lists only a program's
  main module's, which defines none here); `full` adds absl's own (--verbosity, ...)."""
  from absl import app, flags
  app.define_help_flags()
  own = lambda m: m.startswith("jaxinfer")
  modules = sorted(m for m in flags.FLAGS.flags_by_module_dict() if full or own(m))

  def listed(ms):
    text = "\n".join(flags.FLAGS.module_help(m).strip().split("\n", 1)[1] for m in ms)
    return "\n".join("  --" + f for f in sorted(("\n" + text).split("\n  --")[1:]))

  text = f"flags:\n{listed([m for m in modules if own(m)])}"
  if full:
    text += f"\n\nabsl's flags:\n{listed([m for m in modules if not own(m)])}"
  return (f"usage: jaxinfer {command} [--flags]\n{COMMANDS[command][1]}\n\n{text}\n\n"
          f"(--helpfull adds absl's own flags; docs/flags.md lists every command's)")


def _on_sigint(handler) -> None:
  """Ctrl-C calls `handler`, unless the process was started with it ignored (a launcher's
  choice, kept)."""
  if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
    signal.signal(signal.SIGINT, handler)


def _interrupted_before_start(signum, frame) -> None:
  del signum, frame
  print("interrupted before the command started; nothing was written", file=sys.stderr,
        flush=True)
  os._exit(130)


def _interruptible(command_main, argv: list[str]) -> None:
  """Ctrl-C ends the command with one line and status 130 (a training run stopped by SIGTERM,
  after saving its step: 143). What it wrote is kept: records and
  checkpoints are written whole (generate resumes from them, train with --resume). An interrupt
  that a callback swallowed (Python reports those as ignored) still ends the command when it
  returns; a second Ctrl-C ends it at once."""
  interrupts = []

  def on_sigint(signum, frame):
    interrupts.append(signum)
    if len(interrupts) > 1:
      _stop()
    raise KeyboardInterrupt

  _on_sigint(on_sigint)
  from absl import flags
  _expand_home(flags.FLAGS)  # (app.run has parsed them again)
  try:
    command_main(argv)
  except KeyboardInterrupt as e:  # (a training run stopped by SIGTERM says so: 143)
    _stop(getattr(e, "signum", signal.SIGINT))
  finally:  # (also when the command ends through sys.exit after an interrupt was swallowed)
    if interrupts:
      _stop()


def _stop(signum: int = signal.SIGINT) -> None:
  print("interrupted; what was written is kept (generate resumes from it when run again, "
        "train with --resume)", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(128 + signum)  # (not the interpreter's shutdown: threads still running would abort)


def no_positional_args(argv: list[str]) -> None:
  """Every option is a --flag; a stray word is almost always a typo."""
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; all options are --flags")


def fail(message: str) -> None:
  """Ends the process with a one-line user error. A process of a multi-process run ends without
  jax.distributed's shutdown, which waits for every process: one that died would keep it
  waiting until the runtime aborts."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  if "jax" in sys.modules and sys.modules["jax"].distributed.is_initialized():
    sys.stdout.flush()
    os._exit(2)
  sys.exit(2)
