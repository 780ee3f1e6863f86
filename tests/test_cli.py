"""The command line as people meet it (issue 33): every expected failure of train.py, eval.py,
generate.py and patch.py is one short paragraph before any slow work, `--config.*` overrides work on a
checkpoint's saved config, a table directory is bound to the checkpoint it was exported from, a
failed checkpoint write names the space and the intact step, and a second call reads its compiled
programs from the persistent compilation cache (counted, not timed)."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from engram_jax import checkpoint as ckpt_lib
from engram_jax import cli, evaluation, trainer
from engram_jax.config import CheckpointConfig, load_preset
from engram_jax.runner import host_tables, load_config_from_checkpoint
from engram_jax.tables import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tiny_checkpoint")
FIXTURE_CKPT = os.path.join(FIXTURE, "checkpoints")
MAX_LINES = 5


def _env(cache=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if cache is None and jax.config.jax_compilation_cache_dir:
    cache = jax.config.jax_compilation_cache_dir
  if cache:
    env["ENGRAM_JAX_CACHE_DIR"] = cache
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def _run(script, *args, cwd=ROOT, cache=None, timeout=600):
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True,
                        timeout=timeout, cwd=cwd, env=_env(cache))


def _refused(result, *wanted):
  """The run failed with status 1 and at most MAX_LINES lines of output holding each of `wanted`."""
  text = (result.stdout + result.stderr).strip()
  assert result.returncode == 1, text
  assert "Traceback" not in text, text
  lines = text.splitlines()
  assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n{text}"
  for w in wanted:
    assert w in text, f"{w!r} not in:\n{text}"
  return text


# ---------------------------------------------------------------------------------------------
# One paragraph per failure, before anything slow.


@pytest.fixture(scope="module")
def files_here(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli")
  (d / "facts.txt").write_text("The ship Beljor Kelbel sails from the harbour of Tamsin.\n")
  (d / "empty.txt").write_text("\n  \n")
  (d / "existing").mkdir()
  workdir = d / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  return d


CASES = {
    # item 2: a misspelled --config key, a preset variant that does not exist
    "config_key": ("train.py", ["--config", TINY, "--config.train.stepz=3", "--dry_run"],
                   ["no key 'stepz' in config.train", "did you mean 'steps'?"]),
    "config_section": ("train.py", ["--config", TINY, "--config.trian.steps=3", "--dry_run"],
                       ["no key 'trian' in config", "did you mean 'train'?"]),
    "variant": ("train.py", ["--config", TINY + ":nonsense", "--dry_run"],
                ["Config.variant='nonsense'", "expected one of ['dense', 'no_engram']"]),
    # item 2 with item 3: overrides of the checkpoint's saved config get the did-you-mean too
    "saved_config_key": ("eval.py", ["--checkpoint", FIXTURE_CKPT, "--config.data.batch_sise=4"],
                         ["no key 'batch_sise' in config.data", "did you mean 'batch_size'?"]),
    # item 5: missing flags, a mistyped subcommand, missing files, an existing --out
    "eval_no_checkpoint": ("eval.py", [], ["pass exactly one of --workdir", "--checkpoint"]),
    "generate_no_prompt": ("generate.py", ["--checkpoint", FIXTURE_CKPT], ["pass exactly one of --prompt"]),
    "patch_subcommand": ("patch.py", ["creat"], ["unknown command 'creat'", "did you mean 'create'?"]),
    "patch_no_command": ("patch.py", [], ["no command given", "python patch.py create"]),
    "patch_no_facts": ("patch.py", ["create", "--checkpoint", FIXTURE_CKPT], ["create needs --facts"]),
    "patch_missing_facts": ("patch.py", ["create", "--checkpoint", FIXTURE_CKPT, "--facts", "{d}/missing.txt",
                                         "--out", "{d}/p1"], ["--facts: ", "missing.txt' does not exist"]),
    "patch_existing_out": ("patch.py", ["create", "--checkpoint", FIXTURE_CKPT, "--facts", "{d}/facts.txt",
                                        "--out", "{d}/existing"], ["already exists", "never written over"]),
    # item 6: a :no_engram config against an Engram checkpoint
    "no_engram_config": ("eval.py", ["--config", TINY + ":no_engram", "--checkpoint", FIXTURE_CKPT],
                         ["has Engram layers", "drop --config"]),
    # item 8: the warmup names its override, and the missing data file is not hidden behind it
    "warmup_and_file": ("train.py", ["--config", TINY, "--workdir", "{d}/new", "--config.train.steps=5",
                                     "--config.data.train_files={d}/nowhere.txt"],
                        ["--config.train.warmup_steps", "nowhere.txt' does not exist"]),
    # item 8: a workdir given as --checkpoint, a checkpoints directory given as --workdir
    "checkpoint_is_workdir": ("eval.py", ["--checkpoint", FIXTURE], ["is a training workdir", "pass --workdir"]),
    "workdir_is_checkpoints": ("eval.py", ["--workdir", FIXTURE_CKPT], ["is a checkpoints directory",
                                                                          "pass --checkpoint"]),
    # item 8: checks that need no checkpoint come first (an empty --eval_files), flags not library words
    "empty_eval_file": ("eval.py", ["--checkpoint", FIXTURE_CKPT, "--eval_files", "{d}/empty.txt"], ["is empty"]),
    "table_flags": ("eval.py", ["--checkpoint", FIXTURE_CKPT, "--table_dir", "{d}/t"],
                    ["--table_dir=", "add --engram_tables=host or disk"]),
    "disk_without_dir": ("generate.py", ["--checkpoint", FIXTURE_CKPT, "--prompt", "x", "--engram_tables", "disk"],
                         ["--engram_tables=disk", "add --table_dir DIR"]),
    # item 3: overrides apply to the saved config without --config (the prompt check sees the new length)
    "override_saved_config": ("generate.py", ["--checkpoint", FIXTURE_CKPT, "--config.model.max_seq_len=8",
                                              "--max_new_tokens", "4", "--prompt", "one two three four five six"],
                              ["model.max_seq_len=8"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_expected_failures_are_one_short_paragraph(case, files_here):
  script, args, wanted = CASES[case]
  args = [a.replace("{d}", str(files_here)) for a in args]
  _refused(_run(script, *args), *wanted)
  assert not (files_here / "new").exists()  # a refused start leaves no workdir


def test_verbosity_still_shows_the_traceback():
  result = _run("eval.py", "--checkpoint", FIXTURE, "--verbosity=0")
  assert result.returncode == 1
  assert "Traceback" in result.stderr and "pass --workdir" in result.stderr


def test_overrides_without_a_checkpoint_to_change_name_the_remedy(tmp_path):
  _refused(_run("train.py", "--workdir", tmp_path / "fresh", "--config.train.steps=4"),
           "holds no checkpoint whose saved config", "pass --config configs/<preset>.py")


# ---------------------------------------------------------------------------------------------
# Item 1: a table directory is bound to the checkpoint it came from.


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A tiny run with checkpoints at steps 2 and 4 (tests/test_train.py's shapes: shared programs)."""
  cfg = load_preset(TINY)
  train = dataclasses.replace(cfg.train, steps=4, warmup_steps=2, log_every=1, eval_every=0,
                              checkpoint=CheckpointConfig(every_n_steps=2, keep_last_n=5, async_save=False))
  cfg = dataclasses.replace(cfg, train=train, data=dataclasses.replace(cfg.data, seq_len=32, batch_size=8))
  workdir = str(tmp_path_factory.mktemp("two_steps") / "run")
  trainer.train(cfg, workdir, log=lambda *_: None, progress=False)
  return cfg, os.path.join(workdir, "checkpoints")


def test_table_dir_from_another_step_is_refused_and_forced_use_is_recorded(two_steps, tmp_path):
  cfg, ckpt = two_steps
  exported = files.export_tables(cfg, ckpt, str(tmp_path / "t2"), step=2, log=lambda *_: None)
  manifest = files.read_manifest(exported)
  assert manifest["source"]["checkpoint_step"] == 2
  assert manifest["source"]["state_fingerprint"] == ckpt_lib.state_fingerprint(ckpt, 2)
  assert ckpt_lib.state_fingerprint(ckpt, 2) != ckpt_lib.state_fingerprint(ckpt, 4)
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(exported).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
  # Its own step opens; the other step is refused, naming both and the re-export.
  assert host_tables(cfg, ckpt, "disk", table_dir=exported, step=2, log=lambda *_: None).source_check["matches"]
  with pytest.raises(files.TableSourceError) as e:
    host_tables(cfg, ckpt, "disk", table_dir=exported, step=4, log=lambda *_: None)
  text = str(e.value)
  assert "step 2" in text and "step 4" in text and "--export_tables" in text and "--force_tables" in text
  # A deliberate mismatch runs and results.json says so.
  text = tmp_path / "short.txt"
  text.write_text("The os module provides functions.\n\f\nThe sys module holds the path.\n")
  options = evaluation.EvalOptions(eval_files=(str(text),), max_batches=1, knockout=False, niah_lengths=())
  results = evaluation.evaluate_checkpoint(cfg, ckpt, options, step=4, out_dir=str(tmp_path / "eval"),
                                           engram_tables="disk", table_dir=exported, force_tables=True,
                                           log=lambda *_: None)
  with open(tmp_path / "eval" / "results.json") as f:
    saved = json.load(f)
  for record in (results["engram_tables"]["table_dir"], saved["engram_tables"]["table_dir"]):
    assert record["matches"] is False and record["forced"] is True
    assert record["table_dir"] == os.path.abspath(exported) and record["source"]["checkpoint_step"] == 2
  # A directory written before sources carried a fingerprint is checked by its step.
  old = dict(manifest, source={"checkpoint_step": 2})
  assert files.check_source(old, exported, ckpt, 2)["matches"] is None
  with pytest.raises(files.TableSourceError):
    files.check_source(old, exported, ckpt, 4)


# ---------------------------------------------------------------------------------------------
# Item 4: a checkpoint write that fails.


def _state():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return {"params": {"w": jax.device_put(np.arange(64, dtype=np.float32), sharding)}}


def test_disk_full_names_space_intact_step_and_what_to_do(tmp_path, monkeypatch):
  directory = str(tmp_path / "checkpoints")
  manager = ckpt_lib.CheckpointManager(directory, CheckpointConfig(every_n_steps=1, async_save=False))
  try:
    assert manager.save(1, _state(), force=True)
    manager.wait()

    def full(step, *args, **kwargs):  # what orbax raises when tensorstore hits ENOSPC
      raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "params.w/c/0" in OCDBT database at local file '
                       f'"{directory}/{step}.orbax-checkpoint-tmp/state/": Failed to write 256 bytes to file 9: '
                       "No space left on device [os_error_code='28']")

    monkeypatch.setattr(manager._manager, "save", full)
    with pytest.raises(ckpt_lib.CheckpointWriteError) as e:
      manager.save(2, _state(), force=True)
  finally:
    monkeypatch.undo()
    manager.close()
  error = e.value
  assert error.disk_full and error.step == 2 and error.intact == 1
  text = str(error)
  for wanted in (directory, "no space left on device", "MiB there", "MiB is free", "newest intact checkpoint is step 1",
                 "Free space or move the workdir, then rerun the same command"):
    assert wanted in text, text
  assert ckpt_lib.CheckpointManager(directory, CheckpointConfig()).all_steps() == (1,)  # step 1 untouched
  # Reported as one paragraph by the command-line programs.
  import io

  out = io.StringIO()
  cli.report(error, "train.py", stream=out)
  assert len(out.getvalue().strip().splitlines()) <= MAX_LINES


def test_partial_saves_are_removed_and_library_errors_go_to_the_log_file(tmp_path):
  ckpt = tmp_path / "checkpoints"
  (ckpt / "3").mkdir(parents=True)
  (ckpt / "6.orbax-checkpoint-tmp-1234").mkdir()
  assert ckpt_lib.remove_partial_saves(str(ckpt)) == (str(ckpt / "6.orbax-checkpoint-tmp-1234"),)
  assert sorted(os.listdir(ckpt)) == ["3"]
  # A library's error (here: code outside the package, as orbax's threads are) reaches the file only.
  log = tmp_path / "run" / "train.log"
  code = ("import logging, sys; from absl import logging as absl_logging; from engram_jax import cli\n"
          "absl_logging.use_absl_handler()\n"
          f"cli.log_library_errors_to({str(log)!r})\n"
          "try:\n  raise ValueError('No space left on device')\n"
          "except ValueError:\n  logging.getLogger('orbax').error('save failed', exc_info=True)\n"
          "logging.getLogger('orbax').warning('a warning stays visible')\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env())
  assert result.returncode == 0, result.stderr
  assert "save failed" not in result.stderr and "Traceback" not in result.stderr
  assert "a warning stays visible" in result.stderr
  text = log.read_text()
  assert "save failed" in text and "Traceback" in text and "No space left on device" in text


# ---------------------------------------------------------------------------------------------
# Item 7: a second call reads its programs from the persistent compilation cache.


def _programs(stderr):
  match = re.search(r"(\d+) programs: (\d+) compiled, (\d+) read from the compilation cache", stderr)
  assert match, stderr
  return tuple(map(int, match.groups()))


def test_second_generate_call_reads_its_programs_from_the_cache(tmp_path):
  cache = str(tmp_path / "xla")
  args = ("--checkpoint", FIXTURE_CKPT, "--prompt", "The os module", "--max_new_tokens", "4", "--decode_block", "2",
          "--compilation_cache", cache)
  first = _run("generate.py", *args)
  assert first.returncode == 0, first.stderr
  total, compiled, _ = _programs(first.stderr)
  assert compiled > 0 and os.listdir(cache)
  assert re.search(r"decode \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\); prefill \d+ prompt tokens", first.stderr)
  second = _run("generate.py", *args)
  assert second.returncode == 0, second.stderr
  assert _programs(second.stderr) == (total, 0, total)  # every program read back, none compiled
  assert first.stdout == second.stdout  # the same text


# ---------------------------------------------------------------------------------------------
# Item 8: the closing summary after one evaluation.


def test_summary_with_one_evaluation_prints_it_once():
  cfg = load_config_from_checkpoint(FIXTURE_CKPT)
  ev = {"step": 20, "eval_loss": 7.8123}
  summary = {"stopped_by": "completed", "step": 20, "first_eval": ev, "last_eval": ev, "checkpoint_dir": "/x",
             "checkpoint_step": 20, "metrics_jsonl": "m", "tensorboard_dir": "t", "signal": None}
  lines = trainer.summary_lines(summary, cfg, "runs/x")
  assert "Held-out loss: 7.812 (step 20)" in lines
  later = dict(summary, last_eval={"step": 40, "eval_loss": 6.5})
  assert "Held-out loss: 7.812 (step 20) -> 6.500 (step 40)" in trainer.summary_lines(later, cfg, "runs/x")
