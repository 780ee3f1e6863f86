"""A checkpoint written by an earlier version of train.py still restores and evaluates to the same
numbers: the parameter tree, the checkpoint layout and the evaluation are stable across refactors.

The fixture (tests/fixtures/tiny_checkpoint, see its README) holds a 3-step checkpoint of a shrunk
tiny model and the results.json eval.py wrote for it when it was made.
"""

import json
import os
import shutil

import numpy as np

from engram_jax import evaluation
from engram_jax.runner import load_config_from_checkpoint

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_checkpoint")


def _numbers(node, prefix=""):
  """{key path: number} of every int/float leaf of a results dict (lists indexed)."""
  out = {}
  if isinstance(node, dict):
    for k, v in node.items():
      out.update(_numbers(v, f"{prefix}.{k}" if prefix else k))
  elif isinstance(node, list):
    for i, v in enumerate(node):
      out.update(_numbers(v, f"{prefix}[{i}]"))
  elif isinstance(node, (int, float)) and not isinstance(node, bool):
    out[prefix] = float(node)
  return out


def test_old_checkpoint_restores_and_evaluates_to_the_same_numbers(tmp_path):
  checkpoints = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(FIXTURE, "checkpoints"), checkpoints)  # restore never writes, but be sure
  cfg = load_config_from_checkpoint(checkpoints)
  options = evaluation.EvalOptions(max_batches=40, niah_lengths=(64,), niah_examples=2,
                                   mc_files=(os.path.join(FIXTURE, "mc.jsonl"),))
  # Written on one device, restored onto the 8-device test mesh (eval.py's default: every device).
  results = evaluation.evaluate_checkpoint(cfg, checkpoints, options, log=lambda s: None)
  with open(os.path.join(FIXTURE, "expected_results.json")) as f:
    expected = json.load(f)
  got, want = _numbers(results), _numbers(expected)
  assert sorted(got) == sorted(want)
  assert results["checkpoint"]["step"] == 3
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-6, err_msg=key)
