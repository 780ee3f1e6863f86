"""The Engram module and its table: causality, sparse gradients, sharding, and input validation."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import memory
from engram_jax.config import EngramConfig, MeshConfig, ModelConfig
from engram_jax.engram import Engram
from engram_jax.hashing import NgramHasher
from engram_jax.sharding import LOGICAL_RULES, make_mesh, tree_shardings

CFG = EngramConfig(vocab_size_per_ngram=(97, 131), max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=2,
                   layer_ids=(1,), pad_id=0, seed=3, conv_zero_init=False)
VOCAB, D, M, B, T = 50, 8, 2, 2, 12


def _table(cfg=CFG, seed=0):
  return nn.meta.unbox(memory.init_tables(cfg, jax.random.key(seed + 100)))[memory.table_name(1)]


def _rows(table, ids, cfg=CFG):
  return memory.read_rows(table, cfg, 1, jnp.asarray(ids))


def _setup(seed=0):
  hasher = NgramHasher(CFG, VOCAB, pad_id=0)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, size=(B, T))
  hidden = jnp.asarray(rng.normal(size=(B, T, M, D)), jnp.float32)
  module = Engram(CFG, D, M)
  table = _table(seed=seed)
  ids = jnp.asarray(hasher.hash_numpy(tokens)[..., 0, :])
  params = nn.meta.unbox(module.init(jax.random.key(seed), hidden, _rows(table, ids))["params"])
  return hasher, module, params, table, tokens, hidden


def test_causal():
  hasher, module, params, table, tokens, hidden = _setup()
  ids = hasher.hash_numpy(tokens)[..., 0, :]
  out = module.apply({"params": params}, hidden, _rows(table, ids))
  t = 5
  tokens2 = tokens.copy()
  tokens2[:, t + 1:] = (tokens2[:, t + 1:] + 7) % (VOCAB - 1) + 1
  hidden2 = hidden.at[:, t + 1:].set(jax.random.normal(jax.random.key(9), hidden[:, t + 1:].shape))
  out2 = module.apply({"params": params}, hidden2, _rows(table, hasher.hash_numpy(tokens2)[..., 0, :]))
  np.testing.assert_array_equal(np.asarray(out[:, :t + 1]), np.asarray(out2[:, :t + 1]))
  assert not np.allclose(np.asarray(out[:, t + 1:]), np.asarray(out2[:, t + 1:]))


def test_only_read_rows_get_gradient():
  hasher, module, params, table, tokens, hidden = _setup()
  ids = hasher.hash_numpy(tokens)[..., 0, :]

  def loss(tab):
    return jnp.sum(module.apply({"params": params}, hidden, _rows(tab, ids)) ** 2)

  grad = np.asarray(jax.grad(loss)(table))
  _, offsets, rows = memory.table_layout(CFG, 1)
  read = np.zeros(rows, bool)
  read[(ids + offsets).reshape(-1)] = True
  nonzero = np.any(grad != 0, axis=1)
  np.testing.assert_array_equal(nonzero, read)
  assert read.sum() > 0 and (~read).sum() > 0


def test_conv_zero_init_gives_gated_value():
  cfg = dataclasses.replace(CFG, conv_zero_init=True)
  hasher = NgramHasher(cfg, VOCAB, pad_id=0)
  module = Engram(cfg, D, M)
  hidden = jnp.ones((1, 4, M, D))
  ids = hasher.hash_numpy(np.array([[1, 2, 3, 4]]))[..., 0, :]
  table = _table(cfg)
  params = nn.meta.unbox(module.init(jax.random.key(0), hidden, _rows(table, ids, cfg))["params"])
  assert not np.any(np.asarray(params["conv_kernel"]))
  y, gates = module.apply({"params": params}, hidden, _rows(table, ids, cfg), return_gates=True)
  # SiLU(0) = 0, so Y is exactly the gated value.
  e = table[np.asarray(ids + memory.table_layout(cfg, 1)[1])].reshape(1, 4, -1)
  value = e @ params["value_proj"] + params["value_bias"]
  np.testing.assert_allclose(np.asarray(y), np.asarray(gates[..., None] * value[:, :, None, :]), rtol=1e-5, atol=1e-6)


def test_sharded_table_matches_single_device():
  hasher, module, params, table, tokens, hidden = _setup()
  ids = jnp.asarray(hasher.hash_numpy(tokens)[..., 0, :])
  mesh = make_mesh(MeshConfig(data=-1))
  assert mesh.devices.size == 8

  def loss_and_out(p, tab, h):
    out = module.apply({"params": p}, h, _rows(tab, ids))
    return jnp.sum(jnp.sin(out)), out

  ref_grad, ref_out = jax.grad(loss_and_out, argnums=(0, 1, 2), has_aux=True)(params, table, hidden)
  abstract = jax.eval_shape(lambda: memory.init_tables(CFG, jax.random.key(0)))
  shardings = tree_shardings(abstract, mesh)[memory.table_name(1)]
  assert shardings.spec[0] == ("data", "fsdp", "expert", "tensor")
  sharded = jax.device_put(table, shardings)
  assert len(sharded.addressable_shards) == 8
  assert sharded.addressable_shards[0].data.shape[0] == table.shape[0] // 8
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    grad, out = jax.jit(jax.grad(loss_and_out, argnums=(0, 1, 2), has_aux=True))(params, sharded, hidden)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-6)
  # The sharded backward adds the same terms in another order (per-device partial sums): float32
  # reassociation, a few ulps of a sum of hundreds of terms, not a missing or doubled contribution.
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=5e-6)


def test_bf16_compute_with_float32_params():
  hasher, _, _, table, tokens, hidden = _setup()
  module = Engram(CFG, D, M, dtype=jnp.bfloat16)
  rows = _rows(table, hasher.hash_numpy(tokens)[..., 0, :])
  params = nn.meta.unbox(module.init(jax.random.key(0), hidden, rows)["params"])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  ref = Engram(CFG, D, M).apply({"params": params}, hidden, rows)
  out = module.apply({"params": params}, hidden.astype(jnp.bfloat16), rows)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=5e-2, atol=5e-2)


def test_module_rejects_bad_shapes():
  hasher, module, params, table, tokens, hidden = _setup()
  ids = hasher.hash_numpy(tokens)[..., 0, :]
  with pytest.raises(ValueError, match=r"expected \[B, T, 2, 8\]"):
    module.apply({"params": params}, hidden[:, :, :1], _rows(table, ids))
  with pytest.raises(ValueError, match="heads on their last axis"):
    _rows(table, ids[..., :3])
  with pytest.raises(ValueError, match=r"rows have shape .*expected \[B, T, heads, head_dim\]"):
    module.apply({"params": params}, hidden, _rows(table, ids)[:, :, :3])


def test_engram_hashing_jnp_in_graph_equals_numpy_on_raw_ids():
  """The one hashing object: raw ids -> compressed (a device array passed into the jitted function)
  -> hash ids, bit-identical to the host path the data pipeline uses."""
  from engram_jax import data

  tokenizer = data.load_tokenizer()
  cfg = dataclasses.replace(CFG, layer_ids=(0, 2), pad_id=2)
  hashing = data.engram_hashing(tokenizer, cfg)
  assert data.engram_hashing(tokenizer, cfg).compressed is hashing.compressed  # built once
  raw = np.random.default_rng(0).integers(0, tokenizer.get_vocab_size(), size=(3, 17))
  lookup = hashing.lookup_array()
  got = jax.jit(hashing.hash_jnp)(jnp.asarray(raw, jnp.int32), lookup)
  np.testing.assert_array_equal(np.asarray(got), hashing.hash_numpy(raw))
  assert hashing.compressed_pad_id == int(hashing.compress(np.array([2]))[0])


def test_ablation_controls_one_row_per_head_and_open_gate():
  """rows_per_head=1: every n-gram reads row h of head h (numpy and jnp agree); gate='open': the gate
  is 1 and Y is the plain value plus the conv path."""
  cfg = dataclasses.replace(CFG, rows_per_head=1, gate="open", conv_zero_init=True)
  hasher = NgramHasher(cfg, VOCAB, pad_id=0)
  tokens = np.random.default_rng(2).integers(1, VOCAB, size=(B, T))
  ids = hasher.hash_numpy(tokens)
  assert not ids.any()
  np.testing.assert_array_equal(np.asarray(jax.jit(hasher.hash_jnp)(tokens)), ids)
  sizes, offsets, rows = memory.table_layout(cfg, 1)
  np.testing.assert_array_equal(sizes, [1] * cfg.num_heads)
  np.testing.assert_array_equal(offsets, np.arange(cfg.num_heads))
  module, hidden = Engram(cfg, D, M), jnp.asarray(np.random.default_rng(3).normal(size=(B, T, M, D)), jnp.float32)
  table = _table(cfg)
  params = nn.meta.unbox(module.init(jax.random.key(0), hidden, _rows(table, ids[..., 0, :], cfg))["params"])
  y, gates = module.apply({"params": params}, hidden, _rows(table, ids[..., 0, :], cfg), return_gates=True)
  np.testing.assert_array_equal(np.asarray(gates), 1.0)
  value = table[:cfg.num_heads].reshape(-1) @ params["value_proj"] + params["value_bias"]
  np.testing.assert_allclose(np.asarray(y), np.broadcast_to(value, y.shape), rtol=1e-5, atol=1e-6)


# -- hashing input validation -------------------------------------------------------------------


def test_numpy_hashing_rejects_bad_ids():
  hasher = NgramHasher(CFG, VOCAB, pad_id=0)
  with pytest.raises(ValueError, match=f"compressed token id {VOCAB} is out of range"):
    hasher.hash_numpy(np.array([[1, VOCAB]]))
  with pytest.raises(TypeError, match="integer array"):
    hasher.hash_numpy(np.array([[1.0, 2.0]]))
  with pytest.raises(ValueError, match="rank >= 1"):
    hasher.hash_numpy(np.int64(3))


def test_jnp_hashing_matches_numpy_on_odd_shapes():
  hasher = NgramHasher(CFG, VOCAB, pad_id=0)
  rng = np.random.default_rng(1)
  for shape in [(1,), (2,), (3, 5), (2, 2, 7)]:
    ids = rng.integers(0, VOCAB, size=shape)
    np.testing.assert_array_equal(np.asarray(jax.jit(hasher.hash_jnp)(ids)), hasher.hash_numpy(ids))


# -- config validation --------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    (dict(max_ngram_size=1, vocab_size_per_ngram=()), "max_ngram_size=1"),
    (dict(vocab_size_per_ngram=(100,)), "one table size per order"),
    (dict(vocab_size_per_ngram=(100, 1)), "integers >= 2"),
    (dict(n_embed_per_ngram=10, n_head_per_ngram=4), "n_embed_per_ngram=10"),
    (dict(layer_ids=(1, 1)), "unique layer ids"),
    (dict(layer_ids=()), "at least one layer"),
    (dict(layer_ids=(-1,)), "non-negative"),
    (dict(pad_id=-3), "pad_id=-3"),
    (dict(kernel_size=0), "kernel_size=0"),
    (dict(rows_per_head=0), "rows_per_head=0"),
    (dict(gate="closed"), "gate='closed'"),
])
def test_engram_config_errors(changes, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(CFG, **changes)


def test_layer_ids_checked_against_model():
  with pytest.raises(ValueError, match=r"layer_ids=\(1, 15\): expected ids in \[0, 4\)"):
    ModelConfig(num_layers=4, engram=EngramConfig(layer_ids=(1, 15)))
  with pytest.raises(ValueError, match="pad_id=2"):
    ModelConfig(vocab_size=2, engram=EngramConfig(layer_ids=(1,)))
