"""The PyTorch side of bench/bench_qwen4exp.py: Hugging Face transformers' Qwen4Exp on one checkpoint.

Runs in its own environment (torch + transformers; engram_jax never imports torch):

    python3 -m venv VENV
    VENV/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
    VENV/bin/pip install transformers==5.23.0
    VENV/bin/python bench/qwen4exp_reference.py --hf_dir DIR [--threads 1] [--device cpu]

`flash-linear-attention` (`fla`) and `causal-conv1d` must not be importable there: transformers would
swap its torch GatedDeltaNet and causal-conv code for their kernels, and the comparison is against
the reference code as written. The script refuses to run if either is.

What it measures, on the model loaded from DIR with `from_pretrained` (float32, eager attention,
eager experts unless told otherwise, `torch.inference_mode`, `torch.set_num_threads(--threads)`):
- prefill: one forward with a fresh cache over a [prefill_batch, prompt_len] batch (full logits,
  as `generate` computes them in its first step), tokens/s = batch x prompt_len / time;
- decode at each batch in --decode_batches: a prefill (untimed), then --new_tokens greedy steps, each
  one forward of one token per row on the model's own cache (the loop `generate` runs, without its
  logits processors and stopping checks: the cheapest way to decode with transformers); tokens/s =
  batch x steps / time of the steps.
Each figure is the median over --repeats timed runs after --warmup untimed ones. Prompts are drawn
with numpy from a seed (ids in [0, eos)), the same way bench_qwen4exp.py draws them, and the greedy
tokens of every decode batch are printed so the JAX side can compare them.

`--make_random SPEC.json` first builds a `Qwen4ExpForCausalLM` from a text-config dict (the JSON
file), gives every parameter a seeded non-degenerate random value (the library's init leaves the
`1+w` norms and the PLE conv at zero), and `save_pretrained`s it to --hf_dir (made-up sizes for the
"larger config" comparison; both sides then load the same directory).

Prints one JSON line (and with --json, writes it to that file).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time

os.environ.setdefault("USE_HUB_KERNELS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--hf_dir", required=True, help="a save_pretrained directory of Qwen4ExpForCausalLM or "
                 "Qwen4ExpForConditionalGeneration (written first with --make_random)")
  p.add_argument("--make_random", default=None, help="a JSON text config: build, randomise and save to --hf_dir")
  p.add_argument("--seed", type=int, default=0, help="prompt and --make_random seed")
  p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
  p.add_argument("--device", default="cpu", help="cpu or cuda")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--attn_implementation", default="eager")
  p.add_argument("--experts_implementation", default="eager")
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--prefill_batch", type=int, default=8)
  p.add_argument("--decode_batches", default="1,8")
  p.add_argument("--new_tokens", type=int, default=32, help="greedy decode steps per timed run")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--parts", default="prefill,decode", help="comma-separated; 'none' with --make_random only writes")
  p.add_argument("--json", default=None, help="also write the JSON line here")
  return p.parse_args(argv)


def prompts(seed: int, batch: int, length: int, eos: int):
  """The prompt ids both benchmark sides use: numpy's default_rng(seed + batch), ids in [0, eos)."""
  import numpy as np
  return np.random.default_rng(seed + batch).integers(0, eos, size=(batch, length), dtype=np.int64)


def randomise(model, seed: int):
  """Seeded values for every parameter: N(0, 1) embeddings and table rows, N(0, 1/fan_in) matrices and
  convs, zero-centred `1+w` norms and the gated norm (around 1) perturbed by N(0, 0.1); the
  GatedDeltaNet decay parameters keep the library's init."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.startswith("model.visual."):
        continue
      noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
      if name.endswith(("A_log", "dt_bias")):
        continue
      if p.ndim == 1:
        p.add_((noise * 0.1).to(p.dtype))
      elif "embed_tokens" in name or "ngram_embedding" in name:
        p.copy_(noise.to(p.dtype))
      else:
        scale = 4.0 if name.endswith("mlp.gate.weight") else 1.0  # decisive routing
        p.copy_((noise * scale / math.sqrt(p.shape[-1])).to(p.dtype))


def make_random(spec_path: str, hf_dir: str, seed: int):
  import torch
  from transformers import Qwen4ExpForCausalLM, Qwen4ExpTextConfig
  with open(spec_path) as f:
    spec = json.load(f)
  cfg = Qwen4ExpTextConfig(**spec)
  cfg.architectures = ["Qwen4ExpForCausalLM"]
  torch.manual_seed(seed)
  start = time.perf_counter()
  model = Qwen4ExpForCausalLM._from_config(cfg, attn_implementation="eager", experts_implementation="eager",
                                           dtype=torch.float32)
  randomise(model, seed)
  model.save_pretrained(hf_dir, max_shard_size="2GB")
  return {"params": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start}


def load(hf_dir: str, args):
  import torch
  import transformers
  with open(os.path.join(hf_dir, "config.json")) as f:
    config = json.load(f)
  arch = (config.get("architectures") or ["Qwen4ExpForCausalLM"])[0]
  cls = getattr(transformers, arch)
  dtype = getattr(torch, args.dtype)
  model = cls.from_pretrained(hf_dir, attn_implementation=args.attn_implementation,
                              experts_implementation=args.experts_implementation, dtype=dtype)
  model.eval().to(args.device)
  text = config.get("text_config", config)
  eos = text.get("eos_token_id", config.get("eos_token_id"))
  eos = eos[0] if isinstance(eos, list) else eos
  return model, arch, int(eos)


def main(argv=None):
  args = parse_args(argv)
  for pkg in ("fla", "causal_conv1d"):
    if importlib.util.find_spec(pkg) is not None:
      sys.exit(f"'{pkg}' is importable: transformers would run its kernels instead of the reference torch code")
  import numpy as np
  import torch
  import transformers
  torch.set_num_threads(args.threads)
  try:
    torch.set_num_interop_threads(1)
  except RuntimeError:
    pass
  out = {"side": "transformers", "torch": torch.__version__, "transformers": transformers.__version__,
         "threads": args.threads, "device": args.device, "dtype": args.dtype, "python": platform.python_version(),
         "attn_implementation": args.attn_implementation, "experts_implementation": args.experts_implementation,
         "repeats": args.repeats, "warmup": args.warmup, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
  if args.make_random:
    out["made"] = make_random(args.make_random, args.hf_dir, args.seed)
  parts = [part for part in args.parts.split(",") if part in ("prefill", "decode")]
  if not parts:  # --make_random alone
    print(json.dumps(out), flush=True)
    return
  start = time.perf_counter()
  model, arch, eos = load(args.hf_dir, args)
  out.update(arch=arch, load_seconds=round(time.perf_counter() - start, 3))
  device = torch.device(args.device)

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  def timed(fn):
    for _ in range(args.warmup):
      fn()
    times = []
    for _ in range(args.repeats):
      sync()
      t0 = time.perf_counter()
      result = fn()
      sync()
      times.append(time.perf_counter() - t0)
    return float(np.median(times)), times, result

  with torch.inference_mode():
    if "prefill" in parts:
      ids = torch.as_tensor(prompts(args.seed, args.prefill_batch, args.prompt_len, eos), device=device)
      def prefill():
        return model(input_ids=ids, use_cache=True).logits
      median, times, logits = timed(prefill)
      out["prefill"] = {"batch": args.prefill_batch, "tokens_per_s": args.prefill_batch * args.prompt_len / median,
                        "median_s": median, "times_s": times,
                        "last_logits_argmax": logits[:, -1].argmax(-1).tolist()}
    if "decode" in parts:
      out["decode"] = {}
      for batch in [int(b) for b in args.decode_batches.split(",") if b]:
        ids = torch.as_tensor(prompts(args.seed, batch, args.prompt_len, eos), device=device)
        state = {}
        def decode():
          first = model(input_ids=ids, use_cache=True, logits_to_keep=1)
          cache, token = first.past_key_values, first.logits[:, -1].argmax(-1)
          tokens = [token]
          sync()
          t0 = time.perf_counter()
          for _ in range(args.new_tokens):
            step = model(input_ids=token[:, None], past_key_values=cache, use_cache=True)
            token = step.logits[:, -1].argmax(-1)
            tokens.append(token)
          sync()
          state["steps_s"] = time.perf_counter() - t0
          return torch.stack(tokens, dim=1)
        # The prefill inside `decode` is untimed: the steps' own time is taken inside it.
        for _ in range(args.warmup):
          decode()
        step_times = []
        for _ in range(args.repeats):
          tokens = decode()
          step_times.append(state["steps_s"])
        median = float(np.median(step_times))
        out["decode"][str(batch)] = {"tokens_per_s": batch * args.new_tokens / median, "median_s": median,
                                     "times_s": step_times, "tokens": tokens.tolist()}
  line = json.dumps(out)
  print(line, flush=True)
  if args.json:
    with open(args.json, "w") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
