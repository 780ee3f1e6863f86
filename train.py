"""Train an Engram model: `python train.py --config configs/tiny.py --workdir runs/tiny`.

Override any config value on the command line: `--config.train.steps=200`; drop a component with a
preset variant: `--config configs/small.py:no_engram` (or `:dense`, comma-separated to combine).
`--dry_run` prints parameter counts and per-device memory as one JSON line without allocating.
Multi-host: pass --coordinator_address/--num_processes/--process_id (or run where
`jax.distributed.initialize()` discovers them, e.g. a TPU pod or SLURM) and every process runs
the same command; only process 0 logs, writes summaries and holds the workdir's lock.

A run resumes from the newest checkpoint in its workdir (`--resume_step N`: from step N; the newer
steps are moved to `<workdir>/checkpoints.superseded/`). One run at a time may use a workdir.
Expected failures (bad config values or flags, missing or non-UTF-8 data, a damaged checkpoint,
a busy workdir, a diverged run) print one paragraph, with the command to run next where there is
one; any `--verbosity` (`-1` keeps the log level) adds the traceback.

Exit status: 0 when training completed (or reached --max_steps, or a finite data.num_epochs ran
out); 1 on an error; 128 + the signal number when SIGTERM (143) or SIGINT (130) preempted it, after
saving a checkpoint: rerun the same command to resume.
"""

import json
import os
import shlex
import sys

from absl import flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a preset in configs/.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard events go here.")
_DRY_RUN = flags.DEFINE_boolean("dry_run", False, "Print parameter counts and per-device bytes; allocate nothing.")
_DRY_RUN_DEVICES = flags.DEFINE_integer(
    "dry_run_devices", None, "With --dry_run: the device count to plan for (default: the devices present).")
_PROGRESS = flags.DEFINE_boolean("progress", None, "Show a progress bar (default: when stderr is a terminal).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Stop after this step (with a checkpoint), as if preempted.",
                                  lower_bound=1)
_RESUME_STEP = flags.DEFINE_integer("resume_step", None, "Resume from this saved step instead of the newest one "
                                    "(the newer steps are moved to <workdir>/checkpoints.superseded/).", lower_bound=1)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def _maybe_initialize_distributed():
  import jax

  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif any(v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID")):
    jax.distributed.initialize()


def _suggest(error):
  """The command that gets past `error`, when there is one."""
  from engram_jax.checkpoint import CheckpointNotFoundError, CheckpointRestoreError
  from engram_jax.cli import command_with

  if isinstance(error, CheckpointNotFoundError) and error.available:
    return command_with("resume_step", max(error.available))
  if isinstance(error, CheckpointRestoreError) and error.intact is not None:
    return command_with("resume_step", error.intact)
  return None


def _config(values):
  """The Config the flags give, or one error naming every problem at once: a value the config refuses
  and data files that do not exist (one fix at a time would hide the second behind the first)."""
  from engram_jax.config import Config, from_dict

  missing = []
  for field in ("train_files", "eval_files", "tokenizer_path"):
    value = values.data.get(field)
    paths = value.split(",") if isinstance(value, str) else list(value or ())
    missing += [f"--config.data.{field}: {p!r} does not exist" for p in paths if p and not os.path.exists(p)]
  try:
    cfg = from_dict(Config, values)
  except ValueError as e:
    raise ValueError("; ".join([str(e)] + missing)) from None
  if missing:
    raise FileNotFoundError("; ".join(missing))
  return cfg


def _has_checkpoint(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(p.isdigit() for p in os.listdir(directory))


def main(argv):
  from engram_jax.cli import UsageError

  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # absl's default under app.run is INFO: orbax's chatter
    logging.set_verbosity(logging.WARNING)   # would bury the run's own lines (--verbosity=0 for it)
  if _CONFIG.value is not None:
    cfg = _config(_CONFIG.value)
    if _WORKDIR.value and _has_checkpoint(_WORKDIR.value):
      from engram_jax.runner import check_checkpoint_engram

      check_checkpoint_engram(cfg, os.path.join(_WORKDIR.value, "checkpoints"), fix=(
          f"resume it as it was trained (python train.py --workdir {shlex.quote(_WORKDIR.value)}, without --config), "
          "or train the other model in a new --workdir"))
  elif _WORKDIR.value and _has_checkpoint(_WORKDIR.value):
    from engram_jax.runner import load_config_from_checkpoint

    cfg = load_config_from_checkpoint(os.path.join(_WORKDIR.value, "checkpoints"))  # resume it as it was
  else:
    raise UsageError("--config is required (e.g. --config configs/tiny.py), unless --workdir holds a checkpoint "
                     "whose saved config the run resumes with")
  if _DRY_RUN.value:
    from engram_jax.planning import dry_run_report

    print(json.dumps(dry_run_report(cfg, num_devices=_DRY_RUN_DEVICES.value)))
    return
  if not _WORKDIR.value:
    raise UsageError("--workdir is required (checkpoints and metrics are written there)")
  _maybe_initialize_distributed()
  import jax

  if not flags.FLAGS["verbosity"].present:  # library tracebacks (a failed checkpoint write) go to a file
    from engram_jax.cli import log_library_errors_to

    log_library_errors_to(os.path.join(_WORKDIR.value, "train.log"))

  from engram_jax import trainer

  summary = trainer.train(cfg, _WORKDIR.value, progress=_PROGRESS.value, max_steps=_MAX_STEPS.value,
                          resume_step=_RESUME_STEP.value)
  if jax.process_index() == 0:
    print()
    print("\n".join(trainer.summary_lines(summary, cfg, _WORKDIR.value)))
  if summary["stopped_by"] == "preempted":
    sys.exit(128 + summary["signal"])  # not 0: a scheduler must tell a preemption from completion


if __name__ == "__main__":
  from engram_jax.cli import run

  run(main, "train.py", _suggest)
