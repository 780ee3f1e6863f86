"""Frozen configuration dataclasses.

Every knob of the project lives here, one dataclass per concept, a comment per field. Presets in
`configs/` build them with `dataclasses.replace`; nothing else constructs configs from strings.
Each dataclass validates itself in `__post_init__` so a bad value fails at construction, naming the
field, the value and what was expected, before any array is allocated.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple


def _fail(cls: str, field: str, value, expected: str):
  raise ValueError(f"{cls}.{field}={value!r}: expected {expected}")


def _check_positive(obj, *names: str):
  for name in names:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      _fail(type(obj).__name__, name, value, "a positive integer")


@dataclasses.dataclass(frozen=True)
class EngramConfig:
  """Hashed N-gram memory (the official demo's `EngramConfig` plus the paper's training flags)."""

  # Table size target per n-gram order n = 2..max_ngram_size (the demo's `engram_vocab_size`);
  # each head's real size is the next unused prime above this value minus one.
  vocab_size_per_ngram: Tuple[int, ...] = (129280 * 5, 129280 * 5)
  # Largest n-gram order; orders 2..max_ngram_size are hashed.
  max_ngram_size: int = 3
  # Embedding width of one n-gram order, split evenly over its heads.
  n_embed_per_ngram: int = 512
  # Hash heads per n-gram order (each with its own prime-sized table).
  n_head_per_ngram: int = 8
  # Decoder layers (0-based) that carry an Engram module; also fixes the hash multipliers' seeds.
  layer_ids: Tuple[int, ...] = (1, 15)
  # Raw (uncompressed) token id used to pad positions before the sequence start.
  pad_id: int = 2
  # Base seed of the hash multipliers (layer l uses seed + 10007 * l).
  seed: int = 0
  # Depthwise causal conv kernel size; its dilation is max_ngram_size.
  kernel_size: int = 4
  # Zero-initialise the conv so the module starts as the plain gated value (paper, for training).
  conv_zero_init: bool = True
  # RMSNorm epsilon of the gate's key/query norms; None = machine epsilon of the compute dtype,
  # which is what the official module does (torch.nn.RMSNorm with eps=None).
  gate_norm_eps: Optional[float] = None
  # RMSNorm epsilon of the ShortConv's per-branch norms.
  conv_norm_eps: float = 1e-5
  # Standard deviation of the table's normal initialisation (torch nn.Embedding uses 1.0).
  table_init_std: float = 1.0
  # Ablation controls (bench/reproduce.py). rows_per_head: every head's table holds exactly this many
  # rows instead of its prime size (1 = every n-gram shares one row per head, so only the gate, the
  # value projection and the conv remain); None = the paper's prime sizes.
  rows_per_head: Optional[int] = None
  # "learned" (the paper's context-aware gate) or "open" (the gate is fixed at 1).
  gate: str = "learned"

  def __post_init__(self):
    name = "EngramConfig"
    object.__setattr__(self, "vocab_size_per_ngram", tuple(self.vocab_size_per_ngram))
    object.__setattr__(self, "layer_ids", tuple(self.layer_ids))
    _check_positive(self, "max_ngram_size", "n_embed_per_ngram", "n_head_per_ngram", "kernel_size")
    if self.max_ngram_size < 2:
      _fail(name, "max_ngram_size", self.max_ngram_size, "an integer >= 2 (bigrams are the smallest order)")
    if len(self.vocab_size_per_ngram) != self.max_ngram_size - 1:
      _fail(name, "vocab_size_per_ngram", self.vocab_size_per_ngram,
            f"one table size per order 2..{self.max_ngram_size} ({self.max_ngram_size - 1} values)")
    for size in self.vocab_size_per_ngram:
      if not isinstance(size, int) or size < 2:
        _fail(name, "vocab_size_per_ngram", self.vocab_size_per_ngram,
              "integers >= 2 (each head needs a prime-sized table of at least 2 rows)")
    if self.n_embed_per_ngram % self.n_head_per_ngram:
      _fail(name, "n_embed_per_ngram", self.n_embed_per_ngram,
            f"a multiple of n_head_per_ngram={self.n_head_per_ngram}")
    if not self.layer_ids:
      _fail(name, "layer_ids", self.layer_ids, "at least one layer id")
    if len(set(self.layer_ids)) != len(self.layer_ids):
      _fail(name, "layer_ids", self.layer_ids, "unique layer ids")
    if any((not isinstance(i, int)) or i < 0 for i in self.layer_ids):
      _fail(name, "layer_ids", self.layer_ids, "non-negative integers")
    if not isinstance(self.pad_id, int) or self.pad_id < 0:
      _fail(name, "pad_id", self.pad_id, "a non-negative raw token id")
    if self.gate_norm_eps is not None and not self.gate_norm_eps > 0:
      _fail(name, "gate_norm_eps", self.gate_norm_eps, "None or a positive float")
    if not self.conv_norm_eps > 0:
      _fail(name, "conv_norm_eps", self.conv_norm_eps, "a positive float")
    if self.rows_per_head is not None and (not isinstance(self.rows_per_head, int) or self.rows_per_head < 1):
      _fail(name, "rows_per_head", self.rows_per_head, "None (prime-sized tables) or a positive integer")
    if self.gate not in ("learned", "open"):
      _fail(name, "gate", self.gate, "'learned' or 'open'")

  @property
  def num_orders(self) -> int:
    return self.max_ngram_size - 1

  @property
  def num_heads(self) -> int:
    """Hash heads per layer over all orders."""
    return self.num_orders * self.n_head_per_ngram

  @property
  def head_dim(self) -> int:
    return self.n_embed_per_ngram // self.n_head_per_ngram

  @property
  def d_mem(self) -> int:
    """Width of the concatenated memory vector e (all heads of all orders)."""
    return self.num_orders * self.n_embed_per_ngram

  def validate_for_model(self, num_layers: int, vocab_size: int):
    if any(i >= num_layers for i in self.layer_ids):
      _fail("EngramConfig", "layer_ids", self.layer_ids, f"ids in [0, {num_layers}) (the model has {num_layers} layers)")
    if self.pad_id >= vocab_size:
      _fail("EngramConfig", "pad_id", self.pad_id, f"a token id below the vocabulary size {vocab_size}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Causal self-attention: grouped-query (GQA) or DeepSeek multi-head latent attention (MLA)."""

  # "gqa" or "mla".
  kind: str = "mla"
  # Query heads.
  num_heads: int = 32
  # Key/value heads for GQA (must divide num_heads); ignored by MLA.
  num_kv_heads: int = 8
  # Per-head width for GQA.
  head_dim: int = 128
  # MLA: query low-rank compression rank (0 = full-rank query projection).
  q_lora_rank: int = 0
  # MLA: joint key/value compression rank.
  kv_lora_rank: int = 512
  # MLA: per-head query/key width without RoPE.
  qk_nope_head_dim: int = 128
  # MLA: per-head decoupled RoPE width (shared key across heads).
  qk_rope_head_dim: int = 64
  # MLA: per-head value width.
  v_head_dim: int = 128
  # RoPE base.
  rope_theta: float = 10000.0
  # YaRN context extension factor (1.0 = no scaling).
  rope_scaling_factor: float = 1.0
  # Context length the model was trained at before YaRN scaling.
  rope_original_max_len: int = 4096
  # YaRN ramp boundaries (in rotations over the original context).
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  # Attention kernel: "auto" (cuDNN flash attention through jax.nn.dot_product_attention on GPU
  # when dtype and head width allow, else its XLA version), "xla", "cudnn" (fail if cuDNN cannot
  # take the shapes), or "einsum" (the plain einsum + softmax fallback, for tests and debugging).
  implementation: str = "auto"

  def __post_init__(self):
    name = "AttentionConfig"
    if self.kind not in ("gqa", "mla"):
      _fail(name, "kind", self.kind, "'gqa' or 'mla'")
    _check_positive(self, "num_heads", "num_kv_heads", "head_dim", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim", "rope_original_max_len")
    if self.kind == "gqa" and self.num_heads % self.num_kv_heads:
      _fail(name, "num_kv_heads", self.num_kv_heads, f"a divisor of num_heads={self.num_heads}")
    # RoPE rotates pairs of dimensions, so the rotated width must be even.
    if self.kind == "gqa" and self.head_dim % 2:
      _fail(name, "head_dim", self.head_dim, "an even width (RoPE rotates pairs of dimensions)")
    if self.kind == "mla" and self.qk_rope_head_dim % 2:
      _fail(name, "qk_rope_head_dim", self.qk_rope_head_dim, "an even width (RoPE rotates pairs of dimensions)")
    if not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 0:
      _fail(name, "q_lora_rank", self.q_lora_rank, "0 (no compression) or a positive rank")
    if not self.rope_theta > 1.0:
      _fail(name, "rope_theta", self.rope_theta, "a float > 1.0 (the RoPE wavelength base)")
    if not self.rope_scaling_factor >= 1.0:
      _fail(name, "rope_scaling_factor", self.rope_scaling_factor, "a float >= 1.0")
    if not 0 < self.yarn_beta_slow < self.yarn_beta_fast:
      _fail(name, "yarn_beta_slow/yarn_beta_fast", (self.yarn_beta_slow, self.yarn_beta_fast),
            "0 < yarn_beta_slow < yarn_beta_fast (rotation counts bounding the YaRN ramp)")
    if self.implementation not in ("auto", "xla", "cudnn", "einsum"):
      _fail(name, "implementation", self.implementation, "'auto', 'xla', 'cudnn' or 'einsum'")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """DeepSeekMoE: shared experts plus fine-grained routed experts, aux-loss-free balancing."""

  # Routed experts.
  num_experts: int = 64
  # Experts each token is routed to.
  top_k: int = 6
  # Always-active shared experts (their hidden widths add up).
  num_shared_experts: int = 2
  # Hidden width of one expert's SwiGLU.
  expert_hidden: int = 1408
  # Multiplier on the normalised routing weights.
  route_scale: float = 1.0
  # Step size of the selection-bias update toward uniform load (aux-loss-free balancing).
  bias_update_rate: float = 1e-3
  # Weight of the optional sequence-wise balance loss (0 disables it).
  seq_aux_loss_coef: float = 0.0
  # None = dropless; else tokens per expert = ceil(capacity_factor * tokens * top_k / num_experts).
  capacity_factor: Optional[float] = None
  # Expert-parallel dispatch: "auto" (ragged all-to-all off CPU; traced on a CPU host, chosen per lowering
  # platform, so an export for TPU/GPU gets it: moe.resolve_dispatch), "ragged" or "capacity".
  dispatch: str = "auto"

  def __post_init__(self):
    name = "MoEConfig"
    _check_positive(self, "num_experts", "top_k", "expert_hidden")
    if self.num_shared_experts < 0:
      _fail(name, "num_shared_experts", self.num_shared_experts, "a non-negative integer")
    if self.top_k > self.num_experts:
      _fail(name, "top_k", self.top_k, f"at most num_experts={self.num_experts}")
    if self.capacity_factor is not None and not self.capacity_factor > 0:
      _fail(name, "capacity_factor", self.capacity_factor, "None (dropless) or a positive float")
    if self.dispatch not in ("auto", "ragged", "capacity"):
      _fail(name, "dispatch", self.dispatch, "'auto', 'ragged' or 'capacity'")
    if not self.route_scale > 0:
      _fail(name, "route_scale", self.route_scale, "a positive float")
    if self.bias_update_rate < 0 or self.seq_aux_loss_coef < 0:
      _fail(name, "bias_update_rate/seq_aux_loss_coef", (self.bias_update_rate, self.seq_aux_loss_coef),
            "non-negative floats")


@dataclasses.dataclass(frozen=True)
class MHCConfig:
  """Manifold-constrained hyper-connections (mHC)."""

  # Residual stream copies M (1 = plain pre-norm residual).
  expansion: int = 4
  # Sinkhorn-Knopp iterations projecting the residual mixing onto doubly stochastic matrices.
  sinkhorn_iters: int = 20
  # Initial value of the three learnable gains (alpha) on the token-dependent part of the maps.
  # The dynamic projections start at zero, so at step 0 the maps are their static biases; the
  # gain must be positive or the projections never receive a gradient.
  gain_init: float = 0.01
  # Diagonal of H_res at initialisation (off-diagonal entries share the rest evenly): each stream
  # mostly keeps itself, as in the identity residual. Not nearer 1: Sinkhorn-Knopp converges at
  # rate ((M w - 1) / (M - 1))^2 per iteration near this point: with 20 iterations and logits
  # moved by ~0.1, w = 0.8 stays doubly stochastic to ~5e-6, while w = 0.95 is off by ~1e-3.
  res_init_self_weight: float = 0.8
  # Share of H_pre on one stream, drawn at random per sublayer from the params rng (the rest
  # is split evenly, so the weights sum to 1). Uniform weights would leave the M identical
  # streams interchangeable forever: every gradient would be symmetric in the stream index.
  pre_init_focus: float = 0.5

  def __post_init__(self):
    name = "MHCConfig"
    _check_positive(self, "expansion", "sinkhorn_iters")
    if not (isinstance(self.gain_init, (int, float)) and 0 < self.gain_init < float("inf")):
      _fail(name, "gain_init", self.gain_init, "a positive finite float")
    if not (isinstance(self.res_init_self_weight, (int, float)) and 0 < self.res_init_self_weight < 1):
      _fail(name, "res_init_self_weight", self.res_init_self_weight,
            "a float in (0, 1) (exp + Sinkhorn-Knopp cannot give exactly 0 or 1)")
    if not (isinstance(self.pre_init_focus, (int, float)) and 0 < self.pre_init_focus < 1):
      _fail(name, "pre_init_focus", self.pre_init_focus, "a float in (0, 1) (H_pre is a sigmoid)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The decoder: embeddings, blocks (attention + MLP/MoE, Engram at its layers), LM head."""

  vocab_size: int = 129280
  # Residual width D.
  d_model: int = 2560
  num_layers: int = 30
  # Leading blocks with a dense MLP; the rest use MoE when `moe` is set.
  num_dense_layers: int = 1
  # Hidden width of the dense SwiGLU MLP.
  mlp_hidden: int = 10240
  attention: AttentionConfig = AttentionConfig()
  # None = every block dense.
  moe: Optional[MoEConfig] = MoEConfig()
  # None = no Engram.
  engram: Optional[EngramConfig] = EngramConfig()
  mhc: MHCConfig = MHCConfig()
  # Epsilon of the backbone's RMSNorms.
  norm_eps: float = 1e-6
  # Longest sequence the model is used with.
  max_seq_len: int = 4096
  # Share the token embedding with the LM head.
  tie_embeddings: bool = False
  # Compute dtype ("float32" or "bfloat16"); params are always kept in param_dtype.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Scan homogeneous runs of blocks with nn.scan (faster compiles at depth).
  scan_layers: bool = True
  # Rematerialisation: "none", "full", "dots" (save matmul outputs), "dots_no_batch".
  remat_policy: str = "none"
  # Standard deviation of the backbone's normal initialisation.
  init_std: float = 0.02

  def __post_init__(self):
    name = "ModelConfig"
    _check_positive(self, "vocab_size", "d_model", "num_layers", "mlp_hidden", "max_seq_len")
    if not 0 <= self.num_dense_layers <= self.num_layers:
      _fail(name, "num_dense_layers", self.num_dense_layers, f"an integer in [0, num_layers={self.num_layers}]")
    for field in ("dtype", "param_dtype"):
      if getattr(self, field) not in ("float32", "bfloat16", "float64", "float16"):
        _fail(name, field, getattr(self, field), "'float32', 'bfloat16', 'float16' or 'float64'")
    if self.remat_policy not in ("none", "full", "dots", "dots_no_batch"):
      _fail(name, "remat_policy", self.remat_policy, "'none', 'full', 'dots' or 'dots_no_batch'")
    if self.engram is not None:
      self.engram.validate_for_model(self.num_layers, self.vocab_size)

  def is_moe_layer(self, layer: int) -> bool:
    return self.moe is not None and layer >= self.num_dense_layers

  def has_engram(self, layer: int) -> bool:
    return self.engram is not None and layer in self.engram.layer_ids


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh over axes (data, fsdp, expert, tensor); one -1 takes the remaining devices."""

  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = dataclasses.astuple(self)
    if sum(s == -1 for s in sizes) > 1:
      _fail("MeshConfig", "axes", sizes, "at most one axis of size -1")
    if any(s == 0 or s < -1 for s in sizes):
      _fail("MeshConfig", "axes", sizes, "positive sizes or a single -1")

  def resolve(self, num_devices: int) -> Tuple[int, int, int, int]:
    sizes = list(dataclasses.astuple(self))
    known = 1
    for s in sizes:
      if s != -1:
        known *= s
    if -1 in sizes:
      if num_devices % known:
        _fail("MeshConfig", "axes", tuple(sizes), f"fixed axes whose product ({known}) divides the {num_devices} devices")
      sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
      _fail("MeshConfig", "axes", tuple(sizes), f"a product equal to the {num_devices} available devices")
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Input pipeline: sources, tokenizer, packing and loading (see engram_jax/data.py)."""

  # Training files (a path or a tuple of paths); None = the embedded corpus's train split.
  train_files: Optional[Tuple[str, ...]] = None
  # Held-out files; None = the embedded held-out split when train_files is None too, else no eval split.
  eval_files: Optional[Tuple[str, ...]] = None
  # "auto" (from each file's extension), "text", "jsonl", "parquet" or "arrayrecord".
  format: str = "auto"
  # JSONL key / Parquet column holding a document's text.
  text_field: str = "text"
  # How text files split into documents: "formfeed" (a line holding only U+000C; a file without
  # one is one document) or "line" (each non-empty line is a document).
  text_split: str = "formfeed"
  # tokenizer.json of a Hugging Face `tokenizers` tokenizer; None = the embedded byte-level BPE.
  tokenizer_path: Optional[str] = None
  # Special tokens looked up by text in the tokenizer (bos/eos added per document, pad fills rows).
  bos_token: str = "<bos>"
  eos_token: str = "<eos>"
  pad_token: str = "<pad>"
  # Start every document with bos / end it with eos.
  add_bos: bool = True
  add_eos: bool = True
  # Tokens per packed row T.
  seq_len: int = 128
  # Global batch size in rows (summed over processes; each process loads batch_size / process_count).
  batch_size: int = 8
  # Shuffle documents and packed rows of the train split, reshuffled every epoch.
  shuffle: bool = True
  # Seed of the shuffles (the model has its own seed).
  seed: int = 0
  # Passes over the train split; None = repeat forever (the step count ends training).
  num_epochs: Optional[int] = None
  # The last partial row of an epoch (and the last partial global batch of a finite stream):
  # "pad" it with padding, or "drop" it. The eval split always pads, so no held-out token is lost.
  remainder: str = "pad"
  # Worker processes assembling and hashing batches (grain mp_prefetch); 0 = in this process.
  num_workers: int = 0
  # Batches each worker keeps ready.
  worker_buffer_size: int = 2
  # Threads and buffered batches of grain's in-process read-ahead.
  read_threads: int = 2
  prefetch_batches: int = 4

  def __post_init__(self):
    name = "DataConfig"
    for field in ("train_files", "eval_files"):
      value = getattr(self, field)
      if isinstance(value, str):
        value = (value,)
      if value is not None:
        value = tuple(value)
        if not value or any(not isinstance(v, str) or not v for v in value):
          _fail(name, field, value, "None or a non-empty tuple of file paths")
      object.__setattr__(self, field, value)
    if self.format not in ("auto", "text", "jsonl", "parquet", "arrayrecord"):
      _fail(name, "format", self.format, "'auto', 'text', 'jsonl', 'parquet' or 'arrayrecord'")
    if not isinstance(self.text_field, str) or not self.text_field:
      _fail(name, "text_field", self.text_field, "a non-empty field/column name")
    if self.text_split not in ("formfeed", "line"):
      _fail(name, "text_split", self.text_split, "'formfeed' or 'line'")
    if self.tokenizer_path is not None and (not isinstance(self.tokenizer_path, str) or not self.tokenizer_path):
      _fail(name, "tokenizer_path", self.tokenizer_path, "None (the embedded tokenizer) or a tokenizer.json path")
    for field in ("bos_token", "eos_token", "pad_token"):
      if not isinstance(getattr(self, field), str) or not getattr(self, field):
        _fail(name, field, getattr(self, field), "a non-empty token string")
    _check_positive(self, "seq_len", "batch_size", "worker_buffer_size", "read_threads", "prefetch_batches")
    if self.num_epochs is not None:
      _check_positive(self, "num_epochs")
    if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
      _fail(name, "seed", self.seed, "a non-negative integer")
    if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 0:
      _fail(name, "num_workers", self.num_workers, "a non-negative integer (0 = no worker processes)")
    if self.remainder not in ("pad", "drop"):
      _fail(name, "remainder", self.remainder, "'pad' or 'drop'")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpointing of the train state and the data iterator (see checkpoint.py)."""

  # False: never save and never restore (quick experiments, benchmarks).
  enabled: bool = True
  # Save when step % every_n_steps == 0; forced saves (end of training, preemption) come on top.
  every_n_steps: int = 1000
  # Keep the newest N checkpoints; older ones are deleted after a newer save finalises.
  keep_last_n: int = 3
  # Also keep, forever, every checkpoint whose step is a multiple of K (0 = keep only the last N).
  keep_every_k: int = 0
  # Write in background threads so training continues while tensorstore writes (`async` is a
  # Python keyword, hence the name). Device-to-host copies still finish before `save` returns.
  async_save: bool = True

  def __post_init__(self):
    name = "CheckpointConfig"
    for field in ("enabled", "async_save"):
      if not isinstance(getattr(self, field), bool):
        _fail(name, field, getattr(self, field), "True or False")
    _check_positive(self, "every_n_steps", "keep_last_n")
    if not isinstance(self.keep_every_k, int) or isinstance(self.keep_every_k, bool) or self.keep_every_k < 0:
      _fail(name, "keep_every_k", self.keep_every_k, "0 (off) or a positive number of steps")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and the training loop (paper Table 5: Muon backbone, lr 4e-4, step decay, wd 0.1;
  Engram tables Adam with lr x5 and no weight decay)."""

  # Optimizer steps in the whole run (the schedule's decay points are fractions of this).
  steps: int = 50000
  # Peak learning rate of the backbone (Muon and AdamW groups); Engram tables use it x multiplier.
  learning_rate: float = 4e-4
  # Linear warmup from learning_rate / warmup_steps at step 0 to the peak at step warmup_steps - 1
  # (0 = start at the peak). DeepSeek LLM warms up over 2000 steps.
  warmup_steps: int = 2000
  # After warmup: "step" (DeepSeek LLM's step decay, the paper's scheduler), "cosine" or "constant".
  schedule: str = "step"
  # Step decay: at each fraction of `steps` the rate is multiplied by the matching factor; factors
  # compound, so the defaults give 31.6% of the peak from 80% of training and 10% from 90%.
  decay_boundaries: Tuple[float, ...] = (0.8, 0.9)
  decay_factors: Tuple[float, ...] = (0.316, 0.316)
  # Cosine: the rate at the last step as a fraction of the peak.
  min_lr_ratio: float = 0.1
  # Optimizer of the backbone's weight matrices: "muon" (paper) or "adamw". Embeddings, LM head,
  # norms, biases and other vectors always use AdamW; Engram tables always use Adam.
  backbone_optimizer: str = "muon"
  # Muon: momentum (Nesterov) coefficient and Newton-Schulz iterations.
  muon_momentum: float = 0.95
  muon_ns_steps: int = 5
  # Muon: scale each orthogonalised update to this RMS x sqrt(max(fan_in, fan_out)), so Muon
  # matrices move like AdamW ones and one learning rate serves both (Moonlight's rule; the paper's
  # single 4e-4 implies it). None = Keller Jordan's sqrt(max(1, fan_out / fan_in)) width scaling.
  muon_consistent_rms: Optional[float] = 0.2
  # Adam/AdamW moments and epsilon (DeepSeek-V3 values); shared by the AdamW and Engram groups.
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  adam_eps: float = 1e-8
  # Decoupled weight decay (times the learning rate) of backbone matrices, embeddings and LM head;
  # norms, biases, gains and Engram tables get none.
  weight_decay: float = 0.1
  # Engram tables' learning rate = learning_rate x this (paper: x5).
  engram_lr_multiplier: float = 5.0
  # Clip gradients to this global L2 norm before any optimizer (None = no clipping).
  # Update the Engram tables row-sparsely (lazy Adam on the rows read this step; see
  # memory.sparse_adam_update) so step cost does not grow with table size; False = dense Adam.
  engram_sparse_updates: bool = True
  # Where the Engram tables and their lazy Adam moments live while training: "device" (in the
  # params, on the accelerators), "host" (numpy arrays in host RAM) or "disk" (memory-mapped files
  # under <workdir>/engram_tables, the OS page cache as the RAM tier). With host or disk the host
  # gathers each step's rows ahead of the step and applies the row-sparse Adam update itself
  # (engram_jax/host_training.py); it needs engram_sparse_updates.
  engram_tables: str = "device"
  grad_clip_norm: Optional[float] = 1.0
  # Weight of the z-loss mean(logsumexp(logits)^2) that keeps the softmax normaliser near 1 (0 = off).
  z_loss: float = 0.0
  # Micro-batches whose gradients the train step sums before one optimizer update.
  grad_accum_steps: int = 1
  # Updates with a non-finite gradient are skipped (params and optimizer state unchanged); after
  # this many in a row the optimizer stops skipping so the divergence surfaces (0 = never skip).
  max_consecutive_nonfinite: int = 10
  # Evaluate every N steps (0 = never) and log training metrics every N steps.
  # At most this many held-out batches per in-training evaluation (None = the whole held-out split).
  eval_max_batches: Optional[int] = None
  eval_every: int = 1000
  log_every: int = 50
  # Seed of parameter initialisation and dropout-free step randomness (the data has its own).
  seed: int = 0
  checkpoint: CheckpointConfig = CheckpointConfig()

  def __post_init__(self):
    if self.eval_max_batches is not None:
      _check_positive(self, "eval_max_batches")
    name = "TrainConfig"
    object.__setattr__(self, "decay_boundaries", tuple(self.decay_boundaries))
    object.__setattr__(self, "decay_factors", tuple(self.decay_factors))
    _check_positive(self, "steps", "muon_ns_steps", "grad_accum_steps", "log_every")
    for field in ("warmup_steps", "max_consecutive_nonfinite", "eval_every", "seed"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        _fail(name, field, value, "a non-negative integer")
    if self.warmup_steps > self.steps:
      _fail(name, "warmup_steps", self.warmup_steps, f"at most steps={self.steps}")
    if not self.learning_rate > 0:
      _fail(name, "learning_rate", self.learning_rate, "a positive float")
    if self.schedule not in ("step", "cosine", "constant"):
      _fail(name, "schedule", self.schedule, "'step', 'cosine' or 'constant'")
    if len(self.decay_boundaries) != len(self.decay_factors):
      _fail(name, "decay_factors", self.decay_factors,
            f"one factor per decay boundary ({len(self.decay_boundaries)} boundaries)")
    if any(not 0 < b < 1 for b in self.decay_boundaries) or list(self.decay_boundaries) != sorted(set(self.decay_boundaries)):
      _fail(name, "decay_boundaries", self.decay_boundaries, "increasing fractions of training in (0, 1)")
    if any(not 0 < f <= 1 for f in self.decay_factors):
      _fail(name, "decay_factors", self.decay_factors, "factors in (0, 1]")
    if not 0 <= self.min_lr_ratio <= 1:
      _fail(name, "min_lr_ratio", self.min_lr_ratio, "a fraction in [0, 1]")
    if self.backbone_optimizer not in ("muon", "adamw"):
      _fail(name, "backbone_optimizer", self.backbone_optimizer, "'muon' or 'adamw'")
    for field in ("muon_momentum", "adam_b1", "adam_b2"):
      if not 0 <= getattr(self, field) < 1:
        _fail(name, field, getattr(self, field), "a decay rate in [0, 1)")
    if self.muon_consistent_rms is not None and not self.muon_consistent_rms > 0:
      _fail(name, "muon_consistent_rms", self.muon_consistent_rms, "None or a positive float")
    if not self.adam_eps > 0:
      _fail(name, "adam_eps", self.adam_eps, "a positive float")
    if not self.weight_decay >= 0:
      _fail(name, "weight_decay", self.weight_decay, "a non-negative float")
    if not self.engram_lr_multiplier > 0:
      _fail(name, "engram_lr_multiplier", self.engram_lr_multiplier, "a positive float")
    if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
      _fail(name, "grad_clip_norm", self.grad_clip_norm, "None (no clipping) or a positive float")
    if not self.z_loss >= 0:
      _fail(name, "z_loss", self.z_loss, "a non-negative float")
    if not isinstance(self.checkpoint, CheckpointConfig):
      _fail(name, "checkpoint", self.checkpoint, "a CheckpointConfig")
    if self.engram_tables not in ("device", "host", "disk"):
      _fail(name, "engram_tables", self.engram_tables, "'device', 'host' or 'disk'")
    if self.engram_tables != "device" and not self.engram_sparse_updates:
      _fail(name, "engram_tables", self.engram_tables,
            "'device' when engram_sparse_updates=False (tables off the devices are updated row-sparsely)")


@dataclasses.dataclass(frozen=True)
class Config:
  """One experiment: what `configs/<preset>.py` builds and train.py / eval.py consume."""

  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  # Preset name, for logs and checkpoint metadata.
  name: str = "custom"

  def __post_init__(self):
    if self.data.seq_len > self.model.max_seq_len:
      _fail("Config", "data.seq_len", self.data.seq_len, f"at most model.max_seq_len={self.model.max_seq_len}")


def to_dict(cfg) -> dict:
  """A frozen dataclass tree -> nested plain dicts (tuples stay tuples), e.g. for ConfigDict."""
  if dataclasses.is_dataclass(cfg):
    return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
  return cfg


def _is_str_tuple(hint) -> bool:
  """Whether a field annotation is Tuple[str, ...] (or Optional of it): a list of paths."""
  import typing

  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if typing.get_origin(hint) is typing.Union and len(args) == 1:
    hint = args[0]
  return typing.get_origin(hint) is tuple and typing.get_args(hint) == (str, Ellipsis)


def _split_paths(value):
  """'a.txt,b.txt' or ('a.txt,b.txt',) -> ('a.txt', 'b.txt'): on the command line a tuple of paths
  is written comma-separated (ml_collections parses the override of a str placeholder as one
  string, and of a tuple as a one-element tuple)."""
  parts = value.split(",") if isinstance(value, str) else [p for v in value for p in
                                                           (v.split(",") if isinstance(v, str) else [v])]
  return tuple(p.strip() if isinstance(p, str) else p for p in parts if not isinstance(p, str) or p.strip())


def from_dict(cls, values, path: str = ""):
  """Nested dicts (or a ConfigDict) -> the frozen dataclass tree of type `cls`, validated on the way.

  Unknown keys are errors naming the key and the fields `cls` has. A tuple-of-paths field
  (`data.train_files`, `data.eval_files`) given as a comma-separated string is split at the commas.
  A field's validation error names the command-line override that sets it (`path` is where `cls`
  sits in the Config: "train" for TrainConfig).
  """
  import typing

  if values is None:
    return None
  if hasattr(values, "to_dict"):
    values = values.to_dict()
  if dataclasses.is_dataclass(values):
    return values
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(values) - names
  if unknown:
    raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}; fields are {sorted(names)}")
  kwargs = {}
  for key, value in values.items():
    hint = hints[key]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    target = hint if dataclasses.is_dataclass(hint) else (args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None)
    if target is not None and isinstance(value, dict):
      value = from_dict(target, value, f"{path}.{key}" if path else key)
    elif _is_str_tuple(hint) and isinstance(value, (str, list, tuple)):
      value = _split_paths(value)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[key] = value
  try:
    return cls(**kwargs)
  except ValueError as e:
    field = str(e).partition("=")[0].partition(f"{cls.__name__}.")[2]
    if path and field in names:
      raise ValueError(f"{e} (set with --config.{path}.{field})") from None
    raise


# Preset variants, chosen as `--config configs/<preset>.py:<variant>[,<variant>...]`: switches that
# remove a component (ml_collections cannot override a sub-config to None on the command line).
VARIANTS = {
    "no_engram": lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, engram=None)),
    "dense": lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, moe=None)),
}


def apply_variants(cfg: Config, variants: Optional[str]) -> Config:
  for name in filter(None, (variants or "").split(",")):
    if name not in VARIANTS:
      _fail("Config", "variant", name, f"one of {sorted(VARIANTS)}")
    cfg = VARIANTS[name](cfg)
  return cfg


def _placeholder_type(hint):
  """The ml_collections field type of an Optional[...] field's placeholder, or None for an optional
  sub-config (a dataclass: removed with a preset variant, not overridable)."""
  import typing

  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if len(args) != 1 or dataclasses.is_dataclass(args[0]):
    return None
  if _is_str_tuple(hint):
    return str  # comma-separated on the command line; from_dict splits it
  return typing.get_origin(args[0]) or args[0]


def _overridable(cfg):
  """to_dict, except that an Optional field holding None becomes a typed ml_collections placeholder,
  so `--config.data.train_files=a.txt` (or `data.num_epochs`, `data.tokenizer_path`, ...) can set it:
  a plain None would make ml_collections refuse any override of that field."""
  import typing

  from ml_collections import config_dict as mlc

  hints = typing.get_type_hints(type(cfg))
  out = {}
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if dataclasses.is_dataclass(value):
      out[f.name] = _overridable(value)
    elif value is None and _placeholder_type(hints[f.name]) is not None:
      out[f.name] = mlc.placeholder(_placeholder_type(hints[f.name]))
    else:
      out[f.name] = value
  return out


def config_dict(cfg: Config, variants: Optional[str] = None):
  """The ml_collections.ConfigDict that presets return, so `--config.a.b=v` overrides work (the
  dataclasses are frozen; train.py turns the overridden dict back into them with `from_dict`).
  Fields that default to None are typed placeholders, so they can be set too."""
  import ml_collections

  return ml_collections.ConfigDict(_overridable(apply_variants(cfg, variants)))


def load_preset(path: str) -> Config:
  """Runs a preset file's `get_config()` and returns the validated Config (`path:variant` works too)."""
  import importlib.util
  import os

  path, _, variants = path.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config preset {path!r} does not exist (expected a file like configs/tiny.py)")
  import sys

  # Presets import each other as `configs.<name>`: make the folder holding configs/ importable.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f"engram_preset_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config preset {path!r} defines no get_config()")
  return from_dict(Config, module.get_config(variants or None))
