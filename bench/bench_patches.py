"""Knowledge patches, measured: does writing only Engram rows teach a trained model new facts, at
what cost to what it knew, and how does it compare with fine-tuning everything?

Setup (all on CPU, tiny preset with larger tables so a patch is a small share of them):
  base model  trained on the embedded corpus mixed with facts A (synthetic people, knowledge.py);
  patch B     rows trained on facts B (disjoint people) from the base, everything else frozen;
  patch B'    the same with the rows ordinary text reads often frozen (--protect freeze);
  patch B''   the same with the facts' own template rows frozen (rows the facts read in many places:
              "was born in", read for every person, rather than a person's name);
  patch C     rows trained on facts C, separately, to apply together with B;
  full FT     every parameter trained on facts B for the same steps (the reference).
Reported per condition: multiple-choice accuracy and greedy exact answer on facts B (new), on
paraphrased questions about B, on facts A (old), held-out loss on the embedded text, B's recall
with Engram knocked out, and the patch's rows, bytes and share of the table.

  python bench/bench_patches.py --out runs/bench_patches [--smoke]

Resumable: the base model's checkpoint in --out is reused. Writes --out/results.json and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engram_jax import data as data_lib  # noqa: E402
from engram_jax import knowledge, memory, patches, trainer  # noqa: E402
from engram_jax.config import MeshConfig, load_preset  # noqa: E402
from engram_jax.evaluation import EvalOptions, run_evaluation  # noqa: E402
from engram_jax.probes import score_multiple_choice  # noqa: E402
from engram_jax.runner import ModelRunner  # noqa: E402
from engram_jax.sharding import make_mesh  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def disjoint_corpora(n: int, seeds):
  """Knowledge corpora with pairwise distinct entity names (a name drawn twice is dropped later)."""
  seen, out = set(), []
  for seed in seeds:
    kc = knowledge.generate_knowledge(n, seed=seed)
    keep = {e.name for e in kc.entities if e.name not in seen}
    seen |= keep
    kc.probes = [p for p in kc.probes if p["entity"] in keep]
    kc.train_documents = [d for d in kc.train_documents if any(d.startswith(k) or f" {k} " in d for k in keep)]
    out.append(kc)
  return out


def recall(runner: ModelRunner, probes, scale=None):
  """(multiple-choice accuracy, greedy exact-answer rate) of knowledge probes."""
  mc = score_multiple_choice(probes, runner.encode, runner.score_fn(scale), runner.bos_id)["accuracy"]
  contexts = [[runner.bos_id] + runner.encode(p["question"]) for p in probes]
  answers = [runner.encode(" " + p["choices"][p["answer"]]) for p in probes]
  _, greedy = runner.score(contexts, answers, scale)
  return float(mc), float(np.mean(greedy))


def heldout_loss(runner: ModelRunner, max_batches: int) -> float:
  options = EvalOptions(max_batches=max_batches, knockout=False, niah_lengths=(), mc_files=())
  return run_evaluation(runner, options)["benchmarks"][0]["loss"]


def measure(runner: ModelRunner, sets, max_batches: int) -> dict:
  off = runner.scale(runner.engram_layers)
  out = {}
  for name, probes in sets.items():
    mc, greedy = recall(runner, probes)
    out[f"{name}_mc"], out[f"{name}_greedy"] = mc, greedy
  out["new_mc_engram_off"] = recall(runner, sets["new"], off)[0]
  out["heldout_loss"] = heldout_loss(runner, max_batches)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_patches"))
  p.add_argument("--smoke", action="store_true", help="a few steps of everything (checks the script runs)")
  p.add_argument("--entities", type=int, default=64, help="people per facts set")
  p.add_argument("--rows_per_head", type=int, default=100003, help="Engram table size per head (tiny: 20011)")
  p.add_argument("--base_steps", type=int, default=1200)
  p.add_argument("--facts_repeat", type=int, default=8, help="facts A files listed this often in the base mix")
  p.add_argument("--patch_steps", type=int, default=300)
  p.add_argument("--patch_lr", type=float, default=3e-2)
  p.add_argument("--ft_lr", type=float, default=1e-3, help="full fine-tuning learning rate (AdamW)")
  p.add_argument("--eval_batches", type=int, default=16)
  p.add_argument("--template_min_count", type=int, default=24,
                 help="patch B'': a row the facts read at least this often is a template row (frozen)")
  p.add_argument("--only", default=None, help="comma-separated conditions to (re)run, e.g. 'B_templates'; "
                 "the others are kept from an earlier results.json")
  args = p.parse_args()
  if args.smoke:
    args.entities, args.base_steps, args.patch_steps, args.eval_batches = 8, 6, 4, 2
  os.makedirs(args.out, exist_ok=True)
  t_start = time.perf_counter()

  # -- data -----------------------------------------------------------------------------------------
  kc_a, kc_b, kc_c = disjoint_corpora(args.entities, (100, 101, 102))
  files = {name: knowledge.write_knowledge(kc, os.path.join(args.out, f"facts_{name}"))
           for name, kc in (("A", kc_a), ("B", kc_b), ("C", kc_c))}
  embedded = data_lib.split_files(load_preset(os.path.join(ROOT, "configs", "tiny.py")).data, "train")

  # -- base model ---------------------------------------------------------------------------------
  tiny = load_preset(os.path.join(ROOT, "configs", "tiny.py"))
  engram = dataclasses.replace(tiny.model.engram, vocab_size_per_ngram=(args.rows_per_head,) * 2)
  cfg = dataclasses.replace(
      tiny, name="patch_base", model=dataclasses.replace(tiny.model, engram=engram),
      data=dataclasses.replace(tiny.data, train_files=tuple(embedded) + (files["A"]["train"],) * args.facts_repeat,
                               eval_files=data_lib.split_files(tiny.data, "eval")),
      train=dataclasses.replace(tiny.train, steps=args.base_steps, warmup_steps=min(20, args.base_steps // 2),
                                eval_every=0, log_every=50,
                                checkpoint=dataclasses.replace(tiny.train.checkpoint, every_n_steps=200)),
      mesh=MeshConfig(data=1))
  base_dir = os.path.join(args.out, "base")
  t0 = time.perf_counter()
  devices = jax.devices()[:1]
  trainer.train(cfg, base_dir, progress=False, devices=devices, log=lambda s: print(s, flush=True))
  base_seconds = time.perf_counter() - t0
  mesh = make_mesh(MeshConfig(), devices)
  runner = ModelRunner.from_checkpoint(cfg, os.path.join(base_dir, "checkpoints"), mesh=mesh)
  sets = {"new": kc_b.probes, "new_paraphrase": knowledge.paraphrase_probes(kc_b.probes), "old": kc_a.probes,
          "other": kc_c.probes}
  results_path = os.path.join(args.out, "results.json")
  results = {"conditions": {}}
  if args.only and os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  only = set(args.only.split(",")) if args.only else None
  wanted = lambda name: only is None or name in only  # noqa: E731
  results.update({"config": {k: v for k, v in vars(args).items()},
                  "table_rows": {n: int(t.shape[0]) for n, t in memory.split(runner.params)[1].items()}})
  results.setdefault("base_train_seconds", base_seconds)
  if wanted("base"):
    results["conditions"]["base"] = measure(runner, sets, args.eval_batches)
    print(json.dumps({"base": results["conditions"]["base"]}), flush=True)

  # -- patches --------------------------------------------------------------------------------------
  kwargs = dict(engram=cfg.model.engram, vocab_size=cfg.model.vocab_size, tokenizer=runner.tokenizer)

  def facts_batches(name):
    data_cfg = dataclasses.replace(cfg.data, train_files=(files[name]["train"],), num_epochs=1, num_workers=0)
    return list(data_lib.make_dataset(data_cfg, "train", **kwargs))

  reference = data_lib.eval_batches(cfg.data, **kwargs)[:16]
  made = {}
  variants = (("B", "B", "none", None), ("B_protect", "B", "freeze", None),
              ("B_templates", "B", "freeze", "facts"), ("C", "C", "none", None))
  needs = {"B": ("B", "B+C"), "B_protect": ("B_protect",), "B_templates": ("B_templates",), "C": ("C", "B+C")}
  for label, facts, protect, ref_source in variants:
    path = os.path.join(args.out, f"patch_{label}")
    if not any(wanted(x) for x in needs[label]):
      continue
    if not wanted(label) and os.path.exists(os.path.join(path, "manifest.json")):
      made[label] = path  # only a stacked condition needs it: an earlier run's patch serves
      continue
    ref, min_count = reference, 2
    if ref_source == "facts":
      ref, min_count = facts_batches(facts), args.template_min_count
    training = patches.RowTraining(steps=args.patch_steps, learning_rate=args.patch_lr, protect=protect,
                                   protect_min_count=min_count)
    tables, stats = patches.train_rows(cfg, runner.params, runner.model_state, facts_batches(facts), training,
                                       reference_batches=ref, log=lambda s: None)
    patch = patches.make_patch(cfg.model, runner.hashing, tables, {"facts": facts, "protect": protect})
    shutil.rmtree(path, ignore_errors=True)
    patches.save_patch(patch, path)
    made[label] = path
    total = sum(results["table_rows"].values())
    results[f"patch_{label}"] = {"rows": patch.num_rows, "share_of_table": patch.num_rows / total,
                                 "bytes_on_disk": sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)),
                                 "train_seconds": stats["train_seconds"], "rows_protected": stats["rows_protected"],
                                 "first_last_loss": [stats["losses"][0], stats["losses"][-1]]}
    print(json.dumps({f"patch_{label}": results[f"patch_{label}"]}), flush=True)

  for label, applied in (("patch_B", ["B"]), ("patch_B_protect", ["B_protect"]),
                         ("patch_B_templates", ["B_templates"]), ("patch_B+C", ["B", "C"])):
    if not wanted(label[len("patch_"):]):
      continue
    runner.apply_patches([made[x] for x in applied], log=lambda s: None)
    results["conditions"][label] = measure(runner, sets, args.eval_batches)
    print(json.dumps({label: results["conditions"][label]}), flush=True)
    runner.revert_patches()

  # -- full fine-tuning reference -----------------------------------------------------------------
  if not wanted("full_finetune"):
    _write(results, results_path)
    return
  ft_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_files=(files["B"]["train"],)),
                               train=dataclasses.replace(cfg.train, steps=args.patch_steps, learning_rate=args.ft_lr,
                                                         warmup_steps=0, schedule="constant",
                                                         checkpoint=dataclasses.replace(cfg.train.checkpoint,
                                                                                        enabled=False)))
  tx, shardings, _ = trainer.state_shardings(ft_cfg, mesh)
  state = trainer.init_state(ft_cfg, mesh, tx, shardings)
  state = state.replace(params=jax.device_put(runner.params, shardings.params),
                        model_state=jax.device_put(runner.model_state, shardings.model_state))
  step = jax.jit(trainer.make_train_step(ft_cfg, tx), donate_argnums=(0,))
  batches = facts_batches("B")
  t0 = time.perf_counter()
  from engram_jax.sharding import place_batch

  for s in range(args.patch_steps):
    state, _ = step(state, place_batch(batches[s % len(batches)], mesh))
  jax.block_until_ready(state)
  ft = ModelRunner(cfg, state.params, state.model_state, mesh, runner.tokenizer)
  results["conditions"]["full_finetune_B"] = measure(ft, sets, args.eval_batches)
  results["full_finetune_seconds"] = time.perf_counter() - t0
  results["total_seconds"] = time.perf_counter() - t_start

  _write(results, results_path)


def _write(results, path):
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  cols = ("new_mc", "new_greedy", "new_paraphrase_mc", "new_mc_engram_off", "old_mc", "other_mc", "heldout_loss")
  print("\n| condition | " + " | ".join(cols) + " |")
  print("|" + "---|" * (len(cols) + 1))
  for name, rec in results["conditions"].items():
    print(f"| {name} | " + " | ".join(f"{rec[c]:.3f}" for c in cols) + " |")
  print(json.dumps({k: v for k, v in results.items() if k.startswith("patch_")}, indent=1))


if __name__ == "__main__":
  main()
