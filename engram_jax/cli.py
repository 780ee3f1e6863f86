"""What train.py, eval.py, generate.py and patch.py share: one paragraph per expected failure instead
of a traceback or a page of help, `--config.a.b=v` overrides of a checkpoint's saved config, the
persistent compilation cache, and the flags that place the Engram tables (`define_table_flags`).

An expected failure is one a user causes and can fix: a bad config value or flag, a missing or
unreadable data file, a checkpoint that cannot be restored or a step that is not there, a workdir
that another run holds, a diverged run. Its message is printed as one paragraph (it names the
cause, the intact checkpoint steps where that matters, and what to run) and the program exits
with status 1; the full traceback is printed too when `--verbosity` is given. Anything else is a
bug and keeps its traceback. Flag parsing is held to the same rule (`parse_flags`): a misspelled
`--config.*` key, an unknown preset variant or flag, a value of the wrong type is one paragraph,
with the keys it could have meant, instead of absl's help text or ml_collections' traceback.
"""

from __future__ import annotations

import difflib
import logging
import os
import shlex
import sys
import traceback
from typing import Callable, List, Optional, Sequence

from absl import app, flags

EXIT_ERROR = 1


class UsageError(ValueError):
  """A missing or contradictory flag: reported as one paragraph (absl's app.UsageError prints the
  whole help text first)."""


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
  if isinstance(error, UsageError):  # a flag problem: the flags are the whole story
    text = paragraph(f"{prog}: {error}")
  else:
    text = paragraph(f"{prog}: {type(error).__name__}: {error}")
    if not verbose:
      text += " (--verbosity=-1 prints the full traceback.)"
  if library_log and os.path.isfile(library_log) and os.path.getsize(library_log):
    text += f" Library log: {library_log}"
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


class _QuietFileHandler(logging.FileHandler):
  """A log file that never complains on the terminal: the disk it is on may be the full one."""

  def handleError(self, record):
    pass

  def _open(self):  # the workdir appears only once training starts (a failed start leaves none)
    os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
    return super()._open()


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _ours(pathname: str) -> bool:
  """Whether a log record comes from this package or one of the programs beside it."""
  path = os.path.abspath(pathname)
  return os.path.isfile(path) and (path.startswith(_PACKAGE + os.sep) or
                                   os.path.dirname(path) == os.path.dirname(_PACKAGE))


class _LibraryErrors(logging.Filter):
  """Keeps library errors (and their tracebacks) off the terminal: the program's paragraph says what
  happened, the log file keeps the details."""

  def filter(self, record):
    return not (record.levelno >= logging.ERROR and not _ours(record.pathname))


library_log: Optional[str] = None  # where log_library_errors_to sends them (the error paragraph names it)


def log_library_errors_to(path: str) -> str:
  """Sends library log records of level ERROR and above (orbax's background save threads log one
  traceback per array when a checkpoint write fails: hundreds of lines) to the file `path` instead
  of the terminal, and every library record of level WARNING and above to that file too; returns
  `path`. With `--verbosity` nothing is moved."""
  handler = _QuietFileHandler(os.path.abspath(path), delay=True)
  handler.setLevel(logging.WARNING)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(pathname)s:%(lineno)d] "
                                         "%(message)s"))
  root = logging.getLogger()
  for existing in root.handlers:
    existing.addFilter(_LibraryErrors())
  root.addHandler(handler)
  global library_log
  library_log = path
  return path


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
      if "compilation_cache" in flags.FLAGS:
        from engram_jax import compilation

        compilation.CompileStats.get()
        compilation.use_persistent_cache(flags.FLAGS.compilation_cache)
      return main(argv)
    except expected_errors() as e:
      verbose = flags.FLAGS["verbosity"].present
      report(e, prog, suggest(e), verbose=verbose)
      sys.exit(EXIT_ERROR)

  return wrapped


def _exporting() -> bool:
  return "export_tables" in flags.FLAGS and bool(flags.FLAGS.export_tables)


def define_table_flags():
  """Defines --engram_tables, --table_dir, --cache_rows, --quantize, --verify_tables and --force_tables (eval.py and
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
  force = flags.DEFINE_boolean("force_tables", False, "Use a --table_dir exported from another checkpoint or step "
                               "than the one restored (refused otherwise; recorded in results.json).", **module)

  def values() -> dict:
    """The flags as from_checkpoint's keyword arguments; contradictory ones refused in flag terms."""
    if engram_tables.value == "device":
      given = [f"--{f.name}={f.value}" for f in (table_dir, quantize) if f.value not in (None, "float32")]
      given += [f"--cache_rows={cache_rows.value}"] * bool(cache_rows.value)
      if given and not _exporting():
        raise UsageError(f"{' '.join(given)} apply to tables off the accelerator: add --engram_tables=host or disk "
                         "(the default, device, keeps the checkpoint's tables in its parameters)")
    if engram_tables.value == "disk" and not table_dir.value:
      raise UsageError("--engram_tables=disk memory-maps exported table files: add --table_dir DIR (export one with "
                       "python eval.py --workdir <run> --export_tables DIR)")
    if cache_rows.value < 0:
      raise UsageError(f"--cache_rows={cache_rows.value}: expected 0 (no cache) or a positive row count")
    return dict(engram_tables=engram_tables.value, table_dir=table_dir.value, cache_rows=cache_rows.value,
                quantize=quantize.value, verify_tables=verify.value, force_tables=force.value)

  return values


# ----------------------------------------------------------------------------------------------
# Flag parsing: one paragraph per bad flag, overrides of a saved config.

# The ConfigDict `engram_jax/saved_config.py` hands to ml_collections (see `with_saved_config`).
saved_config_for_overrides = None

_SAVED_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_config.py")


def flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value `argv` gives `--name` (`--name=v` or `--name v`; the last one wins), or None."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
  return value


def _overrides(argv: Sequence[str]) -> List[str]:
  return [a for a in argv[1:] if a.startswith("--config.")]


def _has_config(argv: Sequence[str]) -> bool:
  return any(a == "--config" or a.startswith("--config=") for a in argv[1:])


def checkpoint_dir_of(workdir: Optional[str], checkpoint: Optional[str]) -> str:
  """The checkpoints directory that --workdir or --checkpoint names, refusing with the other flag
  where the path given is the other kind of directory (a workdir given as --checkpoint, its
  checkpoints/ given as --workdir)."""
  if bool(workdir) == bool(checkpoint):
    raise UsageError("pass exactly one of --workdir (a training run's directory; reads <workdir>/checkpoints) and "
                     "--checkpoint (a checkpoints directory)")
  if workdir:
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path) and _holds_steps(workdir):
      raise UsageError(f"--workdir {workdir}: this is a checkpoints directory (it holds steps "
                       f"{_holds_steps(workdir)[:4]}), not a workdir: pass --checkpoint {workdir} or --workdir "
                       f"{os.path.dirname(os.path.normpath(workdir)) or '.'}")
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f"--workdir {workdir}: no such directory (train.py --workdir {workdir} creates it)")
    return path
  if not _holds_steps(checkpoint) and os.path.isdir(os.path.join(checkpoint, "checkpoints")):
    raise UsageError(f"--checkpoint {checkpoint}: this is a training workdir (its checkpoints are in "
                     f"{os.path.join(checkpoint, 'checkpoints')}): pass --workdir {checkpoint}")
  return checkpoint


def _holds_steps(directory: str) -> List[int]:
  try:
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit())
  except OSError:
    return []


def with_saved_config(argv: List[str]) -> List[str]:
  """`argv` with `--config=<saved_config.py>` added when it has `--config.*` overrides, no `--config`
  and a --workdir / --checkpoint (and --step) whose saved config they then change."""
  global saved_config_for_overrides

  overrides = _overrides(argv)
  if not overrides or _has_config(argv):
    return argv
  workdir, checkpoint = flag_value(argv, "workdir"), flag_value(argv, "checkpoint")
  if not workdir and not checkpoint:
    raise UsageError(f"{overrides[0]}: --config.* overrides change a config: pass --config configs/<preset>.py, or "
                     "--workdir/--checkpoint of a run whose saved config they should change")
  if workdir and checkpoint:
    return argv  # the program refuses the pair
  from engram_jax.config import config_dict
  from engram_jax.runner import load_config_from_checkpoint

  directory = checkpoint or os.path.join(workdir, "checkpoints")
  if not _holds_steps(directory):
    raise UsageError(f"{overrides[0]}: {directory} holds no checkpoint whose saved config the overrides could "
                     "change: pass --config configs/<preset>.py with them")
  step = flag_value(argv, "step") or flag_value(argv, "resume_step")
  if step is not None and not step.isdigit():
    return argv  # the flag parser names the bad step
  saved_config_for_overrides = config_dict(load_config_from_checkpoint(directory, None if step is None else int(step)))
  return [argv[0], f"--config={_SAVED_CONFIG_FILE}"] + list(argv[1:])


def _config_key_problem(argv: Sequence[str]) -> Optional[str]:
  """The first `--config.a.b=v` whose path the parsed config lacks, with the keys it could have meant."""
  from ml_collections import ConfigDict
  from ml_collections.config_flags import config_flags

  try:  # absl keeps no parsed value after an error: load the config again
    config = config_flags.ConfigFileFlagParser("config").parse(flag_value(argv, "config"))
  except Exception:  # noqa: BLE001 - the config file's own error is reported instead
    return None
  if not isinstance(config, ConfigDict):
    return None
  for arg in _overrides(argv):
    path = arg[len("--config."):].split("=", 1)[0]
    parts, node = path.split("."), config
    for i, key in enumerate(parts):
      where = ".".join(parts[:i])
      if not isinstance(node, ConfigDict):
        return f"--config.{path}: config.{where} is a value ({node!r}), it has no key {key!r}"
      if key in node:
        node = node[key]
        continue
      keys = sorted(node.keys())
      close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
      hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"its keys are {', '.join(keys)}"
      return f"--config.{path}: the config has no key {key!r} in {'config.' + where if where else 'config'} ({hint})"
  return None


def _flag_error_text(error: BaseException, argv: Sequence[str]) -> str:
  """One paragraph for an error raised while flags were parsed."""
  problem = _config_key_problem(argv) if isinstance(error, (AttributeError, KeyError, flags.Error)) else None
  if problem:
    return problem
  text = str(error)
  if isinstance(error, KeyError) and len(error.args) == 1:
    text = str(error.args[0])
  if "Error whilst parsing config file" in text:  # ml_collections wraps a preset's error in its traceback
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = f"--config {flag_value(argv, 'config')}: {lines[-1]}"
  return text


def parse_flags(prog: str) -> Callable[[List[str]], List[str]]:
  """absl's flags_parser for `prog`: parses argv (with the saved config for overrides, as
  `with_saved_config`), and on a bad flag prints one paragraph and exits with status 1 instead of the
  program's whole help or a library traceback (both with `--verbosity`)."""

  def parse(argv):
    verbose = any(a.startswith("--verbosity") or a.startswith("-v") for a in argv[1:])
    try:
      argv = with_saved_config(list(argv))
      return flags.FLAGS(argv)
    except (flags.Error, ValueError, AttributeError, KeyError, TypeError, OSError) + expected_errors() as e:
      if verbose:
        traceback.print_exception(e, file=sys.stderr)
        print(file=sys.stderr)
      text = paragraph(f"{prog}: {_flag_error_text(e, argv)}")
      print(f"{text} (`python {prog} --helpshort` lists the flags.)", file=sys.stderr)
      sys.exit(EXIT_ERROR)

  return parse


def run(main: Callable, prog: str, suggest: Callable[[BaseException], Optional[str]] = lambda e: None):
  """app.run for one of the command-line programs: flags parsed by `parse_flags`, expected errors
  reported by `run_reporting_errors`, and the persistent compilation cache (`--compilation_cache`)."""
  if "compilation_cache" not in flags.FLAGS:
    flags.DEFINE_string("compilation_cache", None, "Directory of JAX's persistent compilation cache, so a second "
                        "call reads its compiled programs instead of compiling them (default: "
                        "$ENGRAM_JAX_CACHE_DIR, else ~/.cache/engram_jax/xla; off: compile every time).",
                        module_name=sys.argv[0])
  app.run(run_reporting_errors(main, prog, suggest), flags_parser=parse_flags(prog))
