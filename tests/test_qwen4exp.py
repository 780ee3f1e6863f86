"""Qwen4Exp (Qwen3.8-Flash-Next): the PLE hashing recipe, the model family and the weight import,
against arbitrary-precision references and the transformers fixtures (tests/fixtures/qwen4exp)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import memory
from engram_jax.config import EngramConfig, ModelConfig
from engram_jax.hashing import (EngramHashing, NgramHasher, RawIds, demo_recipe, head_table_sizes, ple_recipe,
                                splitmix64)

_MASK64 = (1 << 64) - 1


def _ple_cfg(ngram=3, heads=4, layers=(1,), base=1000, eos=1, seed=1234):
  return EngramConfig(vocab_size_per_ngram=(base,) * (ngram - 1), max_ngram_size=ngram,
                      n_embed_per_ngram=8 * heads, n_head_per_ngram=heads, layer_ids=layers, pad_id=eos, seed=seed)


# -- the PLE hashing recipe -----------------------------------------------------------------------


def _is_prime(n):
  return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _reference_ids(ids, eos, multipliers, sizes, n):
  """Global-free per-head ids [T, heads] of one row, from the definition, in Python ints: a look-back
  s of position t reads the token s back unless an EOS lies strictly between them (or it is before
  the start): then it reads EOS; mix is the wrapping int64 XOR of products, then Python `%`."""
  to_signed = lambda v: v - (1 << 64) if v >> 63 else v  # noqa: E731
  out = []
  for t in range(len(ids)):
    look = []
    for s in range(n):
      src = t - s
      blocked = src < 0 or any(ids[j] == eos for j in range(src + 1, t))
      look.append(eos if blocked else int(ids[src]))
    mix, row = 0, []
    for k in range(n):
      mix ^= (look[k] * int(multipliers[k])) & _MASK64
      if k:
        row += [to_signed(mix) % p for p in sizes[k - 1]]
    out.append(row)
  return np.array(out, np.int64)


def test_release_constants():
  """Qwen3.8-Flash-Next's one PLE layer: vocab 248320, base 20M, 2 orders x 8 heads, seed 1234, padded to
  a multiple of 128, one-based layer id 2 -> 320,001,536 rows and the multipliers the checkpoint stores."""
  cfg = _ple_cfg(ngram=3, heads=8, layers=(1,), base=20_000_000, eos=248044, seed=1234)
  recipe = ple_recipe(cfg, vocab_size=248320, table_pad_multiple=128)
  assert recipe.rows(1) == 320_001_536
  flat = [p for order in recipe.head_sizes[1] for p in order]
  assert sum(flat) == 320_001_446 and flat[0] == 20_000_003 and all(map(_is_prime, flat))
  assert flat == sorted(flat) and len(set(flat)) == 16
  np.testing.assert_array_equal(recipe.multipliers[1], [23703573157769, 20109073645365, 8052911324071])
  # The demo's prime search (restart per order, never reuse) gives the same consecutive primes, so
  # memory.table_layout serves PLE tables unchanged (padded to its own multiple of 1024).
  assert head_table_sizes(cfg)[1] == recipe.head_sizes[1]
  sizes, offsets, rows = memory.table_layout(cfg, 1)
  assert sizes.tolist() == flat and rows == 320_002_048


def test_splitmix64_known_value():
  # splitmix64 seeded with 0 (the first output of the reference generator's stream).
  assert splitmix64(0) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("ngram, layers", [(3, (1,)), (4, (0, 3))])
def test_ple_ids_match_bigint_reference_numpy_and_jnp(ngram, layers):
  cfg = _ple_cfg(ngram=ngram, heads=3, layers=layers, base=1000, eos=1)
  vocab = 64
  recipe = ple_recipe(cfg, vocab, 128)
  hasher = NgramHasher.from_recipe(recipe)
  rng = np.random.default_rng(ngram)
  ids = rng.integers(0, vocab, size=(3, 23))
  ids[ids % 5 == 0] = 1  # plenty of EOS, including runs and EOS at the start
  ids[1, :2] = 1
  got = hasher.hash_numpy(ids)  # [B, T, layers, heads]
  for li, layer in enumerate(layers):
    for b in range(ids.shape[0]):
      want = _reference_ids(ids[b].tolist(), 1, recipe.multipliers[layer], recipe.head_sizes[layer], ngram)
      np.testing.assert_array_equal(got[b, :, li], want)
  np.testing.assert_array_equal(np.asarray(jax.jit(hasher.hash_jnp)(jnp.asarray(ids, jnp.int32))), got)


def test_ple_multipliers_at_the_int64_bound():
  """With the real vocabulary the products reach ~2^62: the uint32-pair arithmetic must still agree."""
  cfg = _ple_cfg(ngram=3, heads=8, layers=(1,), base=20_000_000, eos=248044)
  recipe = ple_recipe(cfg, 248320, 128)
  hasher = NgramHasher.from_recipe(recipe)
  ids = np.random.default_rng(0).integers(248000, 248320, size=(2, 9))
  ids[0, 4] = 248044
  got = hasher.hash_numpy(ids)
  for b in range(2):
    np.testing.assert_array_equal(got[b, :, 0], _reference_ids(ids[b].tolist(), 248044, recipe.multipliers[1],
                                                             recipe.head_sizes[1], 3))
  np.testing.assert_array_equal(np.asarray(jax.jit(hasher.hash_jnp)(ids)), got)


def test_ple_decode_continuation_equals_prefill():
  cfg = _ple_cfg(ngram=4, heads=2, layers=(0, 2), base=500, eos=3)
  hashing = EngramHashing.from_recipe(ple_recipe(cfg, 40, 128))
  rng = np.random.default_rng(5)
  ids = rng.integers(0, 40, size=(2, 20))
  ids[:, 6] = 3
  ids[0, 12:14] = 3
  full = hashing.hash_numpy(ids)
  lookup = hashing.lookup_array()
  for prompt in (1, 5, 7):
    history = hashing.history_numpy(ids[:, :prompt], np.array([prompt, prompt]))
    step = jax.jit(hashing.next_ids)
    for t in range(prompt, ids.shape[1]):
      got, history = step(history, jnp.asarray(ids[:, t]), lookup)
      np.testing.assert_array_equal(np.asarray(got)[:, 0], full[:, t])


def test_ple_recipe_never_reads_as_demo():
  """Same EngramConfig, same raw ids: the two recipes give other multipliers, ids and fingerprints,
  and a raw-id out of range is refused by name."""
  from engram_jax import patches

  cfg = _ple_cfg(ngram=3, heads=2, layers=(1,), base=300, eos=1)
  ple = EngramHashing.from_recipe(ple_recipe(cfg, 50, 128))
  demo = EngramHashing.__new__(EngramHashing)
  demo._use(cfg, RawIds(50), NgramHasher(cfg, 50, 1))
  assert demo.recipe.fingerprint_fields() == {} and ple.recipe.fingerprint_fields()["recipe"] == "qwen4exp_ple"
  model = ModelConfig(vocab_size=50, d_model=16, num_layers=2, engram=cfg)
  assert patches.fingerprint(model, ple) != patches.fingerprint(model, demo)
  with pytest.raises(ValueError, match="token id 50 is out of range"):
    ple.hash_numpy(np.array([[1, 50]]))
  with pytest.raises(ValueError, match="one base"):
    ple_recipe(dataclasses.replace(cfg, vocab_size_per_ngram=(300, 301)), 50)
  assert demo_recipe(cfg, 50, 1).name == "engram_demo_v1"


# -- the model's pieces against literal references -----------------------------------------------

from engram_jax.models import qwen4exp as q4  # noqa: E402


def _tiny_cfg(**kw):
  base = dict(vocab_size=384, hidden_size=32, num_hidden_layers=4,
              layer_types=("linear_attention",) * 3 + ("indexed_attention",), num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, rope_theta=10000.0, partial_rotary_factor=0.5,
              linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
              num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
              hc_count=4, hc_lowrank=8, ple_layer_ids=(2,), ple_embed_dim=32, ngram_size=3, heads_per_ngram=4,
              ngram_vocab_size_base=257, seed=1234, split_ngram_parts=4, eos_token_id=352, indexer_n_heads=4,
              indexer_head_dim=16, indexer_budget=4, indexer_compress_ratio=2)
  base.update(kw)
  return q4.Qwen4ExpConfig(**base)


def _rope_np(x, pos, cfg):
  d = cfg.rotary_dim
  inv = q4.rope_inv_freq(cfg).astype(np.float64)
  ang = pos * inv
  cos, sin = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
  r = x[..., :d]
  half = np.concatenate([-r[..., d // 2:], r[..., :d // 2]], axis=-1)
  return np.concatenate([r * cos + half * sin, x[..., d:]], axis=-1)


def _qsa_reference(q, raw, w, pos, valid, cfg):
  """The indexer as specified, one query at a time: blocks over the query's visible keys."""
  B, T, _, d = q.shape
  c, k = cfg.indexer_compress_ratio, cfg.indexer_budget // cfg.indexer_compress_ratio
  out = np.zeros((B, T, T), bool)
  for b in range(B):
    for t in range(T):
      vis = [j for j in range(t + 1) if valid[b, j]]
      nblk = len(vis) // c
      sel = list(vis[nblk * c:])
      if nblk:
        blocks = np.array(vis[:nblk * c]).reshape(nblk, c)
        pooled = raw[b, blocks].mean(axis=1)
        pooled = pooled / np.sqrt(np.mean(pooled ** 2, -1, keepdims=True) + cfg.rms_norm_eps) * (1 + w)
        kb = np.stack([_rope_np(pooled[i], pos[b, blocks[i, 0]], cfg) for i in range(nblk)])
        scores = np.maximum(q[b, t] @ kb.T, 0).sum(0) / np.sqrt(d)
        for i in np.argsort(-scores, kind="stable")[:min(k, nblk)]:
          sel += blocks[i].tolist()
      out[b, t, sel] = True
  return out


def test_qsa_selection_matches_per_query_reference():
  cfg = _tiny_cfg(indexer_budget=6, indexer_compress_ratio=3)
  rng = np.random.default_rng(0)
  B, T, d = 3, 19, cfg.indexer_head_dim
  q = rng.normal(size=(B, T, cfg.indexer_n_heads, d)).astype(np.float32)
  raw = rng.normal(size=(B, T, d)).astype(np.float32)
  w = rng.normal(size=(d,)).astype(np.float32) * 0.3
  valid = np.ones((B, T), bool)
  valid[1, 13:] = False  # right padding
  valid[2, :4] = False  # left padding
  pos = np.broadcast_to(np.arange(T), (B, T))
  got = jax.jit(lambda *a: q4.qsa_selection(*a, cfg))(q, raw, w, pos, valid)
  want = _qsa_reference(q.astype(np.float64), raw.astype(np.float64), w, pos, valid, cfg)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_params_carry_logical_axes_the_rules_know():
  """Every parameter (and table) of the family shards under the one rules table on an 8-device mesh."""
  from engram_jax.config import MeshConfig
  from engram_jax.sharding import make_mesh, tree_shardings

  cfg = _tiny_cfg()
  params, tables = jax.eval_shape(lambda: q4.init(cfg, jax.random.key(0)))
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  shardings = tree_shardings({"params": params, "tables": tables}, mesh)
  assert shardings["params"]["layer_1"]["mlp"]["w_gate"].spec[0] == "expert"
  assert shardings["tables"]["layer_1"].spec[0] == ("data", "fsdp", "expert", "tensor")


# -- against the transformers fixtures ------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402

from engram_jax.models import qwen4exp_convert as cv  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "qwen4exp")
CASES = ("causal_l3i1", "causal_i1l2i1l1_ng4", "condgen_l1i1l1i1_ng2")
# Float32 bound for every activation and the logits, relative to the largest magnitude of the reference
# quantity over real positions. Both sides are float32 with unit roundoff 6e-8; they differ in
# summation order (every matmul and conv, the expert combine) and in the delta rule's form: the
# reference runs its chunked (WY) form for every prefill, this model the recurrence up to one chunk
# (the 32- and 40-token cases) and the chunked form past it (the 68-token case). Four or five
# residual layers accumulate that. Measured worst case over the three cases: 5.1e-6 of the largest
# magnitude (1.2e-5 absolute, a GatedDeltaNet output of magnitude 2.3 in the 68-token case); the
# bound leaves about 6x for other CPUs' vectorisation.
REL_TOL = 3e-5


def _close(got, want, valid, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  scale = max(1.0, float(np.abs(want[valid]).max()))
  err = float(np.abs(got - want)[valid].max())
  assert err <= REL_TOL * scale, f"{what}: max abs diff {err:.3g} > {REL_TOL} x {scale:.3g}"
  return err


class _Case:
  """One fixture case, converted once: config, params, tables, golden arrays, and the jitted forward."""

  def __init__(self, name):
    self.name, self.dir = name, os.path.join(FIXTURES, name)
    self.meta = json.load(open(os.path.join(self.dir, "meta.json")))
    self.golden = dict(np.load(os.path.join(self.dir, "golden.npz")))
    self.cfg, self.params, self.tables = cv.load_hf_dir(os.path.join(self.dir, "hf"))
    self.hashing = self.cfg.hashing()
    cfg, hashing = self.cfg, self.hashing
    self.forward = jax.jit(lambda p, t, tok, m, pos: q4.forward(cfg, p, t, tok, m, pos, hashing=hashing, capture=True))
    ids, mask = self.golden["input_ids"], self.golden["attention_mask"]
    self.valid = mask.astype(bool)
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    self.logits, self.inter = self.forward(self.params, self.tables, ids, mask, positions)


@pytest.fixture(scope="module", params=CASES)
def case(request):
  if not os.path.isdir(os.path.join(FIXTURES, request.param)):
    pytest.skip(f"fixture {request.param} not present")
  return _Case(request.param)


def test_fixture_hash_constants_and_ple_ids(case):
  """PLE ids bit-exact: numpy and jnp, prefill and decode continuation (EOS inside, padding as EOS)."""
  cfg, g, recipe = case.cfg, case.golden, case.hashing.recipe
  ecfg = cfg.engram_config()
  for layer_key, info in case.meta["ple_layers"].items():
    layer = info["one_based_layer_id"] - 1
    assert recipe.multipliers[layer].tolist() == info["layer_multipliers"]
    assert [p for o in recipe.head_sizes[layer] for p in o] == info["ngram_heads_vocab_sizes"]
    assert recipe.rows(layer) == info["table_rows"]
  ids, mask = g["input_ids"], g["attention_mask"]
  host = q4.ple_ids(cfg, case.hashing, ids, mask)
  device = jax.jit(lambda t, m: q4.ple_ids(cfg, case.hashing, t, m))(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(device), host)
  prompt, steps = g["decode/prompt_ids"], g["decode/step_ids"]
  history = case.hashing.history_numpy(prompt, np.full(len(prompt), prompt.shape[1]))
  decoded = []
  next_ids = jax.jit(case.hashing.next_ids)
  for s in range(steps.shape[1]):
    got, history = next_ids(history, jnp.asarray(steps[:, s]), case.hashing.lookup_array())
    decoded.append(np.asarray(got)[:, 0])
  decoded = np.stack(decoded, axis=1)
  for i, layer in enumerate(cfg.ple_layers):
    offsets = memory.table_layout(ecfg, layer)[1]
    np.testing.assert_array_equal(host[..., i, :] + offsets, g[f"layer{layer}/ple_ids"])
    np.testing.assert_array_equal(decoded[..., i, :] + offsets, g[f"decode/layer{layer}/ple_ids"])


def test_fixture_release_constants():
  path = os.path.join(FIXTURES, "full_scale_ple.json")
  if not os.path.isfile(path):
    pytest.skip("full_scale_ple.json not present")
  ref = json.load(open(path))
  cfg = q4.Qwen4ExpConfig(ple_layer_ids=(2, 6), layer_types=("linear_attention",) * 8, num_hidden_layers=8)
  recipe = cfg.hash_recipe()
  for index, layer in enumerate(cfg.ple_layers):
    want = ref["ple_layer_index"][str(index)]
    assert recipe.multipliers[layer].tolist() == want["layer_multipliers"]
    assert [p for o in recipe.head_sizes[layer] for p in o] == want["ngram_heads_vocab_sizes"]
    assert recipe.rows(layer) == want["padded_rows"]
  assert recipe.rows(1) == 320_001_536


def test_fixture_selections_equal(case):
  """Router top-k (in torch.topk's descending order) and the QSA masks, exactly, on every real query
  (padded positions carry values of no meaning: there the state of a GatedDeltaNet stays as of the
  last real token here, and keeps decaying in the reference)."""
  g, valid = case.golden, case.valid
  for layer, kind in enumerate(case.cfg.layer_types):
    inter = case.inter[f"layer_{layer}"]
    experts = np.asarray(inter["mlp"]["expert_ids"][0])
    np.testing.assert_array_equal(experts[valid], g[f"layer{layer}/router_idx"][valid])
    if kind == "indexed_attention":
      qsa = np.asarray(inter["self_attn"]["qsa_mask"][0])
      np.testing.assert_array_equal(qsa[valid], g[f"layer{layer}/idx_mask"].astype(bool)[valid])


def test_fixture_activations_and_logits(case):
  g, valid, inter = case.golden, case.valid, case.inter
  errs = {"logits": _close(case.logits, g["logits"], valid, "logits"),
          "final_hidden": _close(inter["final_hidden"][0], g["final_hidden"], valid, "final_hidden")}
  for layer in range(case.cfg.num_hidden_layers):
    mine = inter[f"layer_{layer}"]
    errs[f"layer{layer}/out"] = _close(inter["hidden"][layer], g[f"layer{layer}/out"], valid, f"layer{layer}/out")
    errs[f"layer{layer}/mixer_out"] = _close(mine["attn_out"][0], g[f"layer{layer}/mixer_out"], valid, "mixer_out")
    errs[f"layer{layer}/moe_out"] = _close(mine["mlp_out"][0], g[f"layer{layer}/moe_out"], valid, "moe_out")
    for hc, read in (("attn_hc", "attn_read"), ("mlp_hc", "mlp_read")):
      x, inject = mine[read][0]
      errs[f"layer{layer}/{hc}_x"] = _close(x, g[f"layer{layer}/{hc}_x"], valid, f"{hc} x")
      errs[f"layer{layer}/{hc}_w"] = _close(inject, g[f"layer{layer}/{hc}_w"], valid, f"{hc} w")
    if layer in case.cfg.ple_layers:
      # The rows read from the converted table are the reference's embedding rows, bit for bit.
      np.testing.assert_array_equal(np.asarray(mine["ple"]["rows"][0]), g[f"layer{layer}/ple_emb"])
      errs[f"layer{layer}/ple_out"] = _close(mine["ple_out"][0], g[f"layer{layer}/ple_out"], valid, "ple_out")
  print(case.name, {k: f"{v:.2g}" for k, v in errs.items()})


def test_fixture_loss(case):
  g = case.golden
  labels = g["loss_labels"][:, 1:]
  logp = jax.nn.log_softmax(jnp.asarray(case.logits[:, :-1]), axis=-1)
  keep = labels != -100
  nll = -np.take_along_axis(np.asarray(logp), np.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
  assert abs(float(nll[keep].mean()) - float(g["loss"])) <= REL_TOL * max(1.0, float(g["loss"]))


def test_fixture_padding_side_does_not_matter(case):
  """Row 2 (right-padded in the fixture) moved to the left of its row, with positions counting from
  its first real token as `generate` gives them: its real positions' logits do not change."""
  g = case.golden
  ids, mask = g["input_ids"].copy(), g["attention_mask"].copy()
  n = int(mask[2].sum())
  T = ids.shape[1]
  ids[2] = np.concatenate([ids[2, n:], ids[2, :n]])
  mask[2] = np.concatenate([mask[2, n:], mask[2, :n]])
  pos = np.broadcast_to(np.arange(T), ids.shape).copy()
  pos[2] = np.maximum(np.cumsum(mask[2]) - 1, 0)
  logits, _ = case.forward(case.params, case.tables, ids, mask, pos)
  _close(np.asarray(logits)[2, T - n:], g["logits"][2, :n], np.ones(n, bool), "left-padded row")


def test_fixture_conversion(case):
  """Table rows bit-equal to the checkpoint's shards (either prefix), zero past them; a stored hash
  constant that the recipe does not reproduce, or a leftover tensor, is refused by name."""
  config, state = cv.read_hf_dir(os.path.join(case.dir, "hf"))
  prefix = case.meta["checkpoint_prefix"]
  for layer in case.cfg.ple_layers:
    base = f"{prefix}layers.{layer}.ple.ple_embedding"
    shards = [state[f"{base}.ngram_embedding.shard_{j}.weight"] for j in range(case.cfg.split_ngram_parts)
              if f"{base}.ngram_embedding.shard_{j}.weight" in state]
    table = np.asarray(case.tables[memory.table_name(layer)])
    whole = np.concatenate(shards)
    np.testing.assert_array_equal(table[:len(whole)], whole)
    assert not table[len(whole):].any()
    bad = dict(state)
    bad[f"{base}.layer_multipliers"] = np.asarray(state[f"{base}.layer_multipliers"]) + 2
    with pytest.raises(cv.ConversionError, match=r"layer_multipliers.*recomputed PLE recipe"):
      cv.convert_state_dict(bad, case.cfg)
  bad = dict(state)
  bad[prefix + "layers.0.extra.weight"] = np.zeros(2, np.float32)
  with pytest.raises(cv.ConversionError, match=r"layers\.0\.extra\.weight"):
    cv.convert_state_dict(bad, case.cfg)


def test_table_shards_concatenate_in_numeric_order():
  """Twelve shards: shard_10 and shard_11 come after shard_9, not after shard_1."""
  name = CASES[0]
  if not os.path.isdir(os.path.join(FIXTURES, name)):
    pytest.skip(f"fixture {name} not present")
  config, state = cv.read_hf_dir(os.path.join(FIXTURES, name, "hf"))
  cfg = q4.Qwen4ExpConfig.from_hf(config)
  base = "model.layers.1.ple.ple_embedding.ngram_embedding"
  keys = sorted((k for k in state if k.startswith(base + ".shard_")), key=lambda k: int(k.split("_")[-1].split(".")[0]))
  whole = np.concatenate([state[k] for k in keys])
  state = {k: v for k, v in state.items() if k not in keys}
  for j, piece in enumerate(np.array_split(whole, 12)):
    state[f"{base}.shard_{j}.weight"] = piece
  _, tables = cv.convert_state_dict(state, cfg)
  np.testing.assert_array_equal(np.asarray(tables["layer_1"])[:len(whole)], whole)


# -- decoding against the fixtures' cached steps ---------------------------------------------------


@pytest.fixture(scope="module")
def decoder(case):
  """The case's prefill and decode step, jitted once per case (cache of prompt + steps slots)."""
  cfg, hashing = case.cfg, case.hashing
  g = case.golden
  slots = g["input_ids"].shape[1]
  prefill = jax.jit(lambda p, t, tok, m: q4.prefill(cfg, p, t, tok, m, slots, hashing=hashing))
  step = jax.jit(lambda p, t, c, h, tok, pos: q4.decode_step(cfg, p, t, c, h, tok, pos, hashing=hashing, capture=True))
  return prefill, step


def _pad_to(a, length):
  return np.pad(a, ((0, 0), (0, length - a.shape[1])))


def test_fixture_decode_steps_and_caches(case, decoder):
  """Prefill the fixture's prompts, then feed its step tokens one per call: logits per step, router
  and QSA selections exactly, and the caches after prefill (GatedDeltaNet conv window and state,
  PLE conv window, attention and indexer keys) equal the reference's."""
  prefill, step = decoder
  cfg, g = case.cfg, case.golden
  prompt, steps = g["decode/prompt_ids"], g["decode/step_ids"]
  B, P = prompt.shape
  T = g["input_ids"].shape[1]
  ones = np.ones((B, P), bool)
  mask = _pad_to(np.ones((B, P), np.int32), T)
  logits, cache, history = prefill(case.params, case.tables, _pad_to(prompt, T), mask)
  _close(np.asarray(logits)[:, P - 1], g["decode/prefill_last_logits"], np.ones(B, bool), "prefill last logits")
  ref = "decode/cache_after_prefill/"
  import flax.linen as nn

  unboxed = nn.meta.unbox(cache)
  for layer, kind in enumerate(cfg.layer_types):
    mine = unboxed[f"layer_{layer}"]
    if kind == "linear_attention":
      gdn = mine["linear_attn"]
      window = np.concatenate([np.asarray(gdn[f"conv_{x}"]) for x in "qkv"], axis=-1)  # [B, K-1, C]
      _close(window, np.swapaxes(g[f"{ref}layer{layer}/conv_state0"], 1, 2)[:, 1:], np.ones(window.shape[:2], bool),
             "GatedDeltaNet conv window")
      _close(gdn["recurrent"], g[f"{ref}layer{layer}/recurrent_state0"], np.ones(B, bool), "recurrent state")
      if layer in cfg.ple_layers:
        _close(mine["ple"]["conv_state"], np.swapaxes(g[f"{ref}layer{layer}/conv_state1"], 1, 2),
               np.ones(mine["ple"]["conv_state"].shape[:2], bool), "PLE conv window")
        np.testing.assert_array_equal(np.asarray(history), g[f"{ref}layer{layer}/conv_state2"])
    else:
      att = mine["self_attn"]
      _close(np.asarray(att["keys"])[:, :P], np.swapaxes(g[f"{ref}layer{layer}/keys"], 1, 2), ones, "keys")
      _close(np.asarray(att["values"])[:, :P], np.swapaxes(g[f"{ref}layer{layer}/values"], 1, 2), ones, "values")
      _close(np.asarray(att["index_keys"])[:, :P], g[f"{ref}layer{layer}/indexer_keys"], ones, "indexer keys")
  for s in range(steps.shape[1]):
    out, cache, history, inter = step(case.params, case.tables, cache, history, steps[:, s], np.full(B, P + s))
    _close(out, g["decode/step_logits"][:, s], np.ones(B, bool), f"decode step {s} logits")
    for layer, kind in enumerate(cfg.layer_types):
      mine = inter[f"layer_{layer}"]
      experts = np.asarray(mine["mlp"]["expert_ids"][0])[:, 0]
      np.testing.assert_array_equal(experts, g[f"decode/layer{layer}/router_idx"][:, s])
      if kind == "indexed_attention":
        np.testing.assert_array_equal(np.asarray(mine["self_attn"]["qsa_mask"][0])[:, 0],
                                      g[f"decode/layer{layer}/idx_mask"][:, s].astype(bool))


def test_fixture_decode_from_a_right_padded_prefill(case, decoder):
  """Rows 0 and 1 prefilled with different lengths (row 1 right-padded), then decoded token by token
  through the rest of the sequence: every step's logits equal the fixture's full-sequence logits at
  that position (EOS inside row 1 included)."""
  prefill, step = decoder
  g = case.golden
  ids = g["input_ids"][:2]
  T = ids.shape[1]
  lengths = np.array([T - 6, T - 9])
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
  _, cache, history = prefill(case.params, case.tables, np.where(mask, ids, 0), mask)
  for s in range(5):
    pos = lengths + s
    out, cache, history, _ = step(case.params, case.tables, cache, history, ids[[0, 1], pos], pos)
    _close(out, g["logits"][[0, 1], pos], np.ones(2, bool), f"step {s}")


# -- training: gradients against torch autograd ----------------------------------------------------

# Gradient bound, per tensor, relative to the tensor's largest reference entry: the forward's float32
# differences (REL_TOL above) carried through the backward; measured worst 1.2e-5 (a GatedDeltaNet
# q projection), so 1e-4 leaves room for other CPUs.
GRAD_REL_TOL = 1e-4


def test_fixture_gradients(case):
  """d(loss)/d(every parameter and the PLE table) equal the reference's autograd. The reference's
  gradients are named and laid out like its checkpoint, and the conversion is a pure re-layout
  (transposes, reshapes, splits), so converting them gives them in this model's tree."""
  g = case.golden
  if not any(k.startswith("grad/") for k in g):
    pytest.skip(f"{case.name} has no gradients")
  _, state = cv.read_hf_dir(os.path.join(case.dir, "hf"))
  grads = {k[len("grad/"):]: v for k, v in g.items() if k.startswith("grad/")}
  for key, value in state.items():  # the hash constants the conversion checks (not parameters)
    if key.endswith(("layer_multipliers", "ngram_heads_vocab_sizes", "ngram_heads_offsets")):
      grads[key] = value
  for key in [k for k in grads if k.endswith("ngram_embedding.weight")]:  # saved whole, not in shards
    grads[key.replace("ngram_embedding.weight", "ngram_embedding.shard_0.weight")] = grads.pop(key)
  want_params, want_tables = cv.convert_state_dict(grads, case.cfg)
  cfg, hashing = case.cfg, case.hashing
  ids, mask, labels = g["input_ids"], g["attention_mask"], g["loss_labels"][:, 1:]
  keep = labels != -100

  def loss(params, tables):
    logits = q4.forward(cfg, params, tables, ids, jnp.asarray(mask), hashing=hashing)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, np.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * keep) / np.sum(keep)

  value, (d_params, d_tables) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(case.params, case.tables)
  assert abs(float(value) - float(g["loss"])) <= REL_TOL * float(g["loss"])
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want_params))
  for path, got in jax.tree_util.tree_leaves_with_path(d_params):
    want = np.asarray(flat_want[path])
    err = float(np.abs(np.asarray(got) - want).max())
    assert err <= GRAD_REL_TOL * float(np.abs(want).max()), (jax.tree_util.keystr(path), err)
  for name, want in want_tables.items():
    err = float(np.abs(np.asarray(d_tables[name]) - want).max())
    assert err <= GRAD_REL_TOL * float(np.abs(want).max()), (name, err)
  # The indexer only selects: no gradient reaches it, here as in the reference.
  indexed = [l for l, kind in enumerate(cfg.layer_types) if kind == "indexed_attention"]
  for layer in indexed:
    for name in ("index_q_proj", "index_k_proj", "index_q_norm", "index_k_norm"):
      assert not np.asarray(d_params[f"layer_{layer}"]["self_attn"][name]).any()


def test_fixture_greedy_generation(case, decoder):
  """Both generate prompts as one right-padded batch: greedy continuations token for token equal to
  transformers' `generate`, and each step's logits within the float32 bound."""
  prefill, step = decoder
  g = case.golden
  T = g["input_ids"].shape[1]
  prompts = [g[f"generate/gen{i}/prompt_ids"][0] for i in (0, 1)]
  sequences = [g[f"generate/gen{i}/sequence"][0] for i in (0, 1)]
  ref_logits = [g[f"generate/gen{i}/step_logits"][0] for i in (0, 1)]
  lengths = np.array([len(p) for p in prompts])
  tokens = np.zeros((2, T), np.int64)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
  logits, cache, history = prefill(case.params, case.tables, tokens, mask)
  out = np.asarray(logits)[[0, 1], lengths - 1]
  new = max(len(s) - len(p) for s, p in zip(sequences, prompts))
  generated = [[], []]
  for s in range(new):
    for i in (0, 1):
      if s < len(ref_logits[i]):
        _close(out[i], ref_logits[i][s], np.ones(out.shape[1], bool), f"generate row {i} step {s}")
    next_tokens = np.argmax(out, axis=-1)
    for i in (0, 1):
      generated[i].append(int(next_tokens[i]))
    out, cache, history, _ = step(case.params, case.tables, cache, history, next_tokens, lengths + s)
    out = np.asarray(out)
  for i in (0, 1):
    want = sequences[i][len(prompts[i]):].tolist()
    assert generated[i][:len(want)] == want, (i, generated[i], want)


def test_fixture_forward_on_a_mesh():
  """On 8 devices (data 2, expert 2, tensor 2), params and the table sharded by the rules table: the
  MoE runs expert-parallel (shard_map all-to-all) and the PLE rows come from the sharded lookup; the
  logits still match the reference."""
  from engram_jax.config import MeshConfig
  from engram_jax.sharding import batch_sharding, make_mesh, tree_shardings

  name = CASES[0]
  if not os.path.isdir(os.path.join(FIXTURES, name)) or len(jax.devices()) < 8:
    pytest.skip("needs the fixture and 8 devices")
  cfg, params, tables = cv.load_hf_dir(os.path.join(FIXTURES, name, "hf"))
  g = np.load(os.path.join(FIXTURES, name, "golden.npz"))
  ids = np.concatenate([g["input_ids"], g["input_ids"][:1]])  # batch 4: divisible by the batch axes
  mask = np.concatenate([g["attention_mask"], g["attention_mask"][:1]])
  want = np.concatenate([g["logits"], g["logits"][:1]])
  mesh = make_mesh(MeshConfig(data=2, fsdp=1, expert=2, tensor=2))
  abstract = jax.eval_shape(lambda: q4.init(cfg, jax.random.key(0)))
  shardings = tree_shardings({"params": abstract[0], "tables": abstract[1]}, mesh)
  hashing = cfg.hashing()
  with jax.set_mesh(mesh):
    params = jax.device_put(params, shardings["params"])
    tables = jax.device_put(tables, shardings["tables"])
    batch = batch_sharding(mesh)
    logits = jax.jit(lambda p, t, tok, m: q4.forward(cfg, p, t, tok, m, hashing=hashing))(
        params, tables, jax.device_put(ids, batch), jax.device_put(mask, batch))
  _close(logits, want, mask.astype(bool), "sharded logits")


@pytest.mark.parametrize("T, chunk", [(37, 8), (70, 16)])
def test_chunked_delta_rule_equals_recurrence(T, chunk):
  """The chunked (WY) prefill form against the step-by-step definition, from a nonzero state, with
  strong decays (log decay down to -20 per step) and skipped steps (g = beta = 0)."""
  rng = np.random.default_rng(T)
  B, H, dk, dv = 2, 3, 8, 4
  q = q4.l2_normalize(jnp.asarray(rng.normal(size=(B, T, H, dk)), jnp.float32)) * dk ** -0.5
  k = q4.l2_normalize(jnp.asarray(rng.normal(size=(B, T, H, dk)), jnp.float32))
  v = jnp.asarray(rng.normal(size=(B, T, H, dv)), jnp.float32)
  g = jnp.asarray(-rng.uniform(0, 1, size=(B, T, H)) ** 3 * 20, jnp.float32)
  beta = jnp.asarray(rng.uniform(0, 1, size=(B, T, H)), jnp.float32)
  skip = rng.uniform(size=(B, T, 1)) < 0.2
  g, beta = jnp.where(skip, 0.0, g), jnp.where(skip, 0.0, beta)
  state = jnp.asarray(rng.normal(size=(B, H, dk, dv)), jnp.float32)
  want_out, want_state = jax.jit(q4.gated_delta_rule)(q, k, v, g, beta, state)
  got_out, got_state = jax.jit(lambda *a: q4.chunked_gated_delta_rule(*a, chunk_size=chunk))(q, k, v, g, beta, state)
  np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), atol=2e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(got_state), np.asarray(want_state), atol=2e-5, rtol=0)


def test_scanned_layers_equal_unrolled():
  """Three periods of (GatedDeltaNet, indexed), the PLE on the first layer: the first period stays
  unrolled, the other two scan as one segment. With the same weights (`stack_layers`), the scanned
  model's prefill of 16 tokens (right-padded on one row) and its decode step (caches stacked over
  the repeats) give the unrolled model's full-sequence logits."""
  import flax.linen as nn

  cfg = _tiny_cfg(num_hidden_layers=6, layer_types=("linear_attention", "indexed_attention") * 3,
                  ple_layer_ids=(1,), ngram_vocab_size_base=101)
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
  segments = [(s.name, s.period, s.repeats) for s in q4.layer_segments(scanned_cfg)]
  assert segments == [("layer_0", 1, 1), ("layer_1", 1, 1), ("layers_2_5", 2, 2)]
  late_ple = dataclasses.replace(scanned_cfg, ple_layer_ids=(3,))  # PLE in the middle period: no run
  assert all(s.repeats == 1 for s in q4.layer_segments(late_ple))
  # Random weights from the shapes (compiling `init` costs more than this whole test: XLA:CPU is slow
  # to compile the hundreds of threefry calls of a deep init).
  rng = np.random.default_rng(0)
  abstract = nn.meta.unbox(jax.eval_shape(lambda: q4.init(cfg, jax.random.key(1))))
  params, tables = jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(np.float32), abstract)
  stacked = q4.stack_layers(scanned_cfg, params)
  scanned_abstract = jax.eval_shape(lambda: q4.init(scanned_cfg, jax.random.key(1))[0])
  assert jax.tree.map(lambda a: a.shape, stacked) == jax.tree.map(lambda a: a.shape, nn.meta.unbox(scanned_abstract))
  tokens = rng.integers(0, cfg.vocab_size, size=(2, 17))
  lengths = np.array([16, 12])
  hashing = cfg.hashing()
  full = jax.jit(lambda p, t, tok: q4.forward(cfg, p, t, tok, hashing=hashing))(params, tables, tokens)

  def scanned(p, t, tok, m, nxt):
    logits, cache, history = q4.prefill(scanned_cfg, p, t, tok, m, 20, hashing=hashing)
    step, _, _ = q4.decode_step(scanned_cfg, p, t, cache, history, nxt, lengths, hashing=hashing)
    return logits, step

  mask = (np.arange(16)[None, :] < lengths[:, None]).astype(np.int32)
  logits, step = jax.jit(scanned)(stacked, tables, tokens[:, :16], mask, tokens[[0, 1], lengths])
  full = np.asarray(full)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], full[:, :16][real], atol=2e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(step), full[[0, 1], lengths], atol=2e-5, rtol=0)
