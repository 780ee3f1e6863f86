"""What train.py, eval.py and generate.py share: one paragraph per expected failure instead of a
traceback, and the flags that place the Engram tables (`define_table_flags`).

An expected failure is one a user causes and can fix: a bad config value or flag, a missing or
unreadable data file, a checkpoint that cannot be restored or a step that is not there, a workdir
that another run holds, a diverged run. Its message is printed as one paragraph (it names the
cause, the intact checkpoint steps where that matters, and what to run) and the program exits
with status 1; the full traceback is printed too when `--verbosity` is given. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import shlex
import sys
import traceback
from typing import Callable, Optional, Sequence

from absl import flags

EXIT_ERROR = 1


def expected_errors() -> tuple:
  from engram_jax.checkpoint import CheckpointRestoreError
  from engram_jax.runlock import WorkdirBusyError
  from engram_jax.trainer import NonFiniteError

  # MemoryError: the host-table placement's refusal when the tables do not fit in RAM (tables/host.py).
  return (ValueError, OSError, MemoryError, CheckpointRestoreError, NonFiniteError, WorkdirBusyError)


def command_with(flag: str, value, argv: Optional[Sequence[str]] = None) -> str:
  """This program's command line (default sys.argv) with `--flag` set to `value`, replacing any
  value it had: what to run next."""
  argv = list(sys.argv if argv is None else argv)
  out, skip = [], False
  for arg in argv[1:]:
    if skip:
      skip = False
      continue
    if arg == f"--{flag}":
      skip = True
      continue
    if arg.startswith(f"--{flag}="):
      continue
    out.append(arg)
  return shlex.join(["python", argv[0]] + out + [f"--{flag}={value}"])


def paragraph(text) -> str:
  """`text` on one line (newlines and runs of spaces collapsed); the terminal wraps it."""
  return " ".join(str(text).split())


def report(error: BaseException, prog: str, suggestion: Optional[str] = None, *, verbose: bool = False,
           stream=None):
  """Print `error` as one paragraph to `stream` (stderr), then `suggestion` (a command to run) on a
  line of its own so it can be copied whole."""
  stream = stream or sys.stderr
  if verbose:
    traceback.print_exception(error, file=stream)
    print(file=stream)
  text = paragraph(f"{prog}: {type(error).__name__}: {error}")
  if not verbose:
    text += " (--verbosity=-1 prints the full traceback.)"
  if suggestion:
    text += f"\nRun: {suggestion}"
  print(text, file=stream)


def _is_closed_loop_noise(exc_type, exc) -> bool:
  return exc_type is RuntimeError and str(exc) == "Event loop is closed"


class _NeverRetrievedFilter(logging.Filter):
  def filter(self, record):
    return not str(record.msg).startswith("Task exception was never retrieved")


def silence_failed_read_noise():
  """Drop what orbax's asyncio machinery prints after a failed checkpoint read.

  When one array of a restore fails, orbax's gather of read tasks raises and its event loop
  closes while tensorstore still completes the other reads: the sibling tasks' errors are logged
  at garbage collection ("Task exception was never retrieved", one traceback each) and late
  completions hit the closed loop ("RuntimeError: Event loop is closed", reported as unraisable),
  hundreds of tracebacks for a train state that would bury the one-paragraph error. They carry
  nothing the restore's own error does not say. Only these two are dropped; with `--verbosity`
  nothing is.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_closed_loop_noise(unraisable.exc_type, unraisable.exc_value):
      previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_NeverRetrievedFilter())


def suggest_step(error: BaseException) -> Optional[str]:
  """The command that gets past a checkpoint error, when there is one: the same command at the newest
  step there is (a step that is not there) or at the intact step the error names (a damaged one)."""
  from engram_jax.checkpoint import CheckpointNotFoundError, CheckpointRestoreError

  if isinstance(error, CheckpointNotFoundError) and error.available:
    return command_with("step", max(error.available))
  if isinstance(error, CheckpointRestoreError) and error.intact is not None:
    return command_with("step", error.intact)
  return None


def run_reporting_errors(main: Callable, prog: str, suggest: Callable[[BaseException], Optional[str]] = lambda e: None):
  """Wrap an absl main: expected errors become one paragraph and exit status 1."""

  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      silence_failed_read_noise()
    try:
      return main(argv)
    except expected_errors() as e:
      verbose = flags.FLAGS["verbosity"].present
      report(e, prog, suggest(e), verbose=verbose)
      sys.exit(EXIT_ERROR)

  return wrapped


def define_table_flags():
  """Defines --engram_tables, --table_dir, --cache_rows, --quantize and --verify_tables (eval.py and
  generate.py); returns a function that gives their values as `ModelRunner.from_checkpoint`'s
  keyword arguments. They belong to the calling program, so its --help lists them."""
  caller = sys._getframe(1).f_globals.get("__name__", "")
  module = dict(module_name=sys.argv[0] if caller == "__main__" else caller)
  engram_tables = flags.DEFINE_enum(
      "engram_tables", "device", ["device", "host", "disk"],
      "Where the Engram tables live: in accelerator memory (device), host RAM (host: from --table_dir, or read "
      "from the checkpoint), or memory-mapped table files (disk: --table_dir). Rows are gathered on the host "
      "from hash ids known before the step that reads them.", **module)
  table_dir = flags.DEFINE_string("table_dir", None, "A table directory written by eval.py --export_tables (host/disk).",
                                  **module)
  cache_rows = flags.DEFINE_integer("cache_rows", 0, "Hot-row cache on the devices: rows per table, chosen by "
                                    "frequency over the start of the training split (0: no cache; host/disk).", **module)
  quantize = flags.DEFINE_enum("quantize", None, ["float32", "bfloat16", "int8", "float8_e4m3"],
                               "Row storage of exported tables (eval.py --export_tables) or of host tables read "
                               "from the checkpoint; with --table_dir, checked against the stored kind.", **module)
  verify = flags.DEFINE_boolean("verify_tables", False, "Check every table file's sha256 before using it "
                                "(reads every byte).", **module)

  def values() -> dict:
    return dict(engram_tables=engram_tables.value, table_dir=table_dir.value, cache_rows=cache_rows.value,
                quantize=quantize.value, verify_tables=verify.value)

  return values
