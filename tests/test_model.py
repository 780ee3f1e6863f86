"""The decoder end to end: sharded equals single-device, it learns, knock-out, sharding snapshot."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.config import (AttentionConfig, EngramConfig, MeshConfig, MHCConfig, ModelConfig, MoEConfig,
                               load_preset)
from engram_jax.hashing import NgramHasher
from engram_jax import memory
from engram_jax.model import Decoder, abstract_variables, block_segments, forward, init_variables
from engram_jax.sharding import LOGICAL_RULES, batch_sharding, logical_to_spec, make_mesh, tree_shardings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOT = os.path.join(os.path.dirname(__file__), "golden", "tiny_param_shardings.json")

CFG = ModelConfig(
    vocab_size=128, d_model=32, num_layers=4, num_dense_layers=1, mlp_hidden=64,
    attention=AttentionConfig(kind="mla", num_heads=4, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
                              qk_rope_head_dim=4, v_head_dim=8),
    moe=MoEConfig(num_experts=8, top_k=2, num_shared_experts=1, expert_hidden=16, dispatch="capacity"),
    engram=EngramConfig(vocab_size_per_ngram=(211, 211), n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=(1,),
                        pad_id=0, conv_zero_init=False),
    mhc=MHCConfig(expansion=2), max_seq_len=32)
B, T = 8, 16


def _batch(cfg=CFG, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  hasher = NgramHasher(cfg.engram, cfg.vocab_size, pad_id=0)
  return tokens, hasher.hash_numpy(tokens)


def _init(cfg, tokens, ids):
  return jax.jit(lambda k: init_variables(cfg, k))(jax.random.key(0))


def _apply(cfg, variables, tokens, ids, **kwargs):
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  return forward(cfg, params, state, {"tokens": tokens, "engram_ids": ids}, **kwargs)


def _loss_fn(cfg):
  def loss(params, state, tokens, ids):
    logits, aux = _apply(cfg, {"params": params, **state}, tokens[:, :-1], ids[:, :-1])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
    return nll + aux["aux_loss"], aux
  return loss


def test_segments_group_runs_and_isolate_engram():
  segs = block_segments(dataclasses.replace(CFG, num_layers=6, engram=dataclasses.replace(CFG.engram, layer_ids=(2,))))
  assert [(s.start, s.length, s.moe, s.engram) for s in segs] == [
      (0, 1, False, False), (1, 1, True, False), (2, 1, True, True), (3, 3, True, False)]


def test_sharded_forward_backward_matches_single_device():
  tokens, ids = _batch()
  variables = nn.meta.unbox(_init(CFG, tokens, ids))
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  grad_fn = jax.jit(jax.value_and_grad(_loss_fn(CFG), has_aux=True))
  (ref_loss, _), ref_grads = grad_fn(params, state, tokens, ids)

  mesh = make_mesh(MeshConfig(data=2, fsdp=2, expert=2, tensor=1))
  abstract = abstract_variables(CFG)
  shardings = tree_shardings(abstract, mesh)
  sharded = jax.device_put(variables, shardings)
  assert sharded["params"]["layer_1"]["moe"]["w_gate"].sharding.spec[0] == "expert"
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    (loss, _), grads = jax.jit(jax.value_and_grad(_loss_fn(CFG), has_aux=True))(
        sharded["params"], {k: v for k, v in sharded.items() if k != "params"},
        jax.device_put(tokens, batch_sharding(mesh)), jax.device_put(ids, batch_sharding(mesh, 4)))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def test_loss_decreases_with_sgd_on_repeated_batch():
  tokens, ids = _batch()
  variables = nn.meta.unbox(_init(CFG, tokens, ids))
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  grad_fn = jax.value_and_grad(_loss_fn(CFG), has_aux=True)

  @jax.jit
  def step(params):
    (loss, _), grads = grad_fn(params, state, tokens, ids)
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), loss

  losses = []
  for _ in range(20):
    params, loss = step(params)
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses


def test_engram_knockout_scale():
  tokens, ids = _batch()
  variables = nn.meta.unbox(_init(CFG, tokens, ids))
  apply = jax.jit(lambda v, s: _apply(CFG, v, tokens, ids, engram_scale=s)[0])
  full = apply(variables, jnp.ones(1))
  default = jax.jit(lambda v: _apply(CFG, v, tokens, ids)[0])(variables)
  np.testing.assert_array_equal(np.asarray(full), np.asarray(default))
  knocked = apply(variables, jnp.zeros(1))
  assert not np.allclose(np.asarray(full), np.asarray(knocked))
  # Knocking Engram out equals a model whose Engram output is identically zero: zero its value path.
  params = nn.meta.unbox(variables["params"])
  zeroed = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if "engram" in jax.tree_util.keystr(p) and ("value" in jax.tree_util.keystr(p)) else x,
      params)
  np.testing.assert_allclose(np.asarray(apply({**variables, "params": zeroed}, jnp.ones(1))), np.asarray(knocked),
                             rtol=1e-5, atol=1e-6)


def test_missing_engram_rows_or_bad_ids_are_errors():
  tokens, ids = _batch()
  with pytest.raises(ValueError, match=r"engram_rows has tables None; expected \['layer_1'\]"):
    jax.eval_shape(lambda: Decoder(CFG).init(jax.random.key(0), tokens))
  variables = abstract_variables(CFG)
  with pytest.raises(ValueError, match="engram_ids has shape"):
    jax.eval_shape(lambda v: _apply(CFG, v, tokens, ids[..., :1]), nn.meta.unbox(variables))


def test_tables_live_in_params_at_the_checkpoint_path_and_split_merge_round_trip():
  """memory.py owns the tables: init puts them where checkpoints have always had them, and split /
  merge are exact inverses on values, boxes and shardings alike."""
  variables = nn.meta.unbox(_init(CFG, None, None))
  params = variables["params"]
  table = params["layer_1"]["engram"]["memory"]["table"]
  assert table.shape == (memory.table_layout(CFG.engram, 1)[2], CFG.engram.head_dim)
  backbone, tables = memory.split(params)
  assert list(tables) == [memory.table_name(1)] and tables["layer_1"] is table
  assert backbone["layer_1"]["engram"]["memory"] == {} and "table" in params["layer_1"]["engram"]["memory"]
  assert jax.tree.structure(memory.merge(backbone, tables)) == jax.tree.structure(params)
  boxed = abstract_variables(CFG)["params"]
  assert isinstance(memory.split(boxed)[1]["layer_1"], nn.LogicallyPartitioned)
  paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(params) if memory.is_table_path(p)]
  assert len(paths) == 1


def _snapshot():
  cfg = load_preset(os.path.join(ROOT, "configs", "tiny.py")).model
  abstract = abstract_variables(cfg)
  specs = nn.get_partition_spec(abstract)
  leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return {jax.tree_util.keystr(p): [list(a) if isinstance(a, tuple) else a for a in logical_to_spec(spec)]
          for p, spec in leaves}


def test_golden_sharding_snapshot():
  """Any change to how the tiny preset's params shard shows up here; regenerate deliberately with
  ENGRAM_UPDATE_GOLDEN=1 and review the diff."""
  current = _snapshot()
  if os.environ.get("ENGRAM_UPDATE_GOLDEN"):
    os.makedirs(os.path.dirname(SNAPSHOT), exist_ok=True)
    with open(SNAPSHOT, "w") as f:
      json.dump(current, f, indent=1, sort_keys=True)
  with open(SNAPSHOT) as f:
    golden = json.load(f)
  assert current == golden


def test_a_mesh_axis_shards_one_dimension_only():
  """The rules give `embed` and `lora` both to fsdp: a param with both keeps fsdp on the first."""
  assert logical_to_spec(("embed", "lora")) == jax.sharding.PartitionSpec("fsdp", None)
  assert logical_to_spec(("lora", "heads", "head_dim")) == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert logical_to_spec(("table_rows", "table_dim")) == jax.sharding.PartitionSpec(
      ("data", "fsdp", "expert", "tensor"), None)
  with pytest.raises(ValueError, match="'nope' has no rule"):
    logical_to_spec(("nope",))
