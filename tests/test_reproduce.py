"""bench/reproduce.py, the reproduction study: its models are the iso-parameter family it claims, its
statistics are right on known data, and a smoke-sized run goes end to end (train, knock-out eval,
results file, report)."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import reproduce  # noqa: E402

from engram_jax.allocation import routed_expert_params, sparse_params  # noqa: E402
from engram_jax.model import param_counts  # noqa: E402


def test_the_study_compares_models_at_equal_budgets():
  names = reproduce.run_names(3)
  assert len(names) == len(set(names)) == 3 * (len(reproduce.RHOS) + 4)  # rho points, dense, cap1, gate_open, small table
  assert names[:5] == ["rho0.8_s0", "rho1.0_s0", "dense_s0", "cap1_s0", "gate_open_s0"]  # seed 0 of the core first
  budget = reproduce.STUDY["sparse_budget"]
  moe = reproduce.model_for("rho1.0")
  per_expert = routed_expert_params(moe)
  activated = {}
  for r in reproduce.RHOS:
    m = reproduce.model_for(f"rho{r}")
    s = sparse_params(m)
    # The inactive budget is the same to within rounding (whole experts, prime table sizes).
    assert abs(s["total"] - budget) < per_expert, r
    assert abs(s["rho"] - r) < per_expert / budget, r
    assert (m.engram is None) == (r == 1.0)
    activated[r] = param_counts(m)["activated"]
  # Activated: the routed experts' share is equal; only the router (d_model x experts) and the Engram
  # module's projections (present for rho < 1) differ.
  engram_module = activated[0.8] - activated[1.0]
  assert 0 < engram_module < 0.1 * activated[1.0]
  dense = param_counts(reproduce.model_for("dense"))
  assert reproduce.model_for("dense").moe is None
  assert abs(dense["activated"] - activated[1.0]) < 0.01 * activated[1.0]
  cap1 = reproduce.model_for("cap1")
  assert cap1.engram.rows_per_head == 1 and param_counts(cap1)["activated"] == activated[0.8]
  assert reproduce.model_for("gate_open").engram.gate == "open"
  with pytest.raises(ValueError, match="condition 'moe': expected dense"):
    reproduce.model_for("moe")


def _record(condition, seed, loss, acc=0.5, rho=None, knocked=None):
  return {"condition": condition, "seed": seed, "study": reproduce.STUDY,
          "heldout": {"loss": loss, "bits_per_byte": loss / 3},
          "facts_mc": {"accuracy": acc}, "sparse": {"rho": rho if rho is not None else 1.0, "engram": 0},
          "params": {"total": 1, "activated": 1}, "experts": 2, "rows_per_head": None, "tokens": 10,
          "train_seconds": 1.0, "niah": [],
          "knockout": None if knocked is None else {"heldout_loss": knocked, "facts_mc_accuracy": acc / 2}}


def test_statistics_on_known_data():
  s = reproduce.stats([1.0, 2.0, 3.0])
  assert s["mean"] == 2.0 and s["std"] == 1.0 and math.isclose(s["sem"], 1 / math.sqrt(3))
  results = [_record("rho0.8", k, 4.0 + 0.1 * k, rho=0.8, knocked=5.0) for k in range(3)]
  results += [_record("rho1.0", k, 4.3 + 0.1 * k) for k in range(2)]
  d = reproduce.paired(results, "rho0.8", "rho1.0", lambda r: r["heldout"]["loss"])
  assert d["seeds"] == [0, 1] and math.isclose(d["mean"], -0.3) and d["std"] < 1e-9
  # A parabola with its minimum at 0.75, sampled at six rhos, is recovered.
  xs = [0.4, 0.55, 0.7, 0.8, 0.9, 1.0]
  coef, err, argmin = reproduce.quadratic_fit(xs * 2, [2 * (x - 0.75) ** 2 + 4 for x in xs] * 2)
  assert math.isclose(argmin, 0.75, abs_tol=1e-9) and math.isclose(coef[2], 2.0, abs_tol=1e-9)
  assert reproduce.summarize([])["conditions"] == {}
  summary = reproduce.summarize(results)
  assert summary["study"] == reproduce.STUDY
  ko = summary["conditions"]["rho0.8"]["knockout"]
  assert math.isclose(ko["facts_retained"]["mean"], 0.5)
  assert math.isclose(ko["heldout_retained"]["mean"], sum(4.0 + 0.1 * k for k in range(3)) / 3 / 5.0)


def test_facts_by_training_frequency_on_known_data():
  def rec(condition, seed, on, off):
    r = _record(condition, seed, 4.0, rho=0.8 if condition == "rho0.8" else 1.0)
    r["facts_by_repeat"] = [{"repeat": k, "accuracy": a, "no_engram_accuracy": b, "questions": 8}
                            for k, a, b in zip((1, 16), on, off)]
    return r

  results = [rec("rho0.8", 0, (0.25, 0.75), (0.25, 0.5)), rec("rho0.8", 1, (0.375, 0.875), (0.25, 0.5)),
             rec("rho1.0", 0, (0.25, 0.5), (None, None)), rec("rho1.0", 1, (0.25, 0.75), (None, None)),
             _record("cap1", 0, 4.0)]  # a run without the stratified probe is left out
  fr = reproduce.summarize(results)["facts_by_repeat"]
  assert fr["repeats"] == [1, 16] and set(fr["conditions"]) == {"rho0.8", "rho1.0"}
  assert math.isclose(fr["conditions"]["rho0.8"]["16"]["on"]["mean"], 0.8125)
  assert math.isclose(fr["conditions"]["rho0.8"]["16"]["off"]["mean"], 0.5)
  assert fr["conditions"]["rho1.0"]["1"]["off"]["n"] == 0
  d = fr["paired"]["rho0.8 - rho1.0"]
  assert math.isclose(d["1"]["mean"], 0.0625) and math.isclose(d["16"]["mean"], 0.1875) and d["16"]["n"] == 2
  pooled = reproduce.pooled_choice([{"accuracy": 0.5, "no_engram_accuracy": 0.25, "questions": 8},
                                    {"accuracy": 1.0, "no_engram_accuracy": 0.5, "questions": 24}])
  assert pooled == {"accuracy": 0.875, "no_engram_accuracy": 0.4375, "questions": 32}
  assert reproduce.summarize([_record("cap1", 0, 4.0)])["facts_by_repeat"] is None


def test_smoke_run_trains_evaluates_and_reports(tmp_path):
  results = tmp_path / "reproduction" / "runs"
  # With facts at two training frequencies (one part per frequency, scored apart and pooled).
  cmd = [sys.executable, os.path.join(ROOT, "bench", "reproduce.py"), "--smoke", "--only", "rho0.8_s0",
         "--set", "facts_repeats=[1,2]",
         "--work", str(tmp_path / "work"), "--results", str(results)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  record = json.loads((results / "rho0.8_s0.json").read_text())
  assert record["condition"] == "rho0.8" and record["step"] == 4 and record["knockout"] is not None
  assert 0 <= record["facts_mc"]["accuracy"] <= 1 and record["heldout"]["loss"] > 0
  parts = record["facts_by_repeat"]
  assert [p["repeat"] for p in parts] == [1, 2] and record["facts_mc"]["questions"] == sum(p["questions"] for p in parts)
  assert record["facts_mc"]["accuracy"] == sum(p["accuracy"] * p["questions"] for p in parts) / record["facts_mc"]["questions"]
  report = (tmp_path / "reproduction" / "REPORT.md").read_text()
  assert "Engram-MoE (rho=0.8)" in report and (tmp_path / "reproduction" / "summary.json").exists()
  assert "Facts by training frequency" in report and (tmp_path / "reproduction" / "facts_by_frequency.png").exists()
  # Resuming finds the finished run and runs nothing.
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert proc.returncode == 0 and "1 of 1 runs done; 0 to run" in proc.stdout


def _curve_results(losses_by_rho):
  return [{"condition": f"rho{rho}", "seed": s, "sparse": {"rho": rho}, "heldout": {"loss": loss}}
          for rho, losses in losses_by_rho.items() for s, loss in enumerate(losses)]


def test_the_minimum_is_located_and_a_u_claimed_only_beyond_two_standard_errors():
  # A U: rho 0.1 is worse than the best (0.5) by far more than its paired standard error.
  u = reproduce.locate_minimum(_curve_results({0.1: [5.30, 5.31, 5.29], 0.5: [5.00, 5.02, 5.01],
                                               1.0: [5.20, 5.22, 5.21]}), samples=200)
  assert u["best"] == "rho0.5" and not u["at_edge"] and u["u_shape"]
  assert set(u["neighbours"]) == {"rho0.1 - rho0.5", "rho1.0 - rho0.5"}
  assert abs(u["neighbours"]["rho0.1 - rho0.5"]["mean"] - 0.29) < 1e-9
  assert 0.3 < u["bootstrap"]["fit_argmin_median"] < 0.7
  # Within noise below the best: no U.
  flat = reproduce.locate_minimum(_curve_results({0.1: [5.01, 4.99, 5.03], 0.5: [5.00, 5.02, 5.01],
                                                  1.0: [5.20, 5.22, 5.21]}), samples=200)
  assert not flat["u_shape"]
  # Falling to the lowest rho run: the minimum is at the edge and nothing below it was run.
  edge = reproduce.locate_minimum(_curve_results({0.1: [4.90, 4.91, 4.92], 0.5: [5.00, 5.02, 5.01],
                                                  1.0: [5.20, 5.22, 5.21]}), samples=200)
  assert edge["best"] == "rho0.1" and edge["at_edge"] and not edge["u_shape"]
  assert edge["bootstrap"]["lowest_mean_share"] == {"rho0.1": 1.0}
