"""Knowledge patches: teach a trained model new facts by training only Engram table rows.

  python patch.py create --workdir runs/tiny --facts facts.txt --out patches/facts1 [--qa pairs.jsonl]
  python patch.py info patches/facts1
  python eval.py --workdir runs/tiny --patches patches/facts1[,patches/facts2]

`create` restores the checkpoint's parameters and trains Engram rows only (backbone, projections,
gates, conv and MoE balancing bias frozen). With `--mechanism triggers` (the default) the patch is
a set of triggers: for each position of the facts, the shortest token suffix that the base model's
traffic never contains, with rows of its own that replace the hashed rows only where that exact
suffix ends, so text without one reads the base model bit for bit (engram_jax/tables/triggers.py).
With `--mechanism rows` it trains the hashed rows the facts read and writes the changed rows with a
manifest (see engram_jax/patches.py). The checkpoint is never modified and an existing --out is never written
over. The base model's traffic (--reference_files, default: the checkpoint's training text) is
hashed to count how often each row is read; `--protect` decides what that protects (the default is
RowTraining's). The patch's collateral damage on held-out text the traffic never includes (mean
KL(base || patched) per token, the held-out loss change), the share of its rows the traffic and the
held-out text read, and with --probes / --old_probes the recall of new and known facts before and
after, are measured, printed and written into its manifest.
"""

import difflib
import hashlib
import os

from absl import flags, logging
from ml_collections import config_flags

from engram_jax.cli import UsageError, checkpoint_dir_of

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a preset in configs/ (default: the config "
                                          "saved in the checkpoint).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir: reads <workdir>/checkpoints.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A checkpoints directory (instead of --workdir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to patch (default: the latest).")
_FACTS = flags.DEFINE_list("facts", None, "create: the facts corpus, text or JSONL files read like any corpus.")
_QA = flags.DEFINE_list("qa", None, "create: question/answer pairs (JSONL, one {\"prompt\", \"answer\"} object per "
                        "line) trained with the loss on the answers only; with or instead of --facts.")
_OUT = flags.DEFINE_string("out", None, "create: the patch directory to write (must not exist).")
_STEPS = flags.DEFINE_integer("steps", None, "create: optimizer steps over the facts (default: RowTraining's).")
_LR = flags.DEFINE_float("learning_rate", None, "create: Adam learning rate of the rows (default: RowTraining's).")
_BATCH = flags.DEFINE_integer("batch_size", None, "create: rows per batch (default: the checkpoint's).")
_SEQ = flags.DEFINE_integer("seq_len", None, "create: tokens per row (default: the checkpoint's).")
_PROTECT = flags.DEFINE_enum("protect", None, ["none", "freeze", "l2", "traffic"],
                             "create: rows the base model's ordinary traffic reads: freeze them (the patch then "
                             "owns only rows that traffic never reads), pull them back to their base values (l2), "
                             "pull each back in proportion to how often the traffic reads it (traffic: "
                             "--protect_weight x reads per traffic token x squared change), or train them like "
                             "any other (none). Default: RowTraining's.")
_PROTECT_MIN = flags.DEFINE_integer("protect_min_count", None, "create: reads in the traffic text that make a row "
                                    "protected.")
_PROTECT_WEIGHT = flags.DEFINE_float("protect_weight", None, "create: weight of the l2 or traffic pull-back.")
_MAX_ANSWERS = flags.DEFINE_integer("max_answers", None, "create, with --qa: freeze the rows that pairs of more than "
                                    "this many distinct answers read (shared phrasing such as \"was born in\", not a "
                                    "fact's own words; 0: off). Default: RowTraining's.")
_KL_WEIGHT = flags.DEFINE_float("kl_weight", None, "create: weight of a KL(base || patched) term on replayed traffic "
                                "text (0: off; with --protect freeze the replayed text reads only frozen rows, so "
                                "the term matters with --protect none or l2).")
_REFERENCE = flags.DEFINE_list("reference_files", None, "create: the base model's ordinary traffic, whose row reads "
                               "choose the protected rows (default: the checkpoint's training text; the held-out "
                               "text is kept for measuring the collateral damage).")
_TRAFFIC_BATCHES = flags.DEFINE_integer("traffic_batches", 512, "create: batches of the traffic text counted "
                                        "(host hashing only, no forward pass).")
_COLLATERAL_BATCHES = flags.DEFINE_integer("collateral_batches", 16, "create: batches of held-out text the "
                                           "collateral damage is measured on.")
_NEW_PROBES = flags.DEFINE_string("probes", None, "create: multiple-choice probes (JSONL, as eval.py --mc_files) "
                                  "of the new facts: recall before and after is measured and recorded.")
_MECHANISM = flags.DEFINE_enum("mechanism", "triggers", ["triggers", "rows"],
                               "create: triggers (rows keyed by exact token suffixes the base traffic never "
                               "contains: no other text reads them) or rows (the hashed rows the facts read, "
                               "shared with every n-gram hashing to them; --protect etc. apply).")
_TRIGGER_MAX = flags.DEFINE_integer("trigger_max_length", None, "create, triggers: the longest trigger tried, in "
                                    "tokens (default: TriggerTraining's).")
_OLD_PROBES = flags.DEFINE_string("old_probes", None, "create: multiple-choice probes of facts the model already "
                                  "knows: recall before and after is measured and recorded.")


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def create():
  import dataclasses

  import jax

  from engram_jax import data as data_lib
  from engram_jax import patches
  from engram_jax.config import Config, MeshConfig, from_dict
  from engram_jax.probes import read_mc_file
  from engram_jax.runner import ModelRunner, check_checkpoint_engram, load_config_from_checkpoint
  from engram_jax.sharding import make_mesh

  checkpoint_dir = checkpoint_dir_of(_WORKDIR.value, _CHECKPOINT.value)
  if not (_FACTS.value or _QA.value) or not _OUT.value:
    raise UsageError("create needs --facts <file[,file...]> and/or --qa <file[,file...]>, and --out <new patch "
                     "directory>, e.g. python patch.py create --workdir runs/tiny --facts facts.txt --out patches/p1")
  for flag in (_FACTS, _QA, _REFERENCE):
    for path in flag.value or []:
      if not os.path.isfile(path):
        raise UsageError(f"--{flag.name}: {path!r} does not exist")
  if os.path.exists(_OUT.value):
    raise UsageError(f"--out {_OUT.value!r} already exists: patches are never written over (choose a new --out)")
  for flag in (_NEW_PROBES, _OLD_PROBES):
    if flag.value and not os.path.isfile(flag.value):
      raise UsageError(f"--{flag.name}: {flag.value!r} does not exist")
  for flag in (_TRAFFIC_BATCHES, _COLLATERAL_BATCHES):
    if flag.value < 1:
      raise UsageError(f"--{flag.name}={flag.value}: expected a positive batch count")
  given = {"steps": _STEPS.value, "learning_rate": _LR.value, "protect": _PROTECT.value,
           "protect_min_count": _PROTECT_MIN.value, "protect_weight": _PROTECT_WEIGHT.value,
           "kl_weight": _KL_WEIGHT.value, "max_answers": _MAX_ANSWERS.value}
  triggers_mode = _MECHANISM.value == "triggers"
  if triggers_mode:
    unused = [k for k in ("protect", "protect_min_count", "protect_weight", "kl_weight", "max_answers")
              if given[k] is not None]
    if unused:
      raise UsageError(f"--{unused[0]} tunes hashed-row patches; --mechanism triggers trains rows no other text "
                       "reads (pass --mechanism rows to use it)")
    tgiven = {"steps": _STEPS.value, "learning_rate": _LR.value, "max_length": _TRIGGER_MAX.value}
    training = patches.TriggerTraining(**{k: v for k, v in tgiven.items() if v is not None})
  else:
    training = patches.RowTraining(**{k: v for k, v in given.items() if v is not None})
  if _CONFIG.value is not None:
    cfg = from_dict(Config, _CONFIG.value)
    check_checkpoint_engram(cfg, checkpoint_dir, _STEP.value)
  else:
    cfg = load_config_from_checkpoint(checkpoint_dir, _STEP.value)
  if cfg.model.engram is None:
    raise UsageError("the checkpoint's model has no Engram layers (model.engram is None): nothing to patch")
  # Patch training is small (the rows one facts corpus reads): one device holds it.
  mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  runner = ModelRunner.from_checkpoint(cfg, checkpoint_dir, step=_STEP.value, mesh=mesh)
  data_cfg = dataclasses.replace(cfg.data, train_files=tuple(_FACTS.value or ()) or None, eval_files=None, num_epochs=1,
                                 remainder="pad", num_workers=0, batch_size=_BATCH.value or cfg.data.batch_size,
                                 seq_len=_SEQ.value or cfg.data.seq_len)
  kwargs = dict(engram=cfg.model.engram, vocab_size=cfg.model.vocab_size, tokenizer=runner.tokenizer)
  batches = list(data_lib.make_dataset(data_cfg, "train", **kwargs)) if _FACTS.value else []
  pairs = [p for path in (_QA.value or []) for p in patches.read_qa_file(path)]
  if pairs:
    batches += patches.answer_batches(pairs, runner.encode, runner.hashing, batch_size=data_cfg.batch_size,
                                      max_len=cfg.model.max_seq_len, bos_id=runner.bos_id, pad_id=runner.pad_id)
  traffic_batches, collateral_batches, traffic_text, measured_on = _reference_text(cfg, kwargs)
  traffic = patches.rows_read(cfg.model, traffic_batches, with_counts=True)
  print(f"facts: {len(batches)} batches ({len(pairs)} question/answer pairs); base traffic: "
        f"{len(traffic_batches)} batches of {traffic_text}")
  trigger_rows = None
  if triggers_mode:
    tokens, choice = patches.choose_triggers(cfg.model, batches, traffic_batches, training.max_length)
    print(f"triggers: {choice['triggers']} for {choice['positions']} trained positions "
          f"({choice['positions_without_trigger']} without one: every suffix up to {training.max_length} tokens "
          f"occurs in the traffic); tokens per trigger {choice['length_histogram']}")
    trigger_rows, stats = patches.train_triggers(cfg, runner.params, runner.model_state, batches, tokens, training)
    tables = {}
    stats["trigger_choice"] = choice
  else:
    tables, stats = patches.train_rows(cfg, runner.params, runner.model_state, batches, training,
                                       reference_batches=traffic_batches[:16] if training.kl_weight > 0 else (),
                                       traffic=traffic)
  meta = {**dataclasses.asdict(training), "mechanism": _MECHANISM.value, "facts": [{"file": os.path.basename(p), "sha256": _sha256(p)}
                                                    for p in (_FACTS.value or []) + (_QA.value or [])],
          "qa_pairs": len(pairs),
          "base_step": runner.step, "batch_size": data_cfg.batch_size, "seq_len": data_cfg.seq_len,
          "traffic": {"text": traffic_text, "batches": len(traffic_batches)}, **stats}
  patch = patches.make_patch(cfg.model, runner.hashing, tables, meta, trigger_rows)
  probes = {name: read_mc_file(path) for name, path in (("new_facts", _NEW_PROBES.value),
                                                         ("old_facts", _OLD_PROBES.value)) if path}
  before = {name: _recall(runner, p) for name, p in probes.items()}
  base_params = runner.params
  runner.apply_patches([patch], log=lambda s: None)
  meta["collateral"] = {**patches.collateral(cfg.model, base_params, runner.params, runner.model_state,
                                              collateral_batches, triggers=runner.source.triggers),
                        "text": measured_on}
  meta["recall"] = {name: {"base": before[name], "patched": _recall(runner, p), "questions": len(p)}
                    for name, p in probes.items()}
  runner.revert_patches()
  if not triggers_mode:
    meta["rows_base_traffic_share"] = patches.traffic_share(cfg.model, tables, read=traffic)
    meta["rows_heldout_share"] = patches.traffic_share(cfg.model, tables, collateral_batches)
  patch = patches.make_patch(cfg.model, runner.hashing, tables, meta, trigger_rows)
  patches.save_patch(patch, _OUT.value)
  print(patches.describe(patches.load_patch(_OUT.value), decode=lambda ids: runner.tokenizer.decode(list(ids))))
  print(f"\nPatch written to {_OUT.value} ({stats['train_seconds']:.1f} s of training).")
  where = f"--workdir {_WORKDIR.value}" if _WORKDIR.value else f"--checkpoint {checkpoint_dir}"
  print(f"Evaluate with it: python eval.py {where} --patches {_OUT.value}")


def _recall(runner, probes):
  from engram_jax.probes import score_multiple_choice

  out = score_multiple_choice(probes, runner.encode, runner.score_fn(), runner.bos_id)
  return {"mc": out["accuracy"], "greedy_exact": out["greedy_exact"]}


def _reference_text(cfg, kwargs):
  """(traffic batches, collateral batches, what the traffic is, what the collateral is measured on).

  The traffic (the rows the base model reads in ordinary use) is --reference_files or else the
  checkpoint's training text, --traffic_batches batches of it; the collateral damage is measured on
  --collateral_batches batches of held-out text, which the traffic never includes. Without training
  text at hand (files moved) or without a held-out split, one text is cut in two."""
  import dataclasses
  import itertools

  from engram_jax import data as data_lib

  n, m = _TRAFFIC_BATCHES.value, _COLLATERAL_BATCHES.value
  try:
    heldout = data_lib.eval_batches(cfg.data, **kwargs)
  except ValueError:  # custom training files and no eval_files: there is no held-out split
    heldout = []
  if _REFERENCE.value:
    files, what = tuple(_REFERENCE.value), "--reference_files"
  else:
    files, what = data_lib.split_files(cfg.data, "train"), "the checkpoint's training text"
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      print(f"note: the checkpoint's training text is not here ({missing[0]!r}): the held-out text is split into "
            "traffic and collateral batches")
      files = ()
  if files:
    traffic_cfg = dataclasses.replace(cfg.data, train_files=files, num_epochs=1, num_workers=0, remainder="pad")
    text = list(itertools.islice(data_lib.make_dataset(traffic_cfg, "train", **kwargs), n + (0 if heldout else m)))
    if heldout:
      return text, heldout[:m], what, "held-out text"
    return text[:n], text[n:] or text[-m:], what, f"{what} batches the traffic count did not read"
  if len(heldout) < 2:
    raise UsageError("patch.py create: no text to learn the base model's traffic from (the training files are "
                         "missing and the held-out split has under 2 batches): pass --reference_files")
  m = min(m, len(heldout) // 2)
  return heldout[m:m + n], heldout[:m], "held-out text (the part not measured)", "held-out text"


_COMMANDS = ("create", "info")
_INFO_TRIGGERS = flags.DEFINE_integer("max_triggers", 50, "info: triggers listed (token ids).")


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) < 2 or argv[1] not in _COMMANDS:
    given = f"unknown command {argv[1]!r}" if len(argv) > 1 else "no command given"
    close = difflib.get_close_matches(argv[1], _COMMANDS, n=1, cutoff=0.5) if len(argv) > 1 else []
    raise UsageError(f"{given}{f' (did you mean {close[0]!r}?)' if close else ''}: expected python patch.py create "
                     "--workdir <run> --facts <file> --out <new dir>, or python patch.py info <patch dir>")
  if argv[1] == "info":
    if len(argv) != 3:
      raise UsageError("patch.py info takes one patch directory: python patch.py info <patch dir>")
    from engram_jax import patches

    print(patches.describe(patches.load_patch(argv[2]), max_triggers=_INFO_TRIGGERS.value))
    return
  if len(argv) > 2:
    raise UsageError(f"unexpected arguments {argv[2:]}: create takes flags only")
  create()


if __name__ == "__main__":
  from engram_jax.cli import run, suggest_step

  run(main, "patch.py", suggest_step)
