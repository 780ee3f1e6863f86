"""Model families, one file each, beside the paper's decoder.

- `engram_jax.model` (not moved here, so saved checkpoints and every caller keep their imports): the
  paper's decoder (MLA or GQA attention, DeepSeekMoE, mHC) with Engram layers hashed by the official
  demo's recipe (`hashing.demo_recipe`).
- `engram_jax.models.qwen4exp`: Qwen3.8-Flash-Next (architecture `Qwen4Exp`), imported from Hugging
  Face: GatedDeltaNet and QSA-indexed attention layers, gated-residual hyper-connections, a softmax
  MoE with a gated shared expert, and one PLE layer whose rows are hashed by `hashing.ple_recipe`.
  `qwen4exp_convert` maps a `save_pretrained` directory onto its params and tables.

What the families share lives outside this package and is family-blind: the tables and how rows are
read (`memory`, `tables/`), the hashing mechanism (`hashing`: a family brings a recipe), the sharding
rules (`sharding`) and the layers both use (`engram.causal_depthwise_conv`, `layers.apply_rope`,
`moe.routed_experts`). A family's file reads top to bottom as its whole forward and consumes table
rows given to it; it never holds a table.
"""
