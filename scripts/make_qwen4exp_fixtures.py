"""Make the PyTorch reference fixtures for the Qwen4Exp (Qwen3.8-Flash-Next) family.

The fixtures in ``tests/fixtures/qwen4exp/`` are produced by running the reference implementation in
Hugging Face ``transformers`` (``transformers/models/qwen4_exp``) on tiny random configurations. The
engram_jax test suite only reads the saved files; it never needs torch.

How to run (a separate virtual environment, NOT engram_jax's; CPU torch is enough)::

    python3 -m venv VENV
    VENV/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors numpy tokenizers
    VENV/bin/python scripts/make_qwen4exp_fixtures.py            # writes tests/fixtures/qwen4exp/
    VENV/bin/python scripts/make_qwen4exp_fixtures.py --cases causal_l3i1 --out /some/dir

``flash-linear-attention`` (``fla``) and ``causal-conv1d`` must NOT be installed in that environment:
when importable, transformers replaces the pure-torch GatedDeltaNet and causal-conv code with their
kernels. The script refuses to run if either is importable. Everything runs in float32 on one CPU
thread, with eager attention and the eager (per-expert loop) MoE.

What it does per case (see ``tests/fixtures/qwen4exp/README.md`` for every array):

1. Builds the model from a tiny config and RE-RANDOMISES the parameters that ``_init_weights`` leaves
   degenerate (all ``1+w`` RMSNorm weights are zero there, the PLE conv is zero, the rest has std 0.02),
   so that every code path contributes.
2. ``save_pretrained`` with a small shard size (several safetensors shards plus the index; the PLE
   table as ``split_ngram_parts`` shards), a byte-level BPE ``tokenizer.json`` whose special tokens
   sit at the end of the vocabulary, and reloads the directory with ``from_pretrained`` (eager
   attention and experts), checking that every tensor survives the round trip bit for bit.
3. Runs on the reloaded model: a prefill of a padded batch with EOS inside sequences (hooks record
   per-layer streams, sublayer outputs, PLE hash ids, router and QSA indexer selections), single-token
   decode steps on the model's own cache after a prefill, greedy ``generate``, and for the case marked
   ``grads`` the loss with labels and torch autograd gradients of every parameter.
4. Checks top-k margins (router probabilities, indexer block scores, greedy argmax) and searches
   seeds until every margin on real (non-padding) positions is above the thresholds in ``GAPS``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("USE_HUB_KERNELS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

for _pkg in ("fla", "causal_conv1d"):
    if importlib.util.find_spec(_pkg) is not None:
        sys.exit(f"'{_pkg}' is importable: it would replace the reference torch code paths. Use an environment without it.")

import numpy as np
import torch
import transformers
import transformers.cache_utils
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen4ExpConfig,
    Qwen4ExpForCausalLM,
    Qwen4ExpForConditionalGeneration,
    Qwen4ExpTextConfig,
)
from transformers.models.qwen4_exp import modeling_qwen4_exp as qm

torch.set_num_threads(1)

TORCH_VERSION_WANTED = "2.13.0"
TRANSFORMERS_VERSION_WANTED = "5.23.0"

# Margins every top-k / argmax decision must clear on real (non-padding) positions. The router
# margin is taken in logits: the k-th minus (k+1)-th logit equals the log-ratio of the two softmax
# probabilities, which is what float32 noise has to overcome (an absolute probability gap can be
# tiny between two small probabilities whose order is still robust). The probability gap is still
# recorded in meta.json.
GAPS = {
    "router_logit": 5e-4,  # k-th minus (k+1)-th router logit
    "indexer_score": 1e-3,  # k-th minus (k+1)-th QSA block score (scores are O(1))
    "argmax_logit": 3e-3,  # top-1 minus top-2 logit of every greedy generate step
    # gradient case only: smallest |PLE gate score| before sign(s)*sqrt(|s|). The derivative of the
    # signed square root is 1/(2 sqrt|s|), so a score near 0 turns float32 rounding of s into a large
    # relative error of the gradients that flow through it (3.5e-4 gave 5e-4 relative error).
    "ple_gate_abs": 3e-3,
}

# ---------------------------------------------------------------------------------------------
# Tokenizer: a tiny byte-level BPE trained here on fixed text, special tokens appended at the end
# of the vocabulary (like the released model, whose end-of-text id is near the top).

TOKENIZER_TEXT = """\
The river runs past the old mill, and the mill wheel turns slowly in the morning light.
A small boat drifts along the bank while two children watch from the bridge above the water.
Every spring the valley fills with flowers: red, yellow and white, from the hills to the road.
The baker opens the shop at six; the bread is warm, the coffee is strong, the street is quiet.
Numbers matter too: 1, 2, 3, 10, 42, 100 and 2026 appear in the ledger next to the names.
She wrote the letter twice, then read it aloud, then folded it and put it in the drawer.
When the train arrived, the station was empty except for a dog sleeping under the bench.
Questions are easy to ask and hard to answer; answers are easy to give and hard to trust.
The library keeps maps of the coast, records of the harbour, and notes on the weather.
He counted the steps to the tower: one hundred and twelve, each worn smooth in the middle.
Rain fell on the roof all night, and by the morning the garden was green and bright again.
The market sells apples, pears, plums, cheese, honey, salt, rope, nails and paper.
If the wind turns west, the boats come home early; if it turns north, they stay at sea.
"""

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TOKENIZER_TRAIN_VOCAB = 352  # ids 0..351 regular (256 bytes + merges), then EOS = 352, PAD = 353


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_TRAIN_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_TEXT.splitlines(), trainer=trainer)
    if tok.get_vocab_size() != TOKENIZER_TRAIN_VOCAB:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, expected {TOKENIZER_TRAIN_VOCAB}")
    tok.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    return tok


# ---------------------------------------------------------------------------------------------
# Cases


def _text_cfg(**kw):
    base = dict(
        hidden_act="silu",
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.02,
        attention_bias=False,
        linear_conv_kernel_dim=4,
        ple_conv_kernel_size=4,
        make_ngram_vocab_size_divisible_by=128,
        norm_topk_prob=True,
        max_position_embeddings=4096,
    )
    base.update(kw)
    return base


CASES = {
    # The real model's pattern (3 GatedDeltaNet : 1 QSA), PLE at one-based layer 2, ngram 3, hc 4.
    # The gradient case.
    "causal_l3i1": dict(
        arch="Qwen4ExpForCausalLM",
        seeds=list(range(1000, 1080)),
        seq_len=32,
        decode_steps=8,
        gen_new_tokens=10,
        grads=True,
        text=_text_cfg(
            vocab_size=384,
            hidden_size=32,
            num_hidden_layers=4,
            layer_types=["linear_attention", "linear_attention", "linear_attention", "indexed_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            hc_count=4,
            hc_lowrank=8,
            ple_layer_ids=[2],
            ple_embed_dim=32,
            ngram_size=3,
            heads_per_ngram=4,
            ngram_vocab_size_base=257,
            seed=1234,
            split_ngram_parts=4,
            indexer_n_heads=4,
            indexer_kv_heads=1,
            indexer_head_dim=16,
            indexer_budget=4,
            indexer_compress_ratio=2,
        ),
    ),
    # Attention first, two PLE layers (one-based 2 and 5, the second after an indexed layer),
    # ngram_size 4, hc_count 2, sigmoid GDN output gate, nk == nv, ple_embed_dim != hidden_size,
    # T = 68 so the chunked delta rule (chunk 64) runs over two chunks, uneven table shards.
    "causal_i1l2i1l1_ng4": dict(
        arch="Qwen4ExpForCausalLM",
        seeds=list(range(2000, 2060)),
        seq_len=68,
        decode_steps=6,
        gen_new_tokens=8,
        grads=False,
        text=_text_cfg(
            vocab_size=416,
            hidden_size=32,
            num_hidden_layers=5,
            layer_types=[
                "indexed_attention",
                "linear_attention",
                "linear_attention",
                "indexed_attention",
                "linear_attention",
            ],
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.25},
            linear_key_head_dim=8,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            output_gate_type="sigmoid",
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=12,
            shared_expert_intermediate_size=16,
            hc_count=2,
            hc_lowrank=6,
            ple_layer_ids=[2, 5],
            ple_embed_dim=48,
            ngram_size=4,
            heads_per_ngram=2,
            ngram_vocab_size_base=301,
            seed=77,
            split_ngram_parts=3,
            indexer_n_heads=12,
            indexer_kv_heads=1,
            indexer_head_dim=8,
            indexer_budget=8,
            indexer_compress_ratio=4,
        ),
    ),
    # The released multimodal class (text model under model.language_model.), a 1-block vision tower.
    # PLE on the very first layer, ngram_size 2 (bigrams only), 8 heads per order, hc_count 3.
    "condgen_l1i1l1i1_ng2": dict(
        arch="Qwen4ExpForConditionalGeneration",
        seeds=list(range(3000, 3060)),
        seq_len=40,
        decode_steps=8,
        gen_new_tokens=10,
        grads=False,
        vision=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            patch_size=2,
            num_position_embeddings=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        text=_text_cfg(
            vocab_size=448,
            hidden_size=32,
            num_hidden_layers=4,
            layer_types=["linear_attention", "indexed_attention", "linear_attention", "indexed_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [1, 1, 0],
                "mrope_interleaved": True,
            },
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_num_key_heads=1,
            linear_num_value_heads=3,
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
            hc_count=3,
            hc_lowrank=4,
            ple_layer_ids=[1],
            ple_embed_dim=64,
            ngram_size=2,
            heads_per_ngram=8,
            ngram_vocab_size_base=150,
            seed=1234,
            split_ngram_parts=5,
            indexer_n_heads=8,
            indexer_kv_heads=1,
            indexer_head_dim=8,
            indexer_budget=6,
            indexer_compress_ratio=2,
        ),
    ),
}

PROMPT_TEXTS = [
    "The river runs past the old mill, and the children watch the boat from the bridge. "
    "Rain fell on the roof all night and the garden was green again by the morning.",
    "Numbers matter too: 1, 2, 3, 10, 42, 100 and 2026 appear in the ledger next to the names "
    "of the bakers, the boats and the station dog sleeping under the bench.",
    "If the wind turns west, the boats come home early. She wrote the letter twice, then read it "
    "aloud, and put it in the drawer with the maps of the coast.",
]


# ---------------------------------------------------------------------------------------------
# Model construction and re-randomisation


def make_config(case):
    text = dict(case["text"])
    tok_len = TOKENIZER_TRAIN_VOCAB + 2
    text["eos_token_id"] = TOKENIZER_TRAIN_VOCAB
    text["pad_token_id"] = TOKENIZER_TRAIN_VOCAB + 1
    assert text["vocab_size"] >= tok_len
    if case["arch"] == "Qwen4ExpForCausalLM":
        cfg = Qwen4ExpTextConfig(**text)
        cfg.architectures = ["Qwen4ExpForCausalLM"]
        return cfg
    vision = dict(case["vision"])
    vision["out_hidden_size"] = text["hidden_size"]
    v = text["vocab_size"]
    cfg = Qwen4ExpConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=v - 4,
        video_token_id=v - 3,
        vision_start_token_id=v - 2,
        vision_end_token_id=v - 1,
        tie_word_embeddings=False,
    )
    cfg.architectures = ["Qwen4ExpForConditionalGeneration"]
    return cfg


def model_class(case):
    return Qwen4ExpForCausalLM if case["arch"] == "Qwen4ExpForCausalLM" else Qwen4ExpForConditionalGeneration


def text_model(model):
    return model.model if isinstance(model, Qwen4ExpForCausalLM) else model.model.language_model


def text_config(model):
    return model.config if isinstance(model, Qwen4ExpForCausalLM) else model.config.text_config


@torch.no_grad()
def rerandomise(model, seed):
    """Give every text-model parameter a non-degenerate random value (seeded)."""
    g = torch.Generator().manual_seed(seed + 7919)

    def normal_(p, std, mean=0.0):
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul(std).add(mean).to(p.dtype))

    tm = text_model(model)
    for name, mod in tm.named_modules():
        if isinstance(mod, qm.Qwen4ExpTextRMSNorm):
            normal_(mod.weight, 0.3)  # exercised as (1 + w)
        elif isinstance(mod, qm.Qwen4ExpTextRMSNormGated):
            normal_(mod.weight, 0.3, mean=1.0)  # used directly
        elif isinstance(mod, qm.Qwen4ExpTextPLELayer):
            normal_(mod.conv1d.weight, 0.3)
            normal_(mod.key_proj.weight, 1.0 / math.sqrt(mod.key_proj.in_features))
            normal_(mod.value_proj.weight, 1.0 / math.sqrt(mod.value_proj.in_features))
            normal_(mod.ple_embedding.ngram_embedding.weight, 1.0)
        elif isinstance(mod, qm.Qwen4ExpTextGatedDeltaNet):
            normal_(mod.conv1d.weight, 0.5)
            a = torch.rand(mod.A_log.shape, generator=g, dtype=torch.float64) * 1.95 + 0.05
            mod.A_log.copy_(a.log().to(mod.A_log.dtype))
            normal_(mod.dt_bias, 0.5)
        elif isinstance(mod, qm.Qwen4ExpTextExperts):
            normal_(mod.gate_up_proj, 1.0 / math.sqrt(mod.hidden_dim))
            normal_(mod.down_proj, 1.0 / math.sqrt(mod.intermediate_dim))
        elif isinstance(mod, qm.Qwen4ExpTextTopKRouter):
            normal_(mod.weight, 4.0 / math.sqrt(mod.hidden_dim))
        elif isinstance(mod, torch.nn.Embedding) and name == "embed_tokens":
            normal_(mod.weight, 1.0)
    for name, mod in tm.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith(("ple.key_proj", "ple.value_proj")):
            normal_(mod.weight, 1.0 / math.sqrt(mod.in_features))
    lm = model.lm_head
    normal_(lm.weight, 1.0 / math.sqrt(lm.in_features))


# ---------------------------------------------------------------------------------------------
# Recording


def np32(t):
    # copy: .numpy() shares memory with the tensor, and cache states are later updated in place
    return t.detach().to(torch.float32).cpu().numpy().copy()


class Recorder:
    """Forward hooks on the text model; `records` is filled on every forward."""

    def __init__(self, model):
        self.model = model
        self.tm = text_model(model)
        self.cfg = text_config(model)
        self.records: dict[str, list] = {}
        self.handles = []
        hc, hdim = self.cfg.hc_count, self.cfg.hidden_size
        self.hc, self.hdim = hc, hdim

        def put(key, value):
            self.records.setdefault(key, []).append(value)

        self.put = put
        self._add(self.tm.embed_tokens, lambda m, a, o: put("embeds", o.detach().clone()))
        self._add(self.tm.hyper_connection_mixer, lambda m, a, o: put("final_hidden", o.detach().clone()))
        for i, layer in enumerate(self.tm.layers):
            p = f"layer{i}/"
            self._add(layer, lambda m, a, o, p=p: put(p + "out", o.detach().clone()))
            self._add(layer.attn_hyper_connection, self._hc_hook(p + "attn_hc_"))
            self._add(layer.mlp_hyper_connection, self._hc_hook(p + "mlp_hc_"))
            if layer.layer_type == "linear_attention":
                self._add(layer.linear_attn, lambda m, a, o, p=p: put(p + "mixer_out", o.detach().clone()))
            else:
                self._add(layer.self_attn, lambda m, a, o, p=p: put(p + "mixer_out", o[0].detach().clone()))
                self._add(layer.self_attn.indexer, self._indexer_hook(p, layer.self_attn.indexer))
            self._add(layer.mlp, lambda m, a, o, p=p: put(p + "moe_out", o.detach().clone()))
            self._add(layer.mlp.gate, self._router_hook(p, layer.mlp.gate))
            if layer.ple is not None:
                self._add(layer.ple, self._ple_hook(p))
                self._add(layer.ple.ple_embedding, lambda m, a, o, p=p: put(p + "ple_emb", o.detach().clone()))
                self.handles.append(
                    layer.ple.ple_embedding.ngram_embedding.register_forward_pre_hook(
                        lambda m, a, p=p: put(p + "ple_ids", a[0].detach().clone())
                    )
                )
                self.handles.append(
                    layer.ple.norm_conv.register_forward_pre_hook(
                        lambda m, a, p=p: put(p + "ple_gated_value", a[0].detach().clone())
                    )
                )

    def _add(self, mod, fn):
        self.handles.append(mod.register_forward_hook(fn))

    def _ple_hook(self, p):
        """Record the PLE output and recompute the gate score before the signed square root."""

        def fn(m, args, out):
            self.put(p + "ple_out", out.detach().clone())
            with torch.no_grad():
                emb = self.records[p + "ple_emb"][-1]
                kn = m.norm_key(m.key_proj(emb)).unflatten(-1, (m.hc_count, m.hidden_size))
                qn = m.norm_query(args[0]).unflatten(-1, (m.hc_count, m.hidden_size))
                self.put(p + "ple_gate_score", (kn * qn).sum(dim=-1) / math.sqrt(m.hidden_size))

        return fn

    def _hc_hook(self, p):
        def fn(m, a, o):  # returns None: a hook's return value would replace the module output
            self.put(p + "x", o[0].detach().clone())
            self.put(p + "w", o[2].detach().clone())

        return fn

    def _router_hook(self, p, gate):
        def fn(m, a, o):
            logits, weights, idx = o
            self.put(p + "router_logits", logits.detach().clone())
            self.put(p + "router_weights", weights.detach().clone())
            self.put(p + "router_idx", idx.detach().clone())

        return fn

    def _indexer_hook(self, p, indexer):
        """Recompute the block scores the indexer ranked (same ops, vectorised per query) to record
        the scores, the chosen blocks and the top-k margins; check the mask against the module's."""

        def fn(m, args, out):
            hidden, (full_cos, full_sin), mask, cache = args
            with torch.no_grad():
                bsz, t, _ = hidden.shape
                ihd, c, k = m.index_head_dim, m.compress_ratio, m.block_topk
                qk = m.index_qk_proj(hidden)
                q, raw = torch.split(qk, [m.index_n_heads * ihd, m.index_kv_heads * ihd], dim=-1)
                q = q.reshape(bsz, t, -1, ihd)
                raw = raw.reshape(bsz, t, -1, ihd).squeeze(2)
                q = m.q_layernorm(q)
                q = qm.apply_rotary_pos_emb(q, cos=full_cos[:, -t:], sin=full_sin[:, -t:], unsqueeze_dim=2)
                if cache is not None:
                    raw_all = cache.layers[m.layer_idx].indexer_keys
                else:
                    raw_all = raw
                visible = mask if mask.dtype == torch.bool else mask == 0
                s_len = mask.shape[-1]
                max_blocks = s_len // c
                scores_out = torch.full((bsz, t, max_blocks), float("-inf"))
                chosen = torch.full((bsz, t, k), -1, dtype=torch.int32)
                gaps = torch.full((bsz, t), float("inf"))
                rebuilt = torch.zeros((bsz, t, s_len), dtype=torch.bool)
                for b in range(bsz):
                    for qi in range(t):
                        vis = torch.nonzero(visible[b, 0, qi]).flatten()
                        nblk = vis.numel() // c
                        sel = []
                        if nblk > 0:
                            blocks = vis[: nblk * c].view(nblk, c)
                            pooled = raw_all[b].index_select(0, blocks.flatten()).view(nblk, c, ihd)
                            pooled = m.k_layernorm(pooled.float().mean(dim=1).to(raw_all.dtype))
                            kb = qm.apply_rotary_pos_emb(
                                pooled.unsqueeze(1),
                                cos=full_cos[b].index_select(0, blocks[:, 0]),
                                sin=full_sin[b].index_select(0, blocks[:, 0]),
                            ).squeeze(1)
                            sc = torch.matmul(q[b, qi].float(), kb.float().transpose(-1, -2)).transpose(-1, -2)
                            sc = torch.relu(sc).sum(dim=-1) / math.sqrt(ihd)
                            scores_out[b, qi, :nblk] = sc
                            top = sc.topk(min(k, nblk)).indices
                            chosen[b, qi, : top.numel()] = torch.sort(top).values.to(torch.int32)
                            if nblk > k:
                                srt = torch.sort(sc, descending=True).values
                                gaps[b, qi] = float(srt[k - 1] - srt[k])
                            sel.append(blocks.index_select(0, top).flatten())
                        sel.append(vis[nblk * c :])
                        sel = torch.cat(sel)
                        rebuilt[b, qi, sel] = True
                if not torch.equal(rebuilt, out[:, 0]):
                    raise RuntimeError("recomputed QSA selection differs from the module's mask")
            self.put(p + "idx_mask", out[:, 0].detach().clone())
            self.put(p + "idx_scores", scores_out)
            self.put(p + "idx_blocks", chosen)
            self.put(p + "idx_gap", gaps)

        return fn

    def clear(self):
        self.records = {}

    def remove(self):
        for h in self.handles:
            h.remove()


def router_gaps(logits, k):
    """k-th minus (k+1)-th router probability and logit, per token. logits [N, E]."""
    probs = torch.softmax(logits.float(), dim=-1)
    sp = torch.sort(probs, dim=-1, descending=True).values
    sl = torch.sort(logits.float(), dim=-1, descending=True).values
    if k >= logits.shape[-1]:
        inf = torch.full(logits.shape[:-1], float("inf"))
        return inf, inf
    return sp[..., k - 1] - sp[..., k], sl[..., k - 1] - sl[..., k]


def argmax_gap(logits):
    s = torch.sort(logits.float(), dim=-1, descending=True).values
    return s[..., 0] - s[..., 1]


# ---------------------------------------------------------------------------------------------
# Inputs


def make_inputs(tok, case, eos, pad):
    t = case["seq_len"]
    rows = []
    for text in PROMPT_TEXTS:
        ids = tok.encode(text).ids
        while len(ids) < t:
            ids = ids + ids
        rows.append(ids[:t])
    ids = torch.tensor(rows, dtype=torch.long)
    mask = torch.ones_like(ids)
    # Row 0: one EOS, then two consecutive EOS. Row 1: EOS at position 1 and at the very end.
    ids[0, 9] = eos
    ids[0, 20] = eos
    ids[0, 21] = eos
    ids[1, 1] = eos
    ids[1, t - 1] = eos
    # Row 2: EOS inside, right padding (7 pads) with attention_mask 0.
    ids[2, 5] = eos
    npad = 7
    ids[2, t - npad :] = pad
    mask[2, t - npad :] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# One run of a case with a given seed


def build_and_save(case, seed, tok, hf_dir: Path):
    cfg = make_config(case)
    torch.manual_seed(seed)
    cls = model_class(case)
    model = cls._from_config(cfg, attn_implementation="eager", experts_implementation="eager")
    rerandomise(model, seed)
    model.eval()
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    model.save_pretrained(hf_dir, max_shard_size="64KB")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    fast.save_pretrained(hf_dir)
    loaded = cls.from_pretrained(hf_dir, attn_implementation="eager", experts_implementation="eager")
    loaded.eval()
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    if set(sd0) != set(sd1) or not all(torch.equal(sd0[k], sd1[k]) for k in sd0):
        raise RuntimeError("save_pretrained / from_pretrained round trip changed tensors")
    tc = text_config(loaded)
    assert tc._attn_implementation == "eager" and tc._experts_implementation == "eager"
    return loaded


def stack_steps(recs, key):
    return torch.stack([r for r in recs[key]], dim=0)


def run_case(name, case, seed, tok, hf_dir: Path):
    model = build_and_save(case, seed, tok, hf_dir)
    cfg = text_config(model)
    eos, pad = cfg.eos_token_id, cfg.pad_token_id
    hc, hdim = cfg.hc_count, cfg.hidden_size
    k_route = cfg.num_experts_per_tok
    ids, mask = make_inputs(tok, case, eos, pad)
    bsz, t = ids.shape
    valid = mask.bool()
    out: dict[str, np.ndarray] = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)}
    gaps = {}
    sites: dict[str, list] = {}

    def upd_gap(key, values, where, keep=None):
        """Track the smallest margin of a kind, and where it is (index into `values`' shape)."""
        v = values.detach().float()
        if keep is not None:
            v = v.masked_fill(~keep, float("inf"))
        if v.numel() == 0:
            return
        flat = v.flatten()
        i_min = int(flat.argmin())
        m = float(flat[i_min])
        gaps[key] = min(gaps.get(key, float("inf")), m)
        loc = [int(x) for x in np.unravel_index(i_min, tuple(v.shape))]
        sites.setdefault(key, []).append({"gap": m, "where": where, "index": loc})

    rec = Recorder(model)
    tm = text_model(model)

    # ---- prefill of the padded batch
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, use_cache=False)
    r = rec.records
    out["logits"] = np32(res.logits)
    out["embeds"] = np32(r["embeds"][0])
    out["final_hidden"] = np32(r["final_hidden"][0])
    for i, layer in enumerate(tm.layers):
        p = f"layer{i}/"
        out[p + "out"] = np32(r[p + "out"][0]).reshape(bsz, t, hc, hdim)
        out[p + "attn_hc_x"] = np32(r[p + "attn_hc_x"][0])
        out[p + "attn_hc_w"] = np32(r[p + "attn_hc_w"][0])
        out[p + "mlp_hc_x"] = np32(r[p + "mlp_hc_x"][0])
        out[p + "mlp_hc_w"] = np32(r[p + "mlp_hc_w"][0])
        out[p + "mixer_out"] = np32(r[p + "mixer_out"][0])
        out[p + "moe_out"] = np32(r[p + "moe_out"][0])
        lg = r[p + "router_logits"][0].reshape(bsz, t, -1)
        out[p + "router_logits"] = np32(lg)
        out[p + "router_idx"] = r[p + "router_idx"][0].reshape(bsz, t, -1).numpy().astype(np.int32)
        out[p + "router_weights"] = np32(r[p + "router_weights"][0].reshape(bsz, t, -1))
        gp, gl = router_gaps(lg, k_route)
        upd_gap("router_prob", gp, f"prefill {p}router [row, position]", valid)
        upd_gap("router_logit", gl, f"prefill {p}router [row, position]", valid)
        upd_gap("router_prob_padding_positions", gp, f"prefill {p}router [row, position]", ~valid)
        if layer.layer_type == "indexed_attention":
            out[p + "idx_mask"] = r[p + "idx_mask"][0].numpy().astype(np.uint8)
            out[p + "idx_scores"] = np32(r[p + "idx_scores"][0])
            out[p + "idx_blocks"] = r[p + "idx_blocks"][0].numpy()
            g = r[p + "idx_gap"][0]
            upd_gap("indexer_score", g, f"prefill {p}indexer [row, query]", valid)
            upd_gap("indexer_score_padding_positions", g, f"prefill {p}indexer [row, query]", ~valid)
        if layer.ple is not None:
            out[p + "ple_ids"] = r[p + "ple_ids"][0].numpy().astype(np.int64)
            out[p + "ple_emb"] = np32(r[p + "ple_emb"][0])
            out[p + "ple_gated_value"] = np32(r[p + "ple_gated_value"][0]).reshape(bsz, t, hc, hdim)
            out[p + "ple_out"] = np32(r[p + "ple_out"][0]).reshape(bsz, t, hc, hdim)
            gs = r[p + "ple_gate_score"][0]
            out[p + "ple_gate_score"] = np32(gs)
            if case["grads"]:
                upd_gap("ple_gate_abs", gs.abs(), f"prefill {p}ple gate [row, position, stream]", valid[..., None].expand_as(gs))

    # ---- loss (every case) and gradients (the case marked grads)
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad(set_to_none=True)
    rec.clear()
    with torch.enable_grad():
        res_l = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        loss = res_l.loss
        if case["grads"]:
            loss.backward()
    out["loss_labels"] = labels.numpy().astype(np.int64)
    out["loss"] = np.array(float(loss.detach()), dtype=np.float32)
    grad_notes = {}
    if case["grads"]:
        grad_notes = save_grads(model, out)
    model.zero_grad(set_to_none=True)

    # ---- decode: prefill rows 0 and 1 (no padding) on the model's own cache, then single tokens
    nd = case["decode_steps"]
    t0 = t - nd
    dec_ids = ids[:2]
    rec.clear()
    with torch.no_grad():
        pre = model(input_ids=dec_ids[:, :t0], use_cache=True)
    cache = pre.past_key_values
    out["decode/prompt_ids"] = dec_ids[:, :t0].numpy().astype(np.int64)
    out["decode/step_ids"] = dec_ids[:, t0:].numpy().astype(np.int64)
    out["decode/prefill_last_logits"] = np32(pre.logits[:, -1])
    save_cache(cache, model, out, "decode/cache_after_prefill/")
    step_logits = []
    rec.clear()
    for s in range(nd):
        with torch.no_grad():
            st = model(input_ids=dec_ids[:, t0 + s : t0 + s + 1], past_key_values=cache, use_cache=True)
        cache = st.past_key_values
        step_logits.append(st.logits[:, -1])
    r = rec.records
    step_logits = torch.stack(step_logits, dim=1)  # [2, nd, V]
    out["decode/step_logits"] = np32(step_logits)
    for i, layer in enumerate(tm.layers):
        p = f"layer{i}/"
        out["decode/" + p + "out"] = np32(torch.cat(r[p + "out"], dim=1)).reshape(2, nd, hc, hdim)
        lg = torch.stack([x for x in r[p + "router_logits"]], dim=1)  # [2, nd, E]
        out["decode/" + p + "router_idx"] = torch.stack(r[p + "router_idx"], dim=1).reshape(2, nd, -1).numpy().astype(np.int32)
        gp, gl = router_gaps(lg, k_route)
        upd_gap("router_prob", gp, f"decode {p}router [row, step]")
        upd_gap("router_logit", gl, f"decode {p}router [row, step]")
        if layer.layer_type == "indexed_attention":
            s_max = t
            m = np.zeros((2, nd, s_max), dtype=np.uint8)
            for s, mk in enumerate(r[p + "idx_mask"]):
                m[:, s, : mk.shape[-1]] = mk[:, 0].numpy()
            out["decode/" + p + "idx_mask"] = m
            upd_gap("indexer_score", torch.stack([x[:, 0] for x in r[p + "idx_gap"]], dim=1), f"decode {p}indexer [row, step]")
        if layer.ple is not None:
            out["decode/" + p + "ple_ids"] = torch.cat(r[p + "ple_ids"], dim=1).numpy().astype(np.int64)
    # the prefill router/indexer decisions of the decode prefill
    # (same tokens as rows 0/1 of the main prefill, checked there)
    dec_vs_full = float((step_logits - res.logits[:2, t0:]).abs().max())

    # ---- greedy generate on two prompts (batch 1 each)
    gens = {}
    prompts = {"gen0": ids[0, :12], "gen1": ids[1, :10]}
    for gname, prompt in prompts.items():
        rec.clear()
        prompt = prompt[None]
        with torch.no_grad():
            g = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=case["gen_new_tokens"],
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
        seq = g.sequences
        lg = torch.stack(g.logits, dim=1)  # [1, n, V]
        out[f"generate/{gname}/prompt_ids"] = prompt.numpy().astype(np.int64)
        out[f"generate/{gname}/sequence"] = seq.numpy().astype(np.int64)
        out[f"generate/{gname}/step_logits"] = np32(lg)
        upd_gap("argmax_logit", argmax_gap(lg), f"generate {gname} [row, step]")
        r = rec.records
        for i, layer in enumerate(tm.layers):
            p = f"layer{i}/"
            for call, lgr in enumerate(r[p + "router_logits"]):
                gp, gl = router_gaps(lgr, k_route)
                upd_gap("router_prob", gp, f"generate {gname} forward {call} {p}router [token]")
                upd_gap("router_logit", gl, f"generate {gname} forward {call} {p}router [token]")
            if layer.layer_type == "indexed_attention":
                for call, x in enumerate(r[p + "idx_gap"]):
                    upd_gap("indexer_score", x, f"generate {gname} forward {call} {p}indexer [row, query]")
        gens[gname] = {"new_tokens": int(seq.shape[1] - prompt.shape[1]), "stopped_on_eos": bool(seq[0, -1] == eos)}
        if hasattr(model, "model") and hasattr(model.model, "rope_deltas"):
            model.model.rope_deltas = None

    # ---- the same two prompts as one LEFT-padded batch (generate's positions are cumsum(mask) - 1)
    lens = [prompts[k].numel() for k in prompts]
    width = max(lens)
    batch = torch.full((2, width), pad, dtype=torch.long)
    bmask = torch.zeros((2, width), dtype=torch.long)
    for row, (gname, prompt) in enumerate(prompts.items()):
        batch[row, width - prompt.numel() :] = prompt
        bmask[row, width - prompt.numel() :] = 1
    rec.clear()
    with torch.no_grad():
        g = model.generate(
            input_ids=batch,
            attention_mask=bmask,
            max_new_tokens=case["gen_new_tokens"],
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    lg = torch.stack(g.logits, dim=1)
    out["generate/batch_left_padded/prompt_ids"] = batch.numpy().astype(np.int64)
    out["generate/batch_left_padded/attention_mask"] = bmask.numpy().astype(np.int64)
    out["generate/batch_left_padded/sequence"] = g.sequences.numpy().astype(np.int64)
    out["generate/batch_left_padded/step_logits"] = np32(lg)
    upd_gap("argmax_logit", argmax_gap(lg), "generate batch_left_padded [row, step]")
    same = []
    for row, gname in enumerate(prompts):
        single = out[f"generate/{gname}/sequence"][0, lens[row] :]
        batched = out["generate/batch_left_padded/sequence"][row, width : width + single.size]
        same.append(bool(np.array_equal(single, batched)))
    gens["batch_left_padded_equals_single"] = same
    gens["batch_left_padded_vs_single_max_abs_logit_diff"] = float(
        max(
            (lg[row, : out[f"generate/{gname}/step_logits"].shape[1]] - torch.from_numpy(out[f"generate/{gname}/step_logits"][0])).abs().max()
            for row, gname in enumerate(prompts)
        )
    )
    if hasattr(model, "model") and hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None
    rec.remove()
    for key in sites:
        sites[key] = sorted(sites[key], key=lambda r: r["gap"])[:3]

    checks = {
        "roundtrip_bitwise": True,
        "decode_vs_full_forward_max_abs_logit_diff": dec_vs_full,
        "generate": gens,
    }
    checks["smallest_margins"] = sites
    return model, out, gaps, checks, grad_notes


def save_grads(model, out):
    """Gradients under checkpoint names: experts split per expert, the PLE table unsharded."""
    notes = {"none_in_torch": [], "zero_rows": {}}
    prefix = "model." if isinstance(model, Qwen4ExpForCausalLM) else "model.language_model."
    tm = text_model(model)
    for name, prm in model.named_parameters():
        if ".visual." in name or name.startswith("model.visual."):
            continue
        g = prm.grad
        if g is None:
            notes["none_in_torch"].append(name)
            g = torch.zeros_like(prm)
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            inter = g.shape[1] // 2
            for e in range(g.shape[0]):
                out[f"grad/{base}{e}.gate_proj.weight"] = np32(g[e, :inter])
                out[f"grad/{base}{e}.up_proj.weight"] = np32(g[e, inter:])
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(g.shape[0]):
                out[f"grad/{base}{e}.down_proj.weight"] = np32(g[e])
        else:
            out[f"grad/{name}"] = np32(g)
    pad = text_config(model).pad_token_id
    notes["zero_rows"][prefix + "embed_tokens.weight"] = [int(pad)]
    return notes


def save_cache(cache, model, out, p):
    cfg = text_config(model)
    for i, layer in enumerate(cache.layers):
        q = f"{p}layer{i}/"
        if isinstance(layer, transformers.cache_utils.LinearAttentionLayer):
            for s, v in layer.conv_states.items():
                if v is not None and layer.is_conv_states_initialized[s]:
                    out[q + f"conv_state{s}"] = v.numpy().copy() if v.dtype == torch.long else np32(v)
            for s, v in layer.recurrent_states.items():
                if v is not None and layer.is_recurrent_states_initialized[s]:
                    out[q + f"recurrent_state{s}"] = np32(v)
        else:
            out[q + "keys"] = np32(layer.keys)
            out[q + "values"] = np32(layer.values)
            out[q + "indexer_keys"] = np32(layer.indexer_keys)
            if layer.indexer_position_ids is not None:
                out[q + "indexer_position_ids"] = layer.indexer_position_ids.numpy().astype(np.int64)


def gaps_ok(gaps):
    return all(gaps.get(k, float("inf")) >= v for k, v in GAPS.items())


def full_scale_constants():
    """The released model's PLE hash constants, from the reference's own helper functions."""
    vocab, base, n, hpn, div, seed = 248320, 20_000_000, 3, 8, 128, 1234
    heads = (n - 1) * hpn
    res = {"vocab_size": vocab, "ngram_vocab_size_base": base, "ngram_size": n, "heads_per_ngram": hpn,
           "make_ngram_vocab_size_divisible_by": div, "seed": seed, "ple_layer_index": {}}
    for li in (0, 1):
        sizes = [qm._find_nth_prime_after(base - 1, li * heads + h + 1) for h in range(heads)]
        offs = [sum(sizes[:h]) for h in range(heads)]
        mult = qm._build_layer_multipliers(vocab, n, li, seed).tolist()
        res["ple_layer_index"][str(li)] = {
            "layer_multipliers": mult,
            "ngram_heads_vocab_sizes": sizes,
            "ngram_heads_offsets": offs,
            "total_rows": sum(sizes),
            "padded_rows": math.ceil(sum(sizes) / div) * div,
        }
    return res


def margin_score(gaps):
    """min over the criteria of gap / threshold (>= 1 means every margin is cleared)."""
    return min(gaps.get(k, float("inf")) / v for k, v in GAPS.items())


def write_case(name, case, tok, root: Path, search=12):
    """Try `search` seeds, keep the one whose smallest margin (relative to GAPS) is largest."""
    case_dir = root / name
    hf_dir = case_dir / "hf"
    tried = []
    for seed in case["seeds"][: search * (2 if case["grads"] else 1)]:
        _, _, gaps, _, _ = run_case(name, case, seed, tok, hf_dir)
        tried.append({"seed": seed, "gaps": gaps, "margin_score": margin_score(gaps)})
        print(f"[{name}] seed {seed}: score {margin_score(gaps):.3g}; " + ", ".join(f"{k}={v:.3g}" for k, v in sorted(gaps.items())), flush=True)
    best = max(tried, key=lambda r: r["margin_score"])
    if best["margin_score"] < 1:
        raise RuntimeError(f"no seed in {case['seeds'][:search]} clears the top-k margins {GAPS}")
    chosen = best["seed"]
    model, out, gaps, checks, grad_notes = run_case(name, case, chosen, tok, hf_dir)
    if gaps != best["gaps"]:
        raise RuntimeError("re-running the chosen seed gave different margins: the run is not deterministic")
    np.savez_compressed(case_dir / "golden.npz", **out)
    tc = text_config(model)
    from safetensors import safe_open

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    keys = {}
    for key, fname in sorted(index["weight_map"].items()):
        with safe_open(hf_dir / fname, "pt") as f:
            t = f.get_slice(key)
            keys[key] = {"shape": list(t.get_shape()), "dtype": t.get_dtype(), "file": fname}
    meta = {
        "case": name,
        "architecture": case["arch"],
        "checkpoint_prefix": "model." if case["arch"] == "Qwen4ExpForCausalLM" else "model.language_model.",
        "seed": chosen,
        "torch_manual_seed": chosen,
        "rerandomise_seed": chosen + 7919,
        "seeds_tried": tried,
        "gap_thresholds": GAPS,
        "min_gaps": gaps,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        "dtype": "float32",
        "attn_implementation": "eager",
        "experts_implementation": "eager",
        "text_config": {k: v for k, v in tc.to_dict().items() if k != "_name_or_path"},
        "tokenizer": {
            "file": "hf/tokenizer.json",
            "vocab_size": tok.get_vocab_size(),
            "eos_token": EOS_TOKEN,
            "eos_token_id": tok.token_to_id(EOS_TOKEN),
            "pad_token": PAD_TOKEN,
            "pad_token_id": tok.token_to_id(PAD_TOKEN),
            "bos_token": None,
        },
        "checks": checks,
        "grads": grad_notes,
        "ple_layers": {
            str(i): {
                "one_based_layer_id": i + 1,
                "ple_layer_index": tc.ple_layer_ids.index(i + 1),
                "layer_multipliers": text_model(model).layers[i].ple.ple_embedding.layer_multipliers.tolist(),
                "ngram_heads_vocab_sizes": text_model(model).layers[i].ple.ple_embedding.ngram_heads_vocab_sizes.tolist(),
                "ngram_heads_offsets": text_model(model).layers[i].ple.ple_embedding.ngram_heads_offsets.tolist(),
                "table_rows": int(text_model(model).layers[i].ple.ple_embedding.ngram_embedding.weight.shape[0]),
                "table_width": int(text_model(model).layers[i].ple.ple_embedding.ngram_embedding.weight.shape[1]),
            }
            for i in range(tc.num_hidden_layers)
            if text_model(model).layers[i].ple is not None
        },
        "checkpoint_keys": keys,
        "golden_arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(out.items())},
    }
    (case_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "qwen4exp"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--search", type=int, default=40, help="seeds tried per case; the one with the widest margins is kept")
    args = ap.parse_args()
    if torch.__version__.split("+")[0] != TORCH_VERSION_WANTED or transformers.__version__ != TRANSFORMERS_VERSION_WANTED:
        print(
            f"warning: fixtures were made with torch {TORCH_VERSION_WANTED} / transformers {TRANSFORMERS_VERSION_WANTED}, "
            f"this is torch {torch.__version__} / transformers {transformers.__version__}",
            file=sys.stderr,
        )
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tok = build_tokenizer()
    summary = {}
    for name in args.cases.split(","):
        meta = write_case(name, CASES[name], tok, root, args.search)
        summary[name] = {"seed": meta["seed"], "min_gaps": meta["min_gaps"]}
    fs = full_scale_constants()
    (root / "full_scale_ple.json").write_text(json.dumps(fs, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
