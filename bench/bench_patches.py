"""Knowledge patches, measured: does writing only Engram rows teach a trained model new facts, at
what cost to what it knew, and do patches stack?

Setup (all on CPU, tiny preset with larger tables so a patch is a small share of them):
  base model  trained on the embedded corpus mixed with facts A (synthetic people, knowledge.py);
  per seed s  facts B_s and C_s (64 other people each, disjoint from A and from each other);
  patch B     rows trained on facts B from the base, everything else frozen, with the default
              protection of patch.py create (RowTraining's): the base model's traffic (its training
              mix, hashed, no forward pass) is counted, and each trained row is pulled back towards
              its base value in proportion to how often that traffic reads it (--protect etc. and
              --qa, question/answer training, change it);
  patch B/none  the same without protection (the earlier default), seed 0 only unless --all_seeds;
  patch C     the same on facts C, trained apart, applied together with B;
  capacity    one patch of 24, 100 and 300 facts (6, 25, 75 people), seed 0.
Reported per condition: multiple-choice accuracy and greedy exact answer on the new facts, on
paraphrased questions, on facts A (old), held-out loss and KL(base || patched) per token on held-out
text (the traffic never includes it), the new facts' recall with Engram knocked out, and the rows a
patch changes, the rows two stacked patches share.

  python bench/bench_patches.py --out runs/bench_patches [--smoke] [--seeds 3]
  python bench/bench_patches.py --quickstart runs/tiny --out runs/bench_patches_quickstart

--quickstart measures `patch.py create` with its default flags on a model trained by the README's
main job (12 people per patch, two patches per seed, applied alone and together; held-out loss by
eval.py's evaluation over the whole held-out split).

Resumable: the base model's checkpoint and each finished condition in --out/results.json are reused.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
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
from engram_jax.runner import ModelRunner, load_config_from_checkpoint  # noqa: E402
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
  out = score_multiple_choice(probes, runner.encode, runner.score_fn(scale), runner.bos_id)
  return float(out["accuracy"]), float(out["greedy_exact"])


def heldout_loss(runner: ModelRunner, max_batches: int) -> float:
  options = EvalOptions(max_batches=max_batches, knockout=False, niah_lengths=(), mc_files=())
  return run_evaluation(runner, options)["benchmarks"][0]["loss"]


def measure(runner: ModelRunner, sets, heldout, base_params=None) -> dict:
  """Recall of every probe set, the new facts' recall with Engram knocked out, and on the held-out
  batches the loss and (against base_params) the KL(base || patched) per token."""
  out = {}
  for name, probes in sets.items():
    mc, greedy = recall(runner, probes)
    out[f"{name}_mc"], out[f"{name}_greedy"] = mc, greedy
  out["new_mc_engram_off"] = recall(runner, sets["new"], runner.scale(runner.engram_layers))[0]
  c = patches.collateral(runner.cfg.model, base_params if base_params is not None else runner.params, runner.params,
                         runner.model_state, heldout, triggers=runner.source.triggers)
  out["heldout_loss"], out["kl_per_token"] = c["heldout_loss_patched"], c["kl_per_token"]
  out["heldout_triggered_tokens"] = c["triggered_tokens"]
  return out


def mean_se(values):
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_patches"))
  p.add_argument("--smoke", action="store_true", help="a few steps of everything (checks the script runs)")
  p.add_argument("--quickstart", default=None, metavar="WORKDIR",
                 help="measure patch.py create's defaults on this README main-job workdir instead")
  p.add_argument("--variants", default="default=;none=--protect none",
                 help="--quickstart: 'name=patch.py flags;...' (default: the defaults, and no protection); a "
                 "bare --qa trains on the facts' question/answer pairs instead of their documents")
  p.add_argument("--base", default=None, help="the base model's workdir (default: --out/base; trained there if "
                 "absent), to measure other patch settings against one base")
  p.add_argument("--seeds", type=int, default=3, help="facts draws (B_s, C_s) measured")
  p.add_argument("--all_seeds", action="store_true", help="the unprotected patch at every seed, not only 0")
  p.add_argument("--qa", action="store_true", help="train the patches on the facts' question/answer pairs "
                 "(knowledge.qa_pairs; the loss on the answers only) instead of their documents")
  p.add_argument("--skip_none", action="store_true", help="no unprotected patch (a sweep of the protected ones)")
  p.add_argument("--entities", type=int, default=64, help="people per facts set")
  p.add_argument("--capacity", default="24,100,300", help="facts per patch of the capacity rows ('' skips)")
  p.add_argument("--rows_per_head", type=int, default=100003, help="Engram table size per head (tiny: 20011)")
  p.add_argument("--base_steps", type=int, default=1200)
  p.add_argument("--facts_repeat", type=int, default=8, help="facts A files listed this often in the base mix")
  p.add_argument("--patch_steps", type=int, default=300)
  p.add_argument("--patch_lr", type=float, default=3e-2)
  default = patches.RowTraining()
  p.add_argument("--protect", default=default.protect, choices=patches.PROTECT_MODES,
                 help="the protected patches' mode (default: RowTraining's, as patch.py create)")
  p.add_argument("--protect_weight", type=float, default=default.protect_weight)
  p.add_argument("--protect_min_count", type=int, default=default.protect_min_count)
  p.add_argument("--kl_weight", type=float, default=default.kl_weight,
                 help="KL(base || patched) on 16 replayed batches of the traffic (see RowTraining)")
  p.add_argument("--max_answers", type=int, default=default.max_answers, help="with --qa (see RowTraining)")
  p.add_argument("--traffic_batches", type=int, default=512, help="batches of the base's training mix counted")
  p.add_argument("--eval_batches", type=int, default=16)
  p.add_argument("--mechanism", default="triggers", choices=patches.MECHANISMS,
                 help="triggers: rows keyed by exact token suffixes (patch.py create's default); rows: hashed rows")
  p.add_argument("--trigger_max_length", type=int, default=patches.TriggerTraining().max_length)
  p.add_argument("--speed", action="store_true", help="eval and batch-1 decode tokens/s with 10,000 triggers "
                 "applied vs none, on the base model, then stop")
  p.add_argument("--only", default=None, help="comma-separated conditions to (re)run, e.g. 'B_s0'; the others "
                 "are kept from an earlier results.json")
  args = p.parse_args()
  if args.smoke:
    args.entities, args.base_steps, args.patch_steps, args.eval_batches = 8, 6, 4, 2
    args.seeds, args.capacity, args.traffic_batches = 1, "8", 8
  os.makedirs(args.out, exist_ok=True)
  if args.quickstart:
    return quickstart(args)

  # -- data -----------------------------------------------------------------------------------------
  draws = disjoint_corpora(args.entities, [100] + [101 + 2 * s + k for s in range(args.seeds) for k in (0, 1)])
  kc_a = draws[0]
  facts = {"A": kc_a}
  for s in range(args.seeds):
    facts[f"B_s{s}"], facts[f"C_s{s}"] = draws[1 + 2 * s], draws[2 + 2 * s]
  capacity = [int(x) for x in args.capacity.split(",") if x]
  for n in capacity:  # people of 4 facts each, disjoint from A (and drawn apart from B, C)
    facts[f"cap{n}"] = disjoint_corpora(max(1, n // len(knowledge.ATTRIBUTES)), (100, 500 + n))[1]
  files = {name: knowledge.write_knowledge(kc, os.path.join(args.out, f"facts_{name}")) for name, kc in facts.items()}
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
  base_dir = args.base or os.path.join(args.out, "base")
  t0 = time.perf_counter()
  devices = jax.devices()[:1]
  if not (args.base and os.path.isdir(os.path.join(base_dir, "checkpoints"))):  # a given base is only read
    trainer.train(cfg, base_dir, progress=False, devices=devices, log=lambda s: print(s, flush=True))
  base_seconds = time.perf_counter() - t0
  mesh = make_mesh(MeshConfig(), devices)
  runner = ModelRunner.from_checkpoint(cfg, os.path.join(base_dir, "checkpoints"), mesh=mesh)
  base_params = runner.params
  kwargs = dict(engram=cfg.model.engram, vocab_size=cfg.model.vocab_size, tokenizer=runner.tokenizer)
  heldout = data_lib.eval_batches(cfg.data, **kwargs)[:args.eval_batches]
  # The base model's traffic: its own training mix (the embedded text and facts A), as patch.py
  # create counts a checkpoint's training text by default.
  traffic_cfg = dataclasses.replace(cfg.data, num_epochs=1, num_workers=0, remainder="pad")
  traffic_batches = list(itertools.islice(data_lib.make_dataset(traffic_cfg, "train", **kwargs), args.traffic_batches))
  traffic = patches.rows_read(cfg.model, traffic_batches, with_counts=True)

  results_path = os.path.join(args.out, "results.json")
  results = {"conditions": {}, "patches": {}}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
    results.setdefault("patches", {})
  only = set(args.only.split(",")) if args.only else None
  done = lambda name: name in results["conditions"] and (only is None or name not in only)  # noqa: E731
  results.update({"config": dict(vars(args)),
                  "table_rows": {n: int(t.shape[0]) for n, t in memory.split(runner.params)[1].items()},
                  "traffic_tokens": int(sum(int((b["segment_ids"] > 0).sum()) for b in traffic_batches))})
  results.setdefault("base_train_seconds", base_seconds)

  def facts_batches(name):
    data_cfg = dataclasses.replace(cfg.data, train_files=(files[name]["train"],), num_epochs=1, num_workers=0)
    return list(data_lib.make_dataset(data_cfg, "train", **kwargs))

  def train_batches(name):
    if not args.qa:
      return facts_batches(name)
    return patches.answer_batches(knowledge.qa_pairs(facts[name]), runner.encode, runner.hashing,
                                  batch_size=cfg.data.batch_size, max_len=cfg.model.max_seq_len,
                                  bos_id=runner.bos_id, pad_id=runner.pad_id)

  if args.speed:
    return speed(runner, heldout, results, results_path)

  def make(label, name, protect):
    path = os.path.join(args.out, f"patch_{label}")
    if os.path.exists(os.path.join(path, "manifest.json")) and label in results["patches"] and (
        only is None or label not in only):
      return path
    if args.mechanism == "triggers":
      return make_triggers(label, name, path)
    training = patches.RowTraining(steps=args.patch_steps, learning_rate=args.patch_lr, protect=protect,
                                   protect_weight=args.protect_weight, protect_min_count=args.protect_min_count,
                                   max_answers=args.max_answers if protect != "none" else 0,
                                   kl_weight=args.kl_weight if protect != "none" else 0.0)
    tables, stats = patches.train_rows(cfg, base_params, runner.model_state, train_batches(name), training,
                                       traffic=traffic, reference_batches=traffic_batches[:16], log=lambda s: None)
    patch = patches.make_patch(cfg.model, runner.hashing, tables, {"facts": name, "qa": args.qa,
                                                                   **dataclasses.asdict(training)})
    shutil.rmtree(path, ignore_errors=True)
    patches.save_patch(patch, path)
    total = sum(results["table_rows"].values())
    results["patches"][label] = {
        "rows": patch.num_rows, "share_of_table": patch.num_rows / total,
        "bytes_on_disk": sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)),
        "train_seconds": stats["train_seconds"], "rows_read": sum(stats["rows_read"].values()),
        "rows_protected": sum(stats["rows_protected"].values()),
        "rows_template": sum(stats["rows_template"].values()),
        "heldout_share": patches.traffic_share(cfg.model, tables, heldout)["all"],
        "first_last_loss": [stats["losses"][0], stats["losses"][-1]]}
    print(json.dumps({label: results["patches"][label]}), flush=True)
    _write(results, results_path)
    return path

  def make_triggers(label, name, path):
    training = patches.TriggerTraining(steps=args.patch_steps, learning_rate=args.patch_lr,
                                       max_length=args.trigger_max_length)
    batches = train_batches(name)
    tokens, choice = patches.choose_triggers(cfg.model, batches, traffic_batches, training.max_length)
    rows, stats = patches.train_triggers(cfg, base_params, runner.model_state, batches, tokens, training,
                                         log=lambda s: None)
    patch = patches.make_patch(cfg.model, runner.hashing, {}, {"facts": name, "qa": args.qa,
                                                               **dataclasses.asdict(training)}, rows)
    shutil.rmtree(path, ignore_errors=True)
    patches.save_patch(patch, path)
    n_facts = len(facts[name].probes)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    results["patches"][label] = {
        "mechanism": "triggers", "triggers": len(rows), "facts": n_facts, "triggers_per_fact": len(rows) / n_facts,
        "bytes_on_disk": size, "bytes_per_fact": size / n_facts, "choice": choice,
        "train_seconds": stats["train_seconds"], "first_last_loss": [stats["losses"][0], stats["losses"][-1]]}
    print(json.dumps({label: results["patches"][label]}), flush=True)
    _write(results, results_path)
    return path

  def condition(label, applied, sets):
    if done(label):
      return
    report = None
    if applied:
      report = runner.apply_patches(applied, log=lambda s: None)
    rec = measure(runner, sets, heldout, base_params)
    if report is not None and len(applied) > 1:
      rec["rows_shared"] = int(sum(report.overlapping_rows.values()))
      rec["triggers_shared"] = int(report.identical_triggers)
    runner.revert_patches()
    results["conditions"][label] = rec
    print(json.dumps({label: rec}), flush=True)
    _write(results, results_path)

  old = {"old": kc_a.probes}
  first_new = facts["B_s0"] if args.seeds else facts[f"cap{capacity[0]}"]
  condition("base", [], {"new": first_new.probes, **old})
  for s in range(args.seeds):
    b, c = f"B_s{s}", f"C_s{s}"
    sets = {"new": facts[b].probes, "new_paraphrase": knowledge.paraphrase_probes(facts[b].probes), **old,
            "other": facts[c].probes}
    pb, pc = make(b, b, args.protect), make(c, c, args.protect)
    condition(b, [pb], sets)
    condition(f"{c}_alone", [pc], {"new": facts[c].probes, **old})
    condition(f"{b}+{c}", [pb, pc], sets)
    if (s == 0 or args.all_seeds) and not args.skip_none:
      condition(f"{b}_none", [make(f"{b}_none", b, "none")], sets)
      condition(f"{b}_none+{c}_none", [make(f"{b}_none", b, "none"), make(f"{c}_none", c, "none")], sets)
  for n in capacity:
    name = f"cap{n}"
    condition(name, [make(name, name, args.protect)], {"new": facts[name].probes, **old})
  results["total_seconds"] = results.get("total_seconds", 0.0) + time.perf_counter() - t0
  _write(results, results_path)
  print(summary(results))


def speed(runner: ModelRunner, heldout, results, results_path, triggers: int = 10_000, reps: int = 3):
  """Eval (forward over the held-out batches, host matching included) and batch-1 greedy decode
  tokens/s with `triggers` random triggers of 3-8 tokens applied (none of which the text contains,
  so the outputs are the base's) vs none, best of `reps` after a warm-up."""
  from engram_jax import generation
  from engram_jax.tables import triggers as trigger_lib

  cfg = runner.cfg
  e = cfg.model.engram
  rng = np.random.default_rng(0)
  seqs = list({tuple(rng.integers(0, cfg.model.vocab_size, int(rng.integers(e.max_ngram_size, 9))).tolist())
               for _ in range(triggers)})[:triggers]
  table = trigger_lib.pack(seqs)
  names = memory.table_names(e)
  rows = {n: rng.normal(0, 0.1, (len(seqs), e.num_heads, e.head_dim)).astype(np.float32) for n in names}
  patch = patches.make_patch(cfg.model, runner.hashing, {}, {"speed": True},
                             patches.TriggerRows(table, rows, {n: v.copy() for n, v in rows.items()}))
  prompt = [runner.bos_id] + runner.encode("The os module provides a portable way of using")
  gen = generation.Generator(runner, log=lambda s: None)
  out = {}
  for label in ("none", f"{len(seqs)}_triggers"):
    if label != "none":
      runner.apply_patches([patch], log=lambda s: None)
    tokens = sum(int((b["segment_ids"] > 0).sum()) for b in heldout)
    best_eval, best_dec, made = float("inf"), float("inf"), 1
    for r in range(reps + 1):
      t0 = time.perf_counter()
      for _, prepared in runner.prepared(heldout):
        res = runner.forward(prepared)
      jax.block_until_ready(res["nll"])
      t1 = time.perf_counter()
      made = len(gen.generate([prompt], 64, batch_size=1)[0].token_ids)
      t2 = time.perf_counter()
      if r:  # the first pass compiles
        best_eval, best_dec = min(best_eval, t1 - t0), min(best_dec, t2 - t1)
    out[label] = {"eval_tokens_per_s": tokens / best_eval, "decode_tokens_per_s": made / best_dec,
                  "decoded_tokens": made}
    print(json.dumps({label: out[label]}), flush=True)
    runner.revert_patches()
  a, b = out["none"], out[f"{len(seqs)}_triggers"]
  out["slowdown"] = {"eval": a["eval_tokens_per_s"] / b["eval_tokens_per_s"],
                     "decode": a["decode_tokens_per_s"] / b["decode_tokens_per_s"]}
  print(json.dumps({"slowdown": out["slowdown"]}), flush=True)
  results["speed"] = out
  _write(results, results_path)


def summary(results) -> str:
  """Markdown: mean ± standard error over seeds of the default and unprotected patches."""
  conds = results["conditions"]
  seeds = sorted({k.split("_s")[1].split("_")[0].split("+")[0] for k in conds if k.startswith("B_s")})
  cols = ("new_mc", "new_greedy", "new_paraphrase_mc", "new_mc_engram_off", "old_mc", "heldout_loss", "kl_per_token")
  base_loss = conds["base"]["heldout_loss"] if "base" in conds else float("nan")
  lines = ["| condition | seeds | " + " | ".join(cols) + " | held-out loss change |",
           "|" + "---|" * (len(cols) + 3)]
  rows = [("base", ["base"])]
  for pattern in ("B_s{}", "C_s{}_alone", "B_s{}+C_s{}", "B_s{}_none", "B_s{}_none+C_s{}_none"):
    rows.append((pattern.replace("{}", "*"), [pattern.format(s, s) for s in seeds if pattern.format(s, s) in conds]))
  for n in results["config"]["capacity"].split(","):
    if n and f"cap{n}" in conds:
      rows.append((f"capacity {n} facts", [f"cap{n}"]))
  for label, keys in rows:
    if not keys:
      continue
    cells = []
    for c in cols:
      vals = [conds[k][c] for k in keys if c in conds[k]]
      if not vals:
        cells.append("-")
        continue
      m, se = mean_se(vals)
      fmt = ".2e" if c == "kl_per_token" else ".4f"
      cells.append(f"{m:{fmt}}" + (f" ± {se:{fmt}}" if len(vals) > 1 else ""))
    m, se = mean_se([(conds[k]["heldout_loss"] - base_loss) / base_loss * 100 for k in keys])
    cells.append(f"{m:+.3f}%" + (f" ± {se:.3f}" if len(keys) > 1 else ""))
    lines.append(f"| {label} | {len(keys)} | " + " | ".join(cells) + " |")
  for suffix, label in (("", "default"), ("_none", "unprotected")):
    diffs, rows = [], []
    for s in seeds:
      b, c, bc = f"B_s{s}{suffix}", f"C_s{s}_alone" if not suffix else f"C_s{s}_none_alone", \
          f"B_s{s}{suffix}+C_s{s}{suffix}"
      if b in conds and bc in conds:
        diffs.append(conds[bc]["new_mc"] - conds[b]["new_mc"])
        rows.append(conds[bc]["rows_shared"])
      if c in conds and bc in conds:
        diffs.append(conds[bc]["other_mc"] - conds[c]["new_mc"])
    if diffs:
      m, se = mean_se(diffs)
      lines.append(f"\nstacked - alone, each patch's own facts ({label}, {len(diffs)} patches): MC {m:+.4f}"
                   + (f" ± {se:.4f}" if len(diffs) > 1 else "") + f"; rows both patches change: {np.mean(rows):.0f}")
  return "\n".join(lines)


def quickstart(args):
  """`patch.py create` with default flags on the README main job's model: two patches of 12 people
  per seed, recall alone and stacked, held-out loss change over the whole held-out split."""
  import subprocess

  workdir = args.quickstart
  ckpt = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt):
    raise SystemExit(f"--quickstart {workdir!r}: no checkpoints/ (train it first: python train.py --config "
                     f"configs/tiny.py --workdir {workdir})")
  runner = ModelRunner.from_checkpoint(load_config_from_checkpoint(ckpt), ckpt,
                                       mesh=make_mesh(MeshConfig(), jax.devices()[:1]), log=lambda s: None)
  base_params = runner.params
  people = 3 if args.smoke else 12
  results_path = os.path.join(args.out, "results.json")
  results = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  options = EvalOptions(knockout=False, niah_lengths=(), mc_files=(), max_batches=args.eval_batches if args.smoke else None)
  if "base_heldout_loss" not in results:
    results["base_heldout_loss"] = run_evaluation(runner, options)["benchmarks"][0]["loss"]
  draws = disjoint_corpora(people, [300 + 2 * s + k for s in range(args.seeds) for k in (0, 1)])
  extra = ["--steps", str(args.patch_steps)] if args.smoke else []
  variants = {}
  for item in args.variants.split(";"):
    name, _, flag_text = item.partition("=")
    variants[name.strip()] = flag_text.split()
  for s in range(args.seeds):
    for variant, flags_ in variants.items():
      key = f"s{s}_{variant}"
      if key in results:
        continue
      made = []
      for k, kc in enumerate(draws[2 * s:2 * s + 2]):
        f = knowledge.write_knowledge(kc, os.path.join(args.out, f"facts_s{s}_{k}"))
        out = os.path.join(args.out, f"patch_{key}_{k}")
        shutil.rmtree(out, ignore_errors=True)
        # A variant naming --qa trains on the facts' question/answer pairs instead of their documents.
        source = ["--qa", f["qa"]] if "--qa" in flags_ else ["--facts", f["train"]]
        rest = [x for x in flags_ if x != "--qa"]
        subprocess.run([sys.executable, os.path.join(ROOT, "patch.py"), "create", "--workdir", workdir, *source,
                        "--out", out, "--probes", f["probes"], *rest, *extra], check=True)
        made.append((out, kc))
      rec = {}
      for k, (out, kc) in enumerate(made):
        with open(os.path.join(out, "manifest.json")) as fh:
          t = json.load(fh)["training"]
        rec[f"alone_{k}"] = {"mc": t["recall"]["new_facts"]["patched"]["mc"],
                             "greedy": t["recall"]["new_facts"]["patched"]["greedy_exact"],
                             "base_mc": t["recall"]["new_facts"]["base"]["mc"],
                             "kl": t["collateral"]["kl_per_token"], "rows": sum(e["rows"] for e in
                                                                                 _manifest(out)["tables"].values())}
      report = runner.apply_patches([m[0] for m in made], log=lambda s: None)
      for k, (_, kc) in enumerate(made):
        rec[f"stacked_{k}"] = {"mc": recall(runner, kc.probes)[0]}
      rec["stacked_heldout_loss"] = run_evaluation(runner, options)["benchmarks"][0]["loss"]
      rec["stacked_loss_change"] = rec["stacked_heldout_loss"] / results["base_heldout_loss"] - 1
      rec["rows_shared"] = int(sum(report.overlapping_rows.values()))
      runner.revert_patches()
      results[key] = rec
      print(json.dumps({key: rec}), flush=True)
      with open(results_path, "w") as fh:
        json.dump(results, fh, indent=1)
  lines = ["| `patch.py create` | seeds | new facts MC (alone) | greedy exact | collateral KL | "
           "stacked, each: MC | stacked held-out loss change | rows shared |", "|---|---|---|---|---|---|---|---|"]
  for variant in variants:
    recs = [results[f"s{s}_{variant}"] for s in range(args.seeds) if f"s{s}_{variant}" in results]
    if not recs:
      continue
    col = lambda f: "{:.3f} ± {:.3f}".format(*mean_se([f(r, k) for r in recs for k in (0, 1)]))  # noqa: E731
    loss = mean_se([100 * r["stacked_loss_change"] for r in recs])
    lines.append(f"| {variant} | {len(recs)} | {col(lambda r, k: r[f'alone_{k}']['mc'])} | "
                 f"{col(lambda r, k: r[f'alone_{k}']['greedy'])} | "
                 "{:.4f} ± {:.4f}".format(*mean_se([r[f"alone_{k}"]["kl"] for r in recs for k in (0, 1)])) +
                 f" | {col(lambda r, k: r[f'stacked_{k}']['mc'])} | {loss[0]:+.3f}% ± {loss[1]:.3f} | "
                 f"{np.mean([r['rows_shared'] for r in recs]):.0f} |")
  print("\n".join(lines))


def _manifest(path):
  with open(os.path.join(path, "manifest.json")) as f:
    return json.load(f)


def _write(results, path):
  with open(path, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
