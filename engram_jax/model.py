"""The decoder: where Engram, attention, MoE and mHC meet.

tokens -> embedding -> M residual streams -> blocks -> merge streams -> final norm -> LM head.
Each block: [Engram at its layers: H <- H + Y] -> attention (mHC) -> dense MLP or MoE (mHC).

Blocks are grouped into runs of identical structure (dense / MoE); a run longer than one block is
an `nn.scan` over stacked params, so compile time does not grow with depth. Engram blocks always
stand alone: each Engram layer has its own prime-sized table, so no two are stackable.

The model consumes Engram rows, never tables: `engram_rows` {table name: [B,T,H,d]} come from
`memory.gather` (the tables live in the same parameter tree, but memory.py creates, splits and reads
them), so how rows are placed, gathered and differentiated is decided outside the model.

Engram knock-out (the paper's sensitivity analysis) is an input, not a config: `engram_scale`
[num_engram_layers] multiplies each layer's Y, so one compiled function serves the full model
and every knock-out (scale 0 removes that layer's contribution exactly).

Decoding is a mode of the same modules with the same params (`cache_mode`, see generation.py):
"prefill" runs right-padded prompts exactly as training does and returns the "cache" collection
(attention keys/values or MLA latents, each Engram layer's conv state; scanned runs stack theirs
along the layer axis like their params); "decode" takes one token per row at its own position and
updates that collection. mHC and MoE are per token and keep nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax import memory
from engram_jax.config import ModelConfig
from engram_jax.engram import Engram
from engram_jax.layers import CACHE_COLLECTION, CACHE_MODES, MLP, Attention, RMSNorm
from engram_jax.mhc import HyperConnection, expand, merge
from engram_jax.moe import BALANCE_COLLECTION, MoE


@dataclasses.dataclass(frozen=True)
class Segment:
  """A run of structurally identical blocks [start, start + length)."""

  start: int
  length: int
  moe: bool
  engram: bool

  @property
  def name(self) -> str:
    if self.length == 1:
      return f"layer_{self.start}"
    return f"layers_{self.start}_{self.start + self.length - 1}"


def block_segments(cfg: ModelConfig) -> List[Segment]:
  segments: List[Segment] = []
  for layer in range(cfg.num_layers):
    moe, engram = cfg.is_moe_layer(layer), cfg.has_engram(layer)
    last = segments[-1] if segments else None
    if last and not engram and not last.engram and last.moe == moe and cfg.scan_layers:
      segments[-1] = dataclasses.replace(last, length=last.length + 1)
    else:
      segments.append(Segment(layer, 1, moe, engram))
  return segments


def _remat_policy(name: str):
  return {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[name]


class Block(nn.Module):
  """One decoder block on the residual streams [B,T,M,D]; returns (streams, stats)."""

  cfg: ModelConfig
  moe: bool
  engram_layer: Optional[int] = None
  cache_mode: Optional[str] = None  # None, "prefill" or "decode" (Attention and Engram keep caches)
  cache_length: int = 0  # prefill: positions the attention cache holds

  @nn.compact
  def __call__(self, streams, positions, segment_ids, engram_rows, engram_scale):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    norm = lambda name: RMSNorm(eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name=name)  # noqa: E731
    stats: Dict[str, jax.Array] = {}

    if self.engram_layer is not None:
      y, gates = Engram(cfg.engram, cfg.d_model, cfg.mhc.expansion, dtype=dtype, param_dtype=pdtype,
                        cache_mode=self.cache_mode, name="engram")(streams, engram_rows, return_gates=True,
                                                                   segment_ids=segment_ids)
      streams = (streams + engram_scale.astype(y.dtype) * y).astype(streams.dtype)
      stats["engram_gate_mean"] = jnp.mean(gates, axis=(0, 1))  # [M]

    hc = HyperConnection(cfg, name="attn_hc")
    x_in, maps = hc.pre(streams)
    y = Attention(cfg, cache_mode=self.cache_mode, cache_length=self.cache_length, name="attn")(
        norm("attn_norm")(x_in), positions, segment_ids)
    streams = hc.post(streams, y, maps)

    hc = HyperConnection(cfg, name="ffn_hc")
    x_in, maps = hc.pre(streams)
    h = norm("ffn_norm")(x_in)
    if self.moe:
      y, stats["moe"] = MoE(cfg, name="moe")(h)
    else:
      y = MLP(cfg.mlp_hidden, cfg, name="mlp")(h)
    streams = hc.post(streams, y, maps)
    return streams, stats


class Decoder(nn.Module):
  """The language model without its Engram tables. Call with tokens [B,T] (and positions, segment
  ids, Engram rows {table name: [B,T,heads,head_dim]} from `memory.gather`); returns (logits
  [B,T,V] float32 (float64 for a float64 model), aux). `init_variables` adds the tables to the parameters.

  aux: "moe": {segment name: stats stacked over the run's layers}, "engram_gate_mean":
  [num_engram_layers, M], "aux_loss": the summed MoE balance losses.

  `cache_mode` "prefill" (with `cache_length`) or "decode" runs the same params as a decoder with
  caches in the mutable "cache" collection (module docstring; generation.py drives it): prefill
  needs segment ids (0 marks each prompt's right padding), decode one token per row and positions.
  """

  cfg: ModelConfig
  cache_mode: Optional[str] = None
  cache_length: int = 0
  # Which part of the model runs (split decoding with host tables, generation.py): "all"; "head" =
  # the embedding and the blocks before layer `split_layer`, returning the residual streams
  # [B,T,M,D] instead of logits; "tail" = the blocks from `split_layer` on and the LM head, starting
  # from those streams (the `streams` argument). `split_layer` must start a block segment (an Engram
  # layer always does). Both parts read the one parameter tree.
  part: str = "all"
  split_layer: int = 0

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, engram_rows=None, engram_scale=None, streams=None):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens: shape {tokens.shape} dtype {tokens.dtype}; expected integer ids [batch, seq]")
    B, T = tokens.shape
    if self.cache_mode not in CACHE_MODES:
      raise ValueError(f"Decoder.cache_mode={self.cache_mode!r}: expected one of {CACHE_MODES}")
    if self.cache_mode == "prefill" and (segment_ids is None or positions is None or self.cache_length < T):
      raise ValueError(f"Decoder: prefill of {T} positions needs segment_ids, positions and cache_length >= {T} "
                       f"(got cache_length={self.cache_length})")
    if self.cache_mode == "decode" and (T != 1 or positions is None):
      raise ValueError(f"Decoder: decoding takes tokens [B, 1] and their positions, got tokens of shape {tokens.shape}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    segments = block_segments(cfg)
    if self.part not in ("all", "head", "tail"):
      raise ValueError(f"Decoder.part={self.part!r}: expected 'all', 'head' or 'tail'")
    if self.part != "all" and self.split_layer not in [seg.start for seg in segments]:
      raise ValueError(f"Decoder.split_layer={self.split_layer}: expected the first layer of a block segment, one of "
                       f"{[seg.start for seg in segments]}")
    if (self.part == "tail") != (streams is not None):
      raise ValueError(f"Decoder.part={self.part!r}: the residual streams are an input of the 'tail' part only")
    if self.part == "head":
      segments = [seg for seg in segments if seg.start < self.split_layer]
    elif self.part == "tail":
      segments = [seg for seg in segments if seg.start >= self.split_layer]
    engram_layers = cfg.engram.layer_ids if cfg.engram is not None else ()
    if any(seg.engram for seg in segments):
      names = memory.table_names(cfg.engram)
      if engram_rows is None or set(engram_rows) != set(names):
        raise ValueError(f"engram_rows has tables {None if engram_rows is None else sorted(engram_rows)}; expected "
                         f"{sorted(names)}: read them with memory.gather(tables, cfg.engram, engram_ids)")
      engram_scale = jnp.ones((len(engram_layers),), dtype) if engram_scale is None else jnp.asarray(engram_scale)

    embedding = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                     ("vocab", "embed")),
                           (cfg.vocab_size, cfg.d_model), pdtype)
    if streams is None:
      x = jnp.take(embedding, tokens, axis=0).astype(dtype)
      x = nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))
      streams = expand(x, cfg.mhc.expansion)

    aux = {"moe": {}, "engram_gate_mean": [], "aux_loss": jnp.zeros((), jnp.float32)}
    caching = dict(cache_mode=self.cache_mode, cache_length=self.cache_length)
    for seg in segments:
      block_cls = Block
      if cfg.remat_policy != "none" and self.cache_mode is None:  # remat only pays off under a backward pass
        block_cls = nn.remat(Block, policy=_remat_policy(cfg.remat_policy), prevent_cse=seg.length == 1)
      if seg.engram:
        i = engram_layers.index(seg.start)
        streams, stats = block_cls(cfg, seg.moe, seg.start, name=seg.name, **caching)(
            streams, positions, segment_ids, engram_rows[memory.table_name(seg.start)], engram_scale[i])
        aux["engram_gate_mean"].append(stats["engram_gate_mean"])
      elif seg.length == 1:
        streams, stats = block_cls(cfg, seg.moe, name=seg.name, **caching)(streams, positions, segment_ids, None, None)
      else:
        scanned = nn.scan(block_cls, variable_axes={"params": 0, BALANCE_COLLECTION: 0, "intermediates": 0,
                                                    CACHE_COLLECTION: 0},
                          split_rngs={"params": True}, in_axes=(nn.broadcast,) * 4, length=seg.length,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        streams, stats = scanned(cfg, seg.moe, name=seg.name, **caching)(streams, positions, segment_ids, None, None)
      if "moe" in stats:
        moe_stats = stats["moe"]
        if seg.length == 1:
          moe_stats = jax.tree.map(lambda s: s[None], moe_stats)
        aux["moe"][seg.name] = moe_stats
        aux["aux_loss"] = aux["aux_loss"] + jnp.sum(moe_stats["aux_loss"])
    if self.part == "head":
      return streams, aux

    x = merge(streams)
    x = RMSNorm(eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, embedding.astype(dtype))
    else:
      head = self.param("lm_head", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                ("embed", "vocab")),
                        (cfg.d_model, cfg.vocab_size), pdtype)
      logits = jnp.einsum("btd,dv->btv", x, head.astype(dtype))
    logits = nn.with_logical_constraint(logits.astype(jnp.promote_types(dtype, jnp.float32)),
                                       ("batch", "seq", "act_vocab"))
    aux["engram_gate_mean"] = (jnp.stack(aux["engram_gate_mean"]) if aux["engram_gate_mean"]
                               else jnp.zeros((0, cfg.mhc.expansion), jnp.float32))
    return logits, aux


_TABLE_KEY = 0x7AB1E  # folded into the init key for the tables (the Decoder's own params use the key as is)


def init_variables(cfg: ModelConfig, key: jax.Array, batch: int = 1, seq: int = 8):
  """Every variable of a fresh model, boxed with logical axis names: the Decoder's, plus the Engram
  tables (memory.init_tables) in the parameters."""
  tokens = jnp.zeros((batch, seq), jnp.int32)
  rows = None
  if cfg.engram is not None:
    e = cfg.engram
    rows = {name: jnp.zeros((batch, seq, e.num_heads, e.head_dim), jnp.dtype(cfg.dtype))
            for name in memory.table_names(e)}
  variables = dict(Decoder(cfg).init(key, tokens, engram_rows=rows))
  if cfg.engram is not None:
    tables = memory.init_tables(cfg.engram, jax.random.fold_in(key, _TABLE_KEY), jnp.dtype(cfg.param_dtype))
    variables["params"] = memory.merge(variables["params"], tables)
  return variables


def engram_gates(cfg: ModelConfig, intermediates, batch_shape) -> jax.Array:
  """Every Engram layer's gates [B, T, L, M] float32 from a forward's "intermediates" collection
  (each Engram block sows its gates [B, T, M] once under its own name; zeros [B, T, 0, M] without
  Engram)."""
  if cfg.engram is None:
    return jnp.zeros(tuple(batch_shape) + (0, cfg.mhc.expansion), jnp.float32)
  return jnp.stack([intermediates[memory.table_name(l)]["engram"]["gates"][0] for l in cfg.engram.layer_ids],
                   axis=2).astype(jnp.float32)


def forward(cfg: ModelConfig, params, model_state, batch, *, engram_scale=None, rows=None, mutable=False,
            cache_mode: Optional[str] = None, cache_length: int = 0, part: str = "all", split_layer: int = 0,
            streams=None):
  """The model on a batch {"tokens", "positions", "segment_ids", "engram_ids" [B,T,L,H]}: returns
  Decoder.apply's result ((logits, aux), plus the mutated collections with `mutable`).

  Engram rows are read from the tables in `params` with `memory.gather` (differentiable through the
  tables) unless `rows` are given (then `params` may hold the backbone alone): the one forward that
  training, its eval step, the model runner and decoding (`cache_mode`, with the "cache" collection
  in `model_state` and in `mutable`) share. `part`, `split_layer` and `streams` run a part of it
  (Decoder); the "head" part reads no Engram rows.
  """
  backbone, tables = memory.split(params)
  if rows is None and cfg.engram is not None and part != "head":
    rows = memory.gather(tables, cfg.engram, batch["engram_ids"])
  return Decoder(cfg, cache_mode=cache_mode, cache_length=cache_length, part=part, split_layer=split_layer).apply(
      {"params": backbone, **model_state}, batch["tokens"], positions=batch.get("positions"),
      segment_ids=batch.get("segment_ids"), engram_rows=rows, engram_scale=engram_scale, mutable=mutable,
      streams=streams)


def token_nll(logits: jax.Array, targets: jax.Array):
  """(next-token negative log-likelihood [B,T], log normaliser [B,T]) in float32: the one token loss
  of training, evaluation and scoring."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return log_z - target_logit, log_z


def abstract_variables(cfg: ModelConfig, batch: int = 1, seq: int = 8):
  """ShapeDtypeStructs of every variable (boxed with logical axis names), allocating nothing."""
  return jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0), batch, seq))


def param_counts(cfg: ModelConfig) -> Dict[str, int]:
  """Parameter counts by the paper's conventions.

  total: every param. engram: the Engram tables. embedding: token embedding and LM head.
  activated: what one token computes with, without the token embedding and LM head: total minus
  embeddings, minus the Engram tables (a token reads a handful of their rows), minus the routed
  experts it does not visit (a fraction 1 - top_k / num_experts of them).
  """
  params = nn.meta.unbox(abstract_variables(cfg)["params"])
  counts = {"total": 0, "engram": 0, "embedding": 0, "routed_experts": 0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [getattr(k, "key", str(k)) for k in path]
    size = int(leaf.size)
    counts["total"] += size
    if memory.is_table_path(path):
      counts["engram"] += size
    elif keys == ["embedding"] or keys == ["lm_head"]:
      counts["embedding"] += size
    elif "moe" in keys and keys[-1] in ("w_gate", "w_up", "w_down"):
      counts["routed_experts"] += size
  inactive = 0
  if cfg.moe is not None:
    inactive = counts["routed_experts"] * (1 - cfg.moe.top_k / cfg.moe.num_experts)
  counts["activated"] = int(round(counts["total"] - counts["embedding"] - counts["engram"] - inactive))
  return counts
