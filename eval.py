"""Evaluate a trained Engram model: `python eval.py --config configs/tiny.py --workdir runs/tiny`.

Restores the latest checkpoint of `<workdir>/checkpoints` (or `--checkpoint <dir>`, `--step N`)
onto every device of this machine, whatever mesh it was trained on, then measures: held-out
losses, perplexity and bits per byte of each eval set; the same with Engram knocked out (all layers,
then each alone); gate statistics and the n-grams with the highest gates; a multi-query
needle-in-a-haystack probe; multiple-choice files scored with and without Engram; and, with
`--gate_text`, a Figure-7 style gate visualisation (PNG + HTML). Writes `<workdir>/eval/results.json`
(see the README's "Evaluation (eval.py)" section for every number in it) and prints a table.

Without --config the config saved in the checkpoint is used; `--config.a.b=v` overrides work as in
train.py, on the saved config or on --config's (e.g. `--config.data.batch_size=32`).

Expected failures (a missing file, a step the checkpoint directory does not hold, a damaged
checkpoint) print one paragraph naming the cause, the steps that are there or intact, and the
command to run next, and exit with status 1; any `--verbosity` (`-1` keeps the log level) adds
the traceback.
"""

import os

from absl import flags, logging
from ml_collections import config_flags

from engram_jax.cli import UsageError, checkpoint_dir_of, define_table_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a preset in configs/ (default: the config "
                                          "saved in the checkpoint).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir: reads <workdir>/checkpoints, writes <workdir>/eval.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A checkpoints directory (instead of --workdir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).", lower_bound=0)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results.json goes (default: <workdir>/eval, or "
                                  "eval/ beside the checkpoints directory).")
_EVAL_FILES = flags.DEFINE_list("eval_files", None, "Benchmark sets: text, JSONL or Parquet files, one set each "
                                "(default: the config's eval split, the embedded held-out text).")
_MAX_BATCHES = flags.DEFINE_integer("max_eval_batches", None, "At most this many batches per benchmark set.")
_KNOCKOUT = flags.DEFINE_boolean("knockout", True, "Also evaluate with Engram outputs suppressed.")
_MC_FILES = flags.DEFINE_list("mc_files", [], "Multiple-choice JSONL files ({question, choices, answer} per line).")
_MC_MAX = flags.DEFINE_integer("mc_max_questions", None, "At most this many questions per multiple-choice file.")
_NIAH_LENGTHS = flags.DEFINE_list("niah_lengths", None, "Needle-in-a-haystack row lengths in tokens (default: "
                                  "seq_len/2 and seq_len; empty to skip).")
_NIAH_NEEDLES = flags.DEFINE_integer("niah_needles", 2, "Key-value needles per haystack (each is queried).")
_NIAH_CANDIDATES = flags.DEFINE_integer("niah_candidates", 4, "Candidate values scored per query.")
_NIAH_EXAMPLES = flags.DEFINE_integer("niah_examples", 8, "Haystacks per length.")
_TOP_NGRAMS = flags.DEFINE_integer("top_ngrams", 10, "N-grams with the highest mean gate listed per layer and order.")
_MIN_COUNT = flags.DEFINE_integer("min_ngram_count", 5, "Occurrences an n-gram needs to be listed.")
_GATE_TEXT = flags.DEFINE_string("gate_text", None, "Text to visualise: writes gates.png and gates.html.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the needle-in-a-haystack prompts.")
_PATCHES = flags.DEFINE_list("patches", [], "Knowledge patch directories (patch.py create) applied to the tables "
                             "before evaluating, in order; the checkpoint is not modified.")
_PATCH_POLICY = flags.DEFINE_enum("patch_policy", "sum", ["sum", "last", "refuse"],
                                  "Rows changed by several patches: add their deltas, the last patch wins, or refuse.")
_FORCE_PATCHES = flags.DEFINE_boolean("force_patches", False, "Apply patches whose base rows differ from the model's.")
_TABLES = define_table_flags()
_PREFETCH = flags.DEFINE_boolean("prefetch", True, "Gather and transfer the next batch's rows on a background "
                                 "thread while the current batch runs (host/disk).")
_EXPORT_TABLES = flags.DEFINE_string("export_tables", None, "Write the checkpoint's Engram tables to this new "
                                     "directory (one file per table + manifest.json; --quantize) and exit. Reads "
                                     "the checkpoint chunk by chunk on the host: no accelerator, no whole table "
                                     "in memory.")


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # absl's default under app.run is INFO: orbax's chatter
    logging.set_verbosity(logging.WARNING)   # would bury the run's own lines (--verbosity=0 for it)
  from engram_jax import evaluation
  from engram_jax.config import Config, from_dict
  from engram_jax.runner import check_checkpoint_engram, load_config_from_checkpoint

  checkpoint_dir = checkpoint_dir_of(_WORKDIR.value, _CHECKPOINT.value)
  if _WORKDIR.value:
    out_dir = _OUTPUT_DIR.value or os.path.join(_WORKDIR.value, "eval")
  else:
    out_dir = _OUTPUT_DIR.value or os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)), "eval")
  lengths = None
  if _NIAH_LENGTHS.value is not None:
    try:
      lengths = tuple(int(v) for v in _NIAH_LENGTHS.value)
    except ValueError:
      raise UsageError(f"--niah_lengths={','.join(_NIAH_LENGTHS.value)}: expected comma-separated token counts")
  options = evaluation.EvalOptions(
      eval_files=tuple(_EVAL_FILES.value) if _EVAL_FILES.value else None, max_batches=_MAX_BATCHES.value,
      knockout=_KNOCKOUT.value, top_ngrams=_TOP_NGRAMS.value, min_ngram_count=_MIN_COUNT.value,
      niah_lengths=lengths, niah_needles=_NIAH_NEEDLES.value, niah_candidates=_NIAH_CANDIDATES.value,
      niah_examples=_NIAH_EXAMPLES.value, mc_files=tuple(_MC_FILES.value), mc_max_questions=_MC_MAX.value,
      seed=_SEED.value)
  # Fail on a missing file before the (slow) restore.
  options.check_files()
  tables = dict(_TABLES(), prefetch=_PREFETCH.value)
  if _CONFIG.value is not None:
    cfg = from_dict(Config, _CONFIG.value)
    check_checkpoint_engram(cfg, checkpoint_dir, _STEP.value)
  else:
    cfg = load_config_from_checkpoint(checkpoint_dir, _STEP.value)
  if _EXPORT_TABLES.value:
    from engram_jax.offload import export_tables

    path = export_tables(cfg, checkpoint_dir, _EXPORT_TABLES.value, step=_STEP.value,
                         quantize=_TABLES()["quantize"] or "float32")
    print(f"Engram tables written to {path}")
    return
  import jax

  results = evaluation.evaluate_checkpoint(cfg, checkpoint_dir, options, step=_STEP.value, out_dir=out_dir,
                                           gate_text=_GATE_TEXT.value, patches=tuple(_PATCHES.value),
                                           patch_policy=_PATCH_POLICY.value, force_patches=_FORCE_PATCHES.value,
                                           **tables)
  if jax.process_index() == 0:
    print()
    print(evaluation.format_table(results))
    print()
    print(f"Results: {os.path.join(out_dir, 'results.json')}")


if __name__ == "__main__":
  from engram_jax.cli import run, suggest_step

  run(main, "eval.py", suggest_step)
