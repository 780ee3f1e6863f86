"""Does Engram work at small scale? The paper's two headline findings, with the controls its critics
ask for, measured on a CPU at equal total and equal activated parameters.

The study (every model: the tiny backbone, 4 layers of width 64, MLA, mHC; trained the same number
of tokens on the embedded corpus mixed with the synthetic knowledge corpus, knowledge.py):
  iso-parameter  dense twin (no routed experts, the same activated parameters), MoE twin (rho = 1),
                 Engram-MoE at the paper's rho (0.8); the MoE and Engram models also share their total;
  allocation     held-out loss against rho (share of the inactive budget given to routed experts) at
                 RHOS, the rest of the budget in Engram rows (`engram_jax.allocation.allocate`);
  capacity       the rho = 0.8 model with 1 row per head (every n-gram shares one row: only the gate,
                 value projection and conv remain), with a small table, and with the gate forced open;
  knock-out      every Engram model evaluated again with Engram off: retained fraction on factual
                 probes against on ordinary held-out text and on in-context retrieval (NIAH);
  facts          (facts_repeats) the knowledge corpus split into groups of entities whose text is
                 repeated a different number of times in the training files, each group's probes
                 scored apart, so recall can be read against how often a fact was seen.

  python bench/reproduce.py                  # run (or resume) the whole study, then the report
  python bench/reproduce.py --jobs 2         # two runs at a time, one per core
  python bench/reproduce.py --report         # only rebuild the report from the committed results
  python bench/reproduce.py --seeds 5        # add seeds: runs already done are kept
  python bench/reproduce.py --set preset=configs/small.py --set sparse_budget=500000000 \
      --set expert_hidden=512 --set top_k=4 --set num_shared_experts=2 --set mlp_hidden=3072 \
      --set steps=2000 --set batch_size=32 --set seq_len=1024 --results bench/reproduction_small/runs
                                             # the same study at the `small` size (a GPU)
  python bench/reproduce.py --set steps=1200 --seeds 2 --results bench/reproduction_1200/runs \
      --work runs/reproduction_1200 --only rho1.0_s0,rho0.1_s0,rho0.3_s0,rho0.8_s0,rho0.55_s0,rho1.0_s1,rho0.3_s1
                                             # the curve at four times the tokens (~20-26 min a run)
  python bench/reproduce.py --set 'facts_repeats=[1,4,16,64]' --set entities=32 --jobs 2 \
      --results bench/facts_frequency/runs --work runs/facts_frequency \
      --only rho0.8_s0,rho1.0_s0,cap1_s0,rho0.1_s0,dense_s0,rho0.3_s0,...
                                             # facts at four training frequencies, scored per frequency

Resumable at two levels: a finished run's results file (bench/reproduction/runs/<name>.json,
committed) is never recomputed, and a run stopped mid-training resumes from its last checkpoint
(under --work). Each run is a subprocess pinned to one core. The report (REPORT.md, summary.json and
the plots in bench/reproduction/) is rebuilt from whatever results exist, so it can be read while the
study is still running; it says how many seeds each figure rests on.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "bench", "reproduction")
RHOS = (0.1, 0.2, 0.3, 0.4, 0.55, 0.7, 0.8, 0.9, 1.0)
PAPER_RHO = 0.8
FACT_CHANCE = 0.25  # knowledge probes have 4 choices (knowledge.generate_knowledge's default)
NIAH_CHANCE = 0.25  # needle-in-a-haystack queries have 4 candidates (EvalOptions' default)
SMALL_CAPACITY = 64  # rows per head of the small-table control (the rho = 0.8 model has ~1.5k)
# The study's fixed settings (recorded in every result and in the report).
STUDY = dict(
    preset="configs/tiny.py",  # the backbone every model shares (its widths, depth, attention, mHC, Engram layers)
    sparse_budget=1_000_000,  # inactive parameters: routed experts a token skips + Engram rows
    expert_hidden=128, top_k=2, num_shared_experts=1, mlp_hidden=384,
    steps=300, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=20,
    entities=64, facts_repeat=16, facts_repeats=(), knowledge_seed=7, eval_batches=32, niah_lengths=(64, 128), niah_examples=16,
)


# ----------------------------------------------------------------------------------------------
# The runs.


def run_names(seeds: int) -> List[str]:
  """Every run of the study, seed-major (a partly done study has every condition at seed 0 first)."""
  conditions = [f"rho{PAPER_RHO}", "rho1.0", "dense", "cap1", "gate_open"]
  conditions += [f"rho{r}" for r in RHOS if r not in (PAPER_RHO, 1.0)] + [f"cap{SMALL_CAPACITY}"]
  return [f"{c}_s{s}" for s in range(seeds) for c in conditions]


def parse_name(name: str):
  condition, seed = name.rsplit("_s", 1)
  return condition, int(seed)


def model_for(condition: str, study=STUDY):
  """The ModelConfig of a condition (all from one base; see the module docstring)."""
  from engram_jax.allocation import allocate
  from engram_jax.config import load_preset

  tiny = load_preset(os.path.join(ROOT, study["preset"])).model
  moe = dataclasses.replace(tiny.moe, expert_hidden=study["expert_hidden"], top_k=study["top_k"],
                            num_shared_experts=study["num_shared_experts"])
  base = dataclasses.replace(tiny, mlp_hidden=study["mlp_hidden"], moe=moe)
  if condition == "dense":
    # The activated FFN of a MoE layer is (shared + top_k) experts; the dense twin's MLP has that
    # width in every layer (so only the router's d_model x experts weights differ in activated count).
    hidden = (study["num_shared_experts"] + study["top_k"]) * study["expert_hidden"]
    assert hidden == study["mlp_hidden"], "the dense twin's width must equal the base's dense-layer width"
    return dataclasses.replace(base, moe=None, engram=None)
  if condition.startswith("rho"):
    return allocate(base, float(condition[3:]), total_sparse_params=study["sparse_budget"])
  model = allocate(base, PAPER_RHO, total_sparse_params=study["sparse_budget"])
  if condition.startswith("cap"):
    return dataclasses.replace(model, engram=dataclasses.replace(model.engram, rows_per_head=int(condition[3:])))
  if condition == "gate_open":
    return dataclasses.replace(model, engram=dataclasses.replace(model.engram, gate="open"))
  raise ValueError(f"condition {condition!r}: expected dense, rho<r>, cap<rows> or gate_open")


def knowledge_files(work: str, study=STUDY) -> Dict[str, object]:
  """The knowledge corpus's files under `work` (written once, atomically: runs read them concurrently):
  {"eval": held-out biographies, "parts": [{"repeat", "train", "probes"}]}. One part (every entity,
  repeated `facts_repeat` times) unless `facts_repeats` lists several frequencies: then one part of
  `entities` entities per frequency, each repeated that many times, its probes scored apart."""
  from engram_jax import knowledge

  repeats = tuple(study.get("facts_repeats") or ())
  if any(int(r) < 1 for r in repeats):
    raise ValueError(f"facts_repeats={list(repeats)}: expected positive repeat counts")
  parts = len(repeats) or 1
  out = os.path.join(work, f"knowledge_{study['entities']}" + (f"x{parts}" if repeats else "") + f"_{study['knowledge_seed']}")
  subdirs = [f"part{j}" for j in range(parts)] if repeats else [""]
  if not os.path.isdir(out):
    corpus = knowledge.generate_knowledge(study["entities"] * parts, seed=study["knowledge_seed"])
    tmp = f"{out}.tmp{os.getpid()}"
    if repeats:
      for sub, part in zip(subdirs, knowledge.split_entities(corpus, parts)):
        knowledge.write_knowledge(part, os.path.join(tmp, sub))
      knowledge.write_knowledge(corpus, tmp)  # the whole corpus's held-out text beside the parts
    else:
      knowledge.write_knowledge(corpus, tmp)
    try:
      os.rename(tmp, out)
    except OSError:  # another process got there first with the same (deterministic) files
      import shutil

      shutil.rmtree(tmp, ignore_errors=True)
  return {"eval": os.path.join(out, "heldout.txt"),
          "parts": [{"repeat": int(r), "train": os.path.join(out, sub, "train.txt"),
                     "probes": os.path.join(out, sub, "probes.jsonl")}
                    for r, sub in zip(repeats or (study["facts_repeat"],), subdirs)]}


def config_for(name: str, work: str, study=STUDY):
  from engram_jax import data as data_lib
  from engram_jax.config import CheckpointConfig, MeshConfig, load_preset

  condition, seed = parse_name(name)
  tiny = load_preset(os.path.join(ROOT, study["preset"]))
  facts = knowledge_files(work, study)
  data = dataclasses.replace(
      tiny.data, seq_len=study["seq_len"], batch_size=study["batch_size"], seed=seed,
      train_files=tuple(data_lib.split_files(tiny.data, "train")) + sum(((p["train"],) * p["repeat"]
                                                                          for p in facts["parts"]), ()),
      eval_files=data_lib.split_files(tiny.data, "eval"))
  train = dataclasses.replace(
      tiny.train, steps=study["steps"], learning_rate=study["learning_rate"], warmup_steps=study["warmup_steps"],
      seed=seed, eval_every=0, log_every=50, checkpoint=CheckpointConfig(every_n_steps=100, keep_last_n=1))
  return dataclasses.replace(tiny, name=name, model=model_for(condition, study), data=data, train=train,
                             mesh=MeshConfig(data=1)), facts


def pooled_choice(records: List[dict]) -> dict:
  """Multiple-choice results of several probe files as one (accuracies weighted by questions)."""
  n = sum(r["questions"] for r in records)
  pool = lambda k: None if any(r[k] is None for r in records) else sum(r[k] * r["questions"] for r in records) / n
  return {"accuracy": pool("accuracy"), "no_engram_accuracy": pool("no_engram_accuracy"), "questions": n}


def run_one(name: str, work: str, results_dir: str, study=STUDY) -> dict:
  """Train (or resume) one run, evaluate it with and without Engram, write its results file."""
  import jax

  from engram_jax import trainer
  from engram_jax.allocation import sparse_params
  from engram_jax.evaluation import EvalOptions, run_evaluation
  from engram_jax.model import param_counts
  from engram_jax.runner import ModelRunner
  from engram_jax.sharding import make_mesh
  from engram_jax.config import MeshConfig

  cfg, facts = config_for(name, work, study)
  workdir = os.path.join(work, name)
  devices = jax.devices()[:1]
  t0 = time.perf_counter()
  summary = trainer.train(cfg, workdir, progress=False, devices=devices, log=lambda s: print(s, flush=True))
  train_seconds = time.perf_counter() - t0
  runner = ModelRunner.from_checkpoint(cfg, summary["checkpoint_dir"], mesh=make_mesh(MeshConfig(), devices),
                                       log=lambda s: None)
  options = EvalOptions(max_batches=study["eval_batches"], knockout=True, niah_lengths=tuple(study["niah_lengths"]),
                        niah_examples=study["niah_examples"], mc_files=tuple(p["probes"] for p in facts["parts"]),
                        top_ngrams=1)
  t1 = time.perf_counter()
  ev = run_evaluation(runner, options, step=runner.step)
  heldout = ev["benchmarks"][0]
  mc = pooled_choice(ev["multiple_choice"])
  knocked = heldout["knockout"][0] if heldout["knockout"] else None
  condition, seed = parse_name(name)
  sparse = sparse_params(cfg.model)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
  record = {
      "name": name, "condition": condition, "seed": seed, "study": study, "step": runner.step,
      "tokens": cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len,
      "params": {k: int(v) for k, v in param_counts(cfg.model).items()},
      "sparse": {"moe": int(sparse["moe"]), "engram": int(sparse["engram"]), "rho": sparse["rho"]},
      "experts": cfg.model.moe.num_experts if cfg.model.moe else 0,
      "rows_per_head": (None if cfg.model.engram is None else
                        cfg.model.engram.rows_per_head or cfg.model.engram.vocab_size_per_ngram[0]),
      "train_loss_last_logged": losses[-1] if losses else None,  # the loss of the last logged step
      "heldout": {"loss": heldout["loss"], "bits_per_byte": heldout["bits_per_byte"]},
      "facts_mc": {"accuracy": mc["accuracy"], "chance": FACT_CHANCE, "questions": mc["questions"]},
      "niah": [{k: r.get(k) for k in ("length", "accuracy", "no_engram_accuracy")} for r in (ev["niah"] or {}).get("lengths", [])],
      "facts_by_repeat": None if len(facts["parts"]) < 2 else [
          {"repeat": p["repeat"], "accuracy": m["accuracy"], "no_engram_accuracy": m["no_engram_accuracy"],
           "questions": m["questions"]} for p, m in zip(facts["parts"], ev["multiple_choice"])],
      "knockout": None if knocked is None else {
          "heldout_loss": knocked["loss"], "heldout_bits_per_byte": knocked["bits_per_byte"],
          "facts_mc_accuracy": mc["no_engram_accuracy"]},
      "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t1,
  }
  os.makedirs(results_dir, exist_ok=True)
  tmp = os.path.join(results_dir, f".{name}.json.tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, os.path.join(results_dir, f"{name}.json"))
  return record


# ----------------------------------------------------------------------------------------------
# Running the study: one subprocess per run, each pinned to one core.


def run_study(names: List[str], work: str, results_dir: str, jobs: int, extra: List[str]):
  pending = [n for n in names if not os.path.exists(os.path.join(results_dir, f"{n}.json"))]
  print(f"{len(names) - len(pending)} of {len(names)} runs done; {len(pending)} to run, {jobs} at a time", flush=True)
  cores = sorted(os.sched_getaffinity(0))
  free = list(cores[-jobs:]) if jobs <= len(cores) else cores
  running = {}  # pid -> (name, core, Popen, start)
  failed = []
  while pending or running:
    while pending and free and len(running) < jobs:
      name, core = pending.pop(0), free.pop(0)
      os.makedirs(os.path.join(work, "logs"), exist_ok=True)
      log = open(os.path.join(work, "logs", f"{name}.log"), "a")
      env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
      cmd = [sys.executable, os.path.abspath(__file__), "--run_one", name, "--work", work, "--results", results_dir] + extra
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              preexec_fn=lambda c=core: os.sched_setaffinity(0, {c}))
      running[proc.pid] = (name, core, proc, time.time(), log)
      print(f"[{time.strftime('%H:%M:%S')}] start {name} on core {core}", flush=True)
    pid, status = os.wait()
    if pid not in running:
      continue
    name, core, proc, start, log = running.pop(pid)
    log.close()
    free.append(core)
    code = os.waitstatus_to_exitcode(status)
    took = time.time() - start
    if code == 0:
      print(f"[{time.strftime('%H:%M:%S')}] done  {name} in {took:.0f} s", flush=True)
    else:
      failed.append(name)
      print(f"[{time.strftime('%H:%M:%S')}] FAILED {name} (exit {code}); log: {os.path.join(work, 'logs', name + '.log')}",
            flush=True)
    write_report(results_dir)
  if failed:
    raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)} (their logs are under {work}/logs)")


# ----------------------------------------------------------------------------------------------
# The report.


def load_results(results_dir: str) -> List[dict]:
  runs_dir = results_dir
  out = []
  for f in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
    if f.endswith(".json") and not f.startswith("."):
      with open(os.path.join(runs_dir, f)) as fh:
        out.append(json.load(fh))
  return out


def stats(values: List[float]) -> dict:
  n = len(values)
  mean = sum(values) / n if n else float("nan")
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
  return {"mean": mean, "std": std, "n": n, "sem": std / math.sqrt(n) if n > 1 else float("nan")}


def paired(results, a: str, b: str, key) -> dict:
  """Per-seed differences key(a) - key(b) over the seeds both conditions have."""
  by = {(r["condition"], r["seed"]): r for r in results}
  seeds = sorted(s for (c, s) in by if c == a and (b, s) in by)
  return {**stats([key(by[(a, s)]) - key(by[(b, s)]) for s in seeds]), "seeds": seeds}


def quadratic_fit(xs: List[float], ys: List[float]):
  """Least-squares y = c0 + c1 x + c2 x^2; returns (coefficients, standard errors, argmin x) or None."""
  import numpy as np

  if len(set(xs)) < 3 or len(xs) < 4:
    return None
  X = np.stack([np.ones(len(xs)), np.asarray(xs), np.asarray(xs) ** 2], axis=1)
  y = np.asarray(ys)
  coef, *_ = np.linalg.lstsq(X, y, rcond=None)
  resid = y - X @ coef
  dof = max(1, len(xs) - 3)
  cov = (resid @ resid / dof) * np.linalg.inv(X.T @ X)
  argmin = -coef[1] / (2 * coef[2]) if coef[2] > 0 else None
  return coef.tolist(), np.sqrt(np.diag(cov)).tolist(), argmin


def locate_minimum(results: List[dict], samples: int = 2000) -> Optional[dict]:
  """Where the allocation curve's minimum is, and whether it is a U.

  best: the rho condition with the lowest mean held-out loss; neighbours: the paired differences
  (same seed) of the next rho below and above it minus the best; bootstrap: runs resampled with
  replacement within each condition (seeded), giving how often each rho is the lowest mean and the
  quadratic fit's argmin (median and 16-84% range, over the samples whose fit has a minimum). The U
  rule: a U is claimed only where some rho below the best is worse than it by more than twice the
  paired difference's standard error."""
  import numpy as np

  curve: Dict[str, List[dict]] = {}
  for r in results:
    if r["condition"].startswith("rho"):
      curve.setdefault(r["condition"], []).append(r)
  if len(curve) < 3:
    return None
  order = sorted(curve, key=lambda c: curve[c][0]["sparse"]["rho"])
  means = {c: float(np.mean([r["heldout"]["loss"] for r in curve[c]])) for c in order}
  best = min(order, key=means.get)
  i = order.index(best)
  neighbours = {}
  for j in (i - 1, i + 1):
    if 0 <= j < len(order):
      neighbours[f"{order[j]} - {best}"] = paired(results, order[j], best, lambda r: r["heldout"]["loss"])
  worse_below = {}
  for c in order[:i]:
    d = paired(results, c, best, lambda r: r["heldout"]["loss"])
    worse_below[c] = bool(d["n"] > 1 and d["mean"] > 2 * d["sem"])
  rng = np.random.default_rng(0)
  wins = collections.Counter()
  argmins = []
  for _ in range(samples):
    xs, ys, sample_means = [], [], {}
    for c in order:
      losses = [r["heldout"]["loss"] for r in curve[c]]
      pick = rng.choice(losses, size=len(losses), replace=True)
      sample_means[c] = float(np.mean(pick))
      xs += [curve[c][0]["sparse"]["rho"]] * len(pick)
      ys += pick.tolist()
    wins[min(order, key=sample_means.get)] += 1
    fit = quadratic_fit(xs, ys)
    if fit is not None and fit[2] is not None:
      argmins.append(fit[2])
  q = (lambda a, p: float(np.percentile(a, p))) if argmins else (lambda a, p: None)
  return {"best": best, "best_rho": curve[best][0]["sparse"]["rho"], "at_edge": i == 0,
          "neighbours": neighbours, "below_best_worse_by_2se": worse_below, "u_shape": any(worse_below.values()),
          "bootstrap": {"samples": samples, "lowest_mean_share": {c: wins[c] / samples for c in order if wins[c]},
                        "fit_argmin_median": q(argmins, 50), "fit_argmin_16_84": [q(argmins, 16), q(argmins, 84)],
                        "fit_has_minimum_share": len(argmins) / samples}}


def _fmt(s: dict, digits=4) -> str:
  if not s["n"]:
    return "-"
  if s["n"] == 1:
    return f"{s['mean']:.{digits}f} (n=1)"
  return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} (n={s['n']})"


LABELS = {"dense": "dense twin", "rho1.0": "MoE twin (rho=1)", f"rho{PAPER_RHO}": f"Engram-MoE (rho={PAPER_RHO})",
          "cap1": "Engram, 1 row per head", f"cap{SMALL_CAPACITY}": f"Engram, {SMALL_CAPACITY} rows per head",
          "gate_open": "Engram, gate forced open"}


def summarize(results: List[dict]) -> dict:
  if not results:
    return {"study": STUDY, "conditions": {}, "paired_differences": {}, "allocation_fit": None, "runs": 0}
  conditions: Dict[str, List[dict]] = {}
  for r in results:
    conditions.setdefault(r["condition"], []).append(r)
  table = {}
  for c, rs in conditions.items():
    rec = {"label": LABELS.get(c, c.replace("rho", "Engram-MoE rho=") if c.startswith("rho") else c),
           "seeds": sorted(r["seed"] for r in rs),
           "params_total": rs[0]["params"]["total"], "params_activated": rs[0]["params"]["activated"],
           "experts": rs[0]["experts"], "rows_per_head": rs[0]["rows_per_head"], "rho": rs[0]["sparse"]["rho"],
           "engram_params": rs[0]["sparse"]["engram"], "tokens": rs[0]["tokens"],
           "heldout_loss": stats([r["heldout"]["loss"] for r in rs]),
           "bits_per_byte": stats([r["heldout"]["bits_per_byte"] for r in rs]),
           "facts_mc": stats([r["facts_mc"]["accuracy"] for r in rs]),
           "train_seconds": stats([r["train_seconds"] for r in rs])}
    ko = [r for r in rs if r["knockout"]]
    if ko:
      rec["knockout"] = {
          "facts_retained": stats([r["knockout"]["facts_mc_accuracy"] / r["facts_mc"]["accuracy"] for r in ko]),
          "facts_retained_above_chance": stats([
              (r["knockout"]["facts_mc_accuracy"] - FACT_CHANCE) / (r["facts_mc"]["accuracy"] - FACT_CHANCE)
              for r in ko if r["facts_mc"]["accuracy"] > FACT_CHANCE]),
          "heldout_retained": stats([r["heldout"]["loss"] / r["knockout"]["heldout_loss"] for r in ko]),
          "heldout_loss_off": stats([r["knockout"]["heldout_loss"] for r in ko]),
          "niah_retained": stats([n["no_engram_accuracy"] / n["accuracy"] for r in ko for n in r["niah"]
                                  if n["accuracy"] and n["no_engram_accuracy"] is not None]),
          "niah_accuracy": stats([n["accuracy"] for r in ko for n in r["niah"]]),
      }
    table[c] = rec
  engram = f"rho{PAPER_RHO}"
  comparisons = {}
  pairs = [(engram, other) for other in ("rho1.0", "dense", "cap1", f"cap{SMALL_CAPACITY}", "gate_open")]
  pairs += [("cap1", "rho1.0"), ("dense", "rho1.0")]  # the extra path alone; dense vs MoE
  pairs += [(f"rho{r}", "rho1.0") for r in RHOS if r not in (PAPER_RHO, 1.0)]  # every point of the curve vs pure MoE
  for a, b in pairs:
    if a in conditions and b in conditions:
      comparisons[f"{a} - {b}"] = {
          "heldout_loss": paired(results, a, b, lambda r: r["heldout"]["loss"]),
          "facts_mc": paired(results, a, b, lambda r: r["facts_mc"]["accuracy"])}
  curve = [(r["sparse"]["rho"], r["heldout"]["loss"]) for r in results if r["condition"].startswith("rho")]
  by_repeat = facts_by_repeat(results)
  fit = quadratic_fit([x for x, _ in curve], [y for _, y in curve])
  return {"study": results[0]["study"], "conditions": table, "paired_differences": comparisons,
          "allocation_fit": None if fit is None else {"coefficients": fit[0], "std_errors": fit[1], "argmin_rho": fit[2]},
          "allocation_minimum": locate_minimum(results), "facts_by_repeat": by_repeat, "runs": len(results)}


FREQUENCY_PAIRS = ((f"rho{PAPER_RHO}", "rho1.0"), (f"rho{PAPER_RHO}", "cap1"), (f"rho{PAPER_RHO}", "dense"),
                   ("rho0.1", "rho1.0"), ("rho0.3", "rho1.0"))


def facts_by_repeat(results: List[dict]) -> Optional[dict]:
  """Per condition and training frequency (times the facts' text is repeated in the training files):
  multiple-choice accuracy with Engram on and off; and paired differences (same seed, same facts) of
  FREQUENCY_PAIRS per frequency. None when no run has frequency-stratified facts."""
  rs = [r for r in results if r.get("facts_by_repeat")]
  if not rs:
    return None
  repeats = sorted({p["repeat"] for r in rs for p in r["facts_by_repeat"]})
  acc = lambda r, k, key="accuracy": next((p[key] for p in r["facts_by_repeat"] if p["repeat"] == k), None)
  conditions = {}
  for c in sorted({r["condition"] for r in rs}):
    runs = [r for r in rs if r["condition"] == c]
    conditions[c] = {str(k): {"on": stats([acc(r, k) for r in runs]),
                              "off": stats([acc(r, k, "no_engram_accuracy") for r in runs
                                            if acc(r, k, "no_engram_accuracy") is not None])} for k in repeats}
  present = {r["condition"] for r in rs}
  pairs = {f"{a} - {b}": {str(k): paired(rs, a, b, lambda r, k=k: acc(r, k)) for k in repeats}
           for a, b in FREQUENCY_PAIRS if a in present and b in present}
  return {"repeats": repeats, "questions": {str(p["repeat"]): p["questions"] for p in rs[0]["facts_by_repeat"]},
          "conditions": conditions, "paired": pairs}


def plot(summary: dict, results: List[dict], results_dir: str):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = sorted((c for c in summary["conditions"] if c.startswith("rho")), key=lambda c: float(c[3:]))
  if rows:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = [summary["conditions"][c]["rho"] for c in rows]
    means = [summary["conditions"][c]["heldout_loss"]["mean"] for c in rows]
    errs = [summary["conditions"][c]["heldout_loss"]["std"] if summary["conditions"][c]["heldout_loss"]["n"] > 1
            else 0.0 for c in rows]
    for r in results:
      if r["condition"].startswith("rho"):
        ax.plot(r["sparse"]["rho"], r["heldout"]["loss"], ".", color="0.6", zorder=1)
    ax.errorbar(xs, means, yerr=errs, fmt="o-", capsize=4, zorder=2, label="mean ± std over seeds")
    if "dense" in summary["conditions"]:
      d = summary["conditions"]["dense"]["heldout_loss"]
      ax.axhline(d["mean"], color="C3", ls="--", label="dense twin (same activated)")
    ax.set_xlabel("rho (share of the inactive budget in routed experts; 1 = pure MoE)")
    ax.set_ylabel("held-out loss (nats/token)")
    n = min(summary["conditions"][c]["heldout_loss"]["n"] for c in rows)
    ax.set_title(f"Sparsity allocation, {summary['study']['steps'] * summary['study']['batch_size'] * summary['study']['seq_len'] / 1e6:.2f}M tokens, >= {n} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, "allocation_curve.png"), dpi=120)
    plt.close(fig)
  engram = summary["conditions"].get(f"rho{PAPER_RHO}")
  if engram and "knockout" in engram:
    ko = engram["knockout"]
    kinds = [("factual probes\n(MC accuracy)", ko["facts_retained"]),
             ("factual probes\n(above chance)", ko["facts_retained_above_chance"]),
             ("in-context retrieval\n(NIAH accuracy" + (", at chance)" if ko["niah_accuracy"]["mean"] < NIAH_CHANCE + 0.05
                                                          else ")"), ko["niah_retained"]),
             ("held-out text\n(loss ratio)", ko["heldout_retained"])]
    kinds = [(k, s) for k, s in kinds if s["n"]]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.bar(range(len(kinds)), [s["mean"] for _, s in kinds],
           yerr=[s["std"] if s["n"] > 1 else 0 for _, s in kinds], capsize=4, color=["C1", "C1", "C0", "C0"][:len(kinds)])
    ax.set_xticks(range(len(kinds)), [k for k, _ in kinds], fontsize=8)
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_ylabel("retained with Engram off")
    ax.set_title(f"Knock-out of the rho={PAPER_RHO} Engram model (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, "knockout_retained.png"), dpi=120)
    plt.close(fig)


def plot_frequency(by_repeat: dict, out_path: str):
  """Facts multiple-choice accuracy against how often their text was repeated in training, one line
  per condition (mean ± standard error over seeds), with chance."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 3.8))
  ks = by_repeat["repeats"]
  for i, (c, rec) in enumerate(sorted(by_repeat["conditions"].items())):
    st = [rec[str(k)]["on"] for k in ks]
    ax.errorbar([k * (1 + 0.03 * (i - 2)) for k in ks], [t["mean"] for t in st],
                yerr=[t["sem"] if t["n"] > 1 else 0.0 for t in st], fmt="o-", capsize=3, label=LABELS.get(c, c))
  ax.axhline(FACT_CHANCE, color="0.5", ls=":", label="chance")
  ax.set_xscale("log")
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.set_xlabel("times the facts' text is repeated in the training files")
  ax.set_ylabel("facts multiple-choice accuracy")
  ax.set_title("Recall by training frequency (mean ± s.e. over seeds)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)


def plot_lengths(study_dirs: List[str], out_path: str):
  """The allocation curve of several studies (e.g. 300 and 1200 steps) on one plot: mean ± standard
  error over seeds per rho, each study labelled with its training tokens."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 3.8))
  drawn = 0
  for d in study_dirs:
    results = [r for r in load_results(os.path.join(d, "runs")) if r["condition"].startswith("rho")]
    if not results or results[0]["study"].get("facts_repeats"):  # a facts study, not a training length
      continue
    by = collections.defaultdict(list)
    for r in results:
      by[r["sparse"]["rho"]].append(r["heldout"]["loss"])
    xs = sorted(by)
    st = [stats(by[x]) for x in xs]
    study = results[0]["study"]
    tokens = study["steps"] * study["batch_size"] * study["seq_len"] / 1e6
    ax.errorbar(xs, [t["mean"] for t in st], yerr=[t["sem"] if t["n"] > 1 else 0.0 for t in st], fmt="o-", capsize=4,
                label=f"{study['steps']} steps ({tokens:.2f}M tokens), seeds {min(t['n'] for t in st)}-{max(t['n'] for t in st)}")
    drawn += 1
  if drawn:
    ax.set_xlabel("rho (share of the inactive budget in routed experts; 1 = pure MoE)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Allocation curve at each training length (mean ± s.e.)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
  plt.close(fig)


def write_report(results_dir: str) -> dict:
  results = load_results(os.path.join(results_dir))
  if not results:
    print("no results yet")
    return {}
  summary = summarize(results)
  out_dir = os.path.dirname(results_dir.rstrip("/"))
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot(summary, results, out_dir)
  lines = ["# Reproduction study: results", "",
           "Generated by `python bench/reproduce.py --report` from the per-run files in `runs/`; the reading is in "
           "the README's Reproduction section. Mean ± standard deviation over seeds (n = seeds).", "",
           f"Every model: {summary['study']['steps']} steps x {summary['study']['batch_size']} x "
           f"{summary['study']['seq_len']} tokens, inactive budget {summary['study']['sparse_budget']:,} parameters.", "",
           "| condition | experts | rows/head | rho | total params | activated | held-out loss | bits/byte | facts MC |",
           "|---|---:|---:|---:|---:|---:|---|---|---|"]
  order = ["dense", "rho1.0", f"rho{PAPER_RHO}"] + [f"rho{r}" for r in sorted(RHOS, reverse=True)
                                                   if r not in (1.0, PAPER_RHO)] + ["cap1", f"cap{SMALL_CAPACITY}", "gate_open"]
  for c in [c for c in order if c in summary["conditions"]]:
    s = summary["conditions"][c]
    lines.append(f"| {s['label']} | {s['experts']} | {s['rows_per_head'] or '-'} | {s['rho']:.3f} | "
                 f"{s['params_total']:,} | {s['params_activated']:,} | {_fmt(s['heldout_loss'])} | "
                 f"{_fmt(s['bits_per_byte'])} | {_fmt(s['facts_mc'], 3)} |")
  lines += ["", "Paired differences (same seed: same initialisation key and data order), "
            "mean ± standard error over seeds:", "", "| difference | held-out loss | facts MC |", "|---|---|---|"]
  for k, d in summary["paired_differences"].items():
    h, m = d["heldout_loss"], d["facts_mc"]
    lines.append(f"| {k} | {h['mean']:+.4f} ± {h['sem']:.4f} (n={h['n']}) | {m['mean']:+.3f} ± {m['sem']:.3f} (n={m['n']}) |")
  fit = summary["allocation_fit"]
  if fit:
    c, e = fit["coefficients"], fit["std_errors"]
    lines += ["", f"Quadratic fit of held-out loss against rho over every seed: curvature {c[2]:+.4f} ± {e[2]:.4f}"
              + (f", minimum at rho = {fit['argmin_rho']:.2f}" if fit["argmin_rho"] is not None else " (no minimum)")]
  m = summary.get("allocation_minimum")
  if m:
    b = m["bootstrap"]
    lines += ["", f"Lowest mean held-out loss: {m['best']} (rho = {m['best_rho']:.3f})"
              + (", the lowest rho run (the minimum is at the edge of the sweep)" if m["at_edge"] else "") + "."]
    for k, d in m["neighbours"].items():
      lines.append(f"- neighbour {k}: {d['mean']:+.4f} ± {d['sem']:.4f} (paired, n={d['n']})")
    shares = ", ".join(f"{c} {v:.0%}" for c, v in sorted(b["lowest_mean_share"].items(), key=lambda kv: -kv[1]))
    lines.append(f"- bootstrap over seeds ({b['samples']} samples): lowest mean at {shares}")
    if b["fit_argmin_median"] is not None:
      lines.append(f"- quadratic fit's minimum: rho = {b['fit_argmin_median']:.2f} (16-84%: "
                   f"{b['fit_argmin_16_84'][0]:.2f}-{b['fit_argmin_16_84'][1]:.2f}; a minimum in "
                   f"{b['fit_has_minimum_share']:.0%} of samples)")
    below = [c for c, w in m["below_best_worse_by_2se"].items() if w]
    lines.append("- U shape (a rho below the best worse than it by more than 2 standard errors): "
                 + (f"yes ({', '.join(below)})" if below else "no" + (" (nothing below the best was run)"
                                                                       if m["at_edge"] else "")))
  lines += ["", "Knock-out (Engram off), retained fraction = off / on:", "",
            "| model | facts MC | facts MC above chance | NIAH accuracy | held-out loss (on/off) |", "|---|---|---|---|---|"]
  for c in [c for c in order if c in summary["conditions"] and "knockout" in summary["conditions"][c]]:
    ko = summary["conditions"][c]["knockout"]
    lines.append(f"| {summary['conditions'][c]['label']} | {_fmt(ko['facts_retained'], 3)} | "
                 f"{_fmt(ko['facts_retained_above_chance'], 3)} | {_fmt(ko['niah_retained'], 3)} | "
                 f"{_fmt(ko['heldout_retained'], 3)} |")
  fr = summary["facts_by_repeat"]
  if fr:
    ks = fr["repeats"]
    plot_frequency(fr, os.path.join(out_dir, "facts_by_frequency.png"))
    lines += ["", "Facts by training frequency: multiple-choice accuracy (chance 0.25) per repeat count of the facts' "
              "text in the training files (questions per count: " + ", ".join(f"{k}: {fr['questions'][str(k)]}" for k in ks)
              + "); Engram on / off:", "",
              "| model | " + " | ".join(f"x{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for c in [c for c in order if c in fr["conditions"]]:
      cells = []
      for k in ks:
        on, off = fr["conditions"][c][str(k)]["on"], fr["conditions"][c][str(k)]["off"]
        cells.append(f"{on['mean']:.3f} ± {on['sem'] if on['n'] > 1 else float('nan'):.3f}"
                     + (f" / {off['mean']:.3f}" if off["n"] else ""))
      lines.append(f"| {summary['conditions'][c]['label']} (n={fr['conditions'][c][str(ks[0])]['on']['n']}) | "
                   + " | ".join(cells) + " |")
    lines += ["", "Paired differences per repeat count (same seed, same facts), mean ± standard error:", "",
              "| difference | " + " | ".join(f"x{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name, per in fr["paired"].items():
      lines.append(f"| {name} | " + " | ".join(f"{per[str(k)]['mean']:+.3f} ± {per[str(k)]['sem']:.3f} (n={per[str(k)]['n']})"
                                             for k in ks) + " |")
    lines += ["", "![facts by frequency](facts_by_frequency.png)"]
  lines += ["", "![allocation](allocation_curve.png)", "", "![knock-out](knockout_retained.png)", ""]
  with open(os.path.join(out_dir, "REPORT.md"), "w") as f:
    f.write("\n".join(lines))
  return summary


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--work", default=os.path.join(ROOT, "runs", "reproduction"),
                 help="checkpoints and logs (not committed)")
  p.add_argument("--results", default=os.path.join(RESULTS, "runs"), help="one JSON per finished run (committed)")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--jobs", type=int, default=1, help="runs at a time, each pinned to its own core")
  p.add_argument("--only", default=None, help="comma-separated run names (e.g. rho0.8_s0,dense_s0)")
  p.add_argument("--report", action="store_true", help="only rebuild REPORT.md, summary.json and the plots")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="change a study setting (STUDY's keys, e.g. --set preset=configs/small.py --set steps=2000 "
                 "--set sparse_budget=500000000 for a GPU); give every run of one study the same settings")
  p.add_argument("--smoke", action="store_true", help="a few steps of a few runs into a scratch directory")
  p.add_argument("--run_one", default=None, help=argparse.SUPPRESS)
  p.add_argument("--study", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  study = dict(STUDY)
  for item in args.set:
    key, _, value = item.partition("=")
    if key not in STUDY or not value:
      raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(STUDY)}")
    study[key] = type(STUDY[key])(json.loads(value) if not isinstance(STUDY[key], str) else value)
  if args.smoke:
    study.update(steps=4, warmup_steps=2, eval_batches=1, entities=4, facts_repeat=1, niah_lengths=(64,), niah_examples=1)
  if args.study:
    study = json.loads(args.study)
  extra = ["--study", json.dumps(study)]
  if args.run_one:
    run_one(args.run_one, args.work, args.results, study)
    return
  if args.report:
    summary = write_report(args.results)
    lengths = sorted(os.path.join(ROOT, "bench", d) for d in os.listdir(os.path.join(ROOT, "bench"))
                     if d.startswith("reproduction") and os.path.isdir(os.path.join(ROOT, "bench", d, "runs")))
    if len(lengths) > 1:
      plot_lengths(lengths, os.path.join(RESULTS, "allocation_lengths.png"))
    print(json.dumps(summary.get("paired_differences", {}), indent=1))
    return
  names = run_names(args.seeds)
  if args.only:
    wanted = args.only.split(",")
    unknown = [n for n in wanted if n not in names]
    if unknown:
      raise SystemExit(f"--only: unknown run(s) {unknown}; expected names like {names[:3]}")
    names = wanted
  if args.jobs < 1:
    raise SystemExit(f"--jobs={args.jobs}: expected a positive integer")
  t0 = time.time()
  knowledge_files(args.work, study)  # before the runs start, which read it concurrently
  run_study(names, args.work, args.results, args.jobs, extra)
  write_report(args.results)
  print(f"study done in {time.time() - t0:.0f} s; report: {os.path.join(os.path.dirname(args.results), 'REPORT.md')}")


if __name__ == "__main__":
  main()
