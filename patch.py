"""Knowledge patches: teach a trained model new facts by training only Engram table rows.

  python patch.py create --workdir runs/tiny --facts facts.txt --out patches/facts1 [--steps 200]
  python patch.py info patches/facts1
  python eval.py --workdir runs/tiny --patches patches/facts1[,patches/facts2]

`create` restores the checkpoint's parameters, trains only the rows the facts corpus reads (backbone,
projections, gates, conv and MoE balancing bias frozen) and writes the changed rows with a manifest
(see engram_jax/patches.py). The checkpoint is never modified and an existing --out is never written
over. `--protect freeze|l2` keeps rows that ordinary text (--reference_files, default: the embedded
held-out text) reads often from moving, or pulls them back. The patch's collateral damage on the
reference text that did not choose the protected rows or get replayed (the next --reference_batches batches: mean
KL(base || patched) per token, the held-out loss change) and the share of its rows that text reads
are measured, printed and written into its manifest.
"""

import hashlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a preset in configs/ (default: the config "
                                          "saved in the checkpoint).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir: reads <workdir>/checkpoints.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A checkpoints directory (instead of --workdir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to patch (default: the latest).")
_FACTS = flags.DEFINE_list("facts", None, "create: the facts corpus, text or JSONL files read like any corpus.")
_OUT = flags.DEFINE_string("out", None, "create: the patch directory to write (must not exist).")
_STEPS = flags.DEFINE_integer("steps", 200, "create: optimizer steps over the facts.")
_LR = flags.DEFINE_float("learning_rate", 1e-2, "create: Adam learning rate of the rows.")
_BATCH = flags.DEFINE_integer("batch_size", None, "create: rows per batch (default: the checkpoint's).")
_SEQ = flags.DEFINE_integer("seq_len", None, "create: tokens per row (default: the checkpoint's).")
_PROTECT = flags.DEFINE_enum("protect", "none", ["none", "freeze", "l2"],
                             "create: rows ordinary text reads often: train them (none), freeze them, or pull them "
                             "back to their base values (l2).")
_PROTECT_MIN = flags.DEFINE_integer("protect_min_count", 2, "create: reads in the reference text that make a row "
                                    "protected.")
_PROTECT_WEIGHT = flags.DEFINE_float("protect_weight", 1.0, "create: weight of the l2 pull-back.")
_KL_WEIGHT = flags.DEFINE_float("kl_weight", 10.0, "create: weight of a KL(base || patched) term on replayed reference "
                                "text (0: off). The default halved the collateral KL on held-out text of a 12-fact "
                                "patch of the quick-start model without losing recall (README, Knowledge patches).")
_REFERENCE = flags.DEFINE_list("reference_files", None, "create: ordinary text choosing the protected rows "
                               "(default: the model's held-out text).")
_REFERENCE_BATCHES = flags.DEFINE_integer("reference_batches", 16, "create: batches of reference text read (protected rows, "
                                                 "collateral).")


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def create():
  import dataclasses

  import jax

  from engram_jax import data as data_lib
  from engram_jax import patches
  from engram_jax.config import Config, MeshConfig, from_dict
  from engram_jax.runner import ModelRunner, load_config_from_checkpoint
  from engram_jax.sharding import make_mesh

  if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
    raise app.UsageError("pass exactly one of --workdir (reads <workdir>/checkpoints) and --checkpoint <dir>")
  if not _FACTS.value or not _OUT.value:
    raise app.UsageError("create needs --facts <file[,file...]> and --out <new patch directory>")
  for path in _FACTS.value + (_REFERENCE.value or []):
    if not os.path.isfile(path):
      raise app.UsageError(f"--facts/--reference_files: {path!r} does not exist")
  if os.path.exists(_OUT.value):
    raise app.UsageError(f"--out {_OUT.value!r} already exists: patches are never written over")
  training = patches.RowTraining(steps=_STEPS.value, learning_rate=_LR.value, protect=_PROTECT.value,
                                 protect_min_count=_PROTECT_MIN.value, protect_weight=_PROTECT_WEIGHT.value,
                                 kl_weight=_KL_WEIGHT.value)
  checkpoint_dir = _CHECKPOINT.value or os.path.join(_WORKDIR.value, "checkpoints")
  cfg = (from_dict(Config, _CONFIG.value) if _CONFIG.value is not None
         else load_config_from_checkpoint(checkpoint_dir, _STEP.value))
  if cfg.model.engram is None:
    raise app.UsageError("the checkpoint's model has no Engram layers (model.engram is None): nothing to patch")
  # Patch training is small (the rows one facts corpus reads): one device holds it.
  mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  runner = ModelRunner.from_checkpoint(cfg, checkpoint_dir, step=_STEP.value, mesh=mesh)
  data_cfg = dataclasses.replace(cfg.data, train_files=tuple(_FACTS.value), eval_files=None, num_epochs=1,
                                 remainder="pad", num_workers=0, batch_size=_BATCH.value or cfg.data.batch_size,
                                 seq_len=_SEQ.value or cfg.data.seq_len)
  kwargs = dict(engram=cfg.model.engram, vocab_size=cfg.model.vocab_size, tokenizer=runner.tokenizer)
  batches = list(data_lib.make_dataset(data_cfg, "train", **kwargs))
  ref_cfg = dataclasses.replace(cfg.data, eval_files=tuple(_REFERENCE.value) if _REFERENCE.value else cfg.data.eval_files)
  # The reference text's first --reference_batches batches choose the protected rows; the next ones
  # (text the selection did not see) measure the patch's collateral damage.
  text = data_lib.eval_batches(ref_cfg, **kwargs)
  n = _REFERENCE_BATCHES.value
  reference = text[:n]
  unseen = text[n:2 * n]
  measured_on = ("--reference_files" if _REFERENCE.value else "held-out text") + (
      ", batches the row selection did not read" if unseen else ", the batches that chose the protected rows")
  print(f"facts: {len(batches)} batches of {data_cfg.batch_size} x {data_cfg.seq_len} tokens")
  tables, stats = patches.train_rows(cfg, runner.params, runner.model_state, batches, training,
                                     reference_batches=reference)
  meta = {**dataclasses.asdict(training), "facts": [{"file": os.path.basename(p), "sha256": _sha256(p)}
                                                    for p in _FACTS.value],
          "base_step": runner.step, "batch_size": data_cfg.batch_size, "seq_len": data_cfg.seq_len, **stats}
  patch = patches.make_patch(cfg.model, runner.hashing, tables, meta)
  patched, _, _ = patches.apply_patches(runner.params, cfg.model, runner.hashing, [patch])
  meta["collateral"] = {**patches.collateral(cfg.model, runner.params, patched, runner.model_state,
                                              unseen or reference), "text": measured_on}
  meta["rows_base_traffic_share"] = patches.traffic_share(cfg.model, tables, unseen or reference)
  patch = patches.make_patch(cfg.model, runner.hashing, tables, meta)
  patches.save_patch(patch, _OUT.value)
  print(patches.describe(patches.load_patch(_OUT.value)))
  print(f"\nPatch written to {_OUT.value} ({stats['train_seconds']:.1f} s of training).")
  where = f"--workdir {_WORKDIR.value}" if _WORKDIR.value else f"--checkpoint {checkpoint_dir}"
  print(f"Evaluate with it: python eval.py {where} --patches {_OUT.value}")


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) < 2 or argv[1] not in ("create", "info"):
    raise app.UsageError("usage: patch.py create --workdir <run> --facts <file> --out <dir> | patch.py info <dir>")
  if argv[1] == "info":
    if len(argv) != 3:
      raise app.UsageError("usage: patch.py info <patch directory>")
    from engram_jax import patches

    print(patches.describe(patches.load_patch(argv[2])))
    return
  if len(argv) > 2:
    raise app.UsageError(f"unexpected arguments {argv[2:]}")
  create()


if __name__ == "__main__":
  from engram_jax.cli import run_reporting_errors, suggest_step

  app.run(run_reporting_errors(main, "patch.py", suggest_step))
