"""Generate text with a trained Engram model: `python generate.py --workdir runs/tiny --prompt "The os module"`.

Restores the latest checkpoint of `<workdir>/checkpoints` (or `--checkpoint <dir>`, `--step N`) onto
every device of this machine, prefills the prompts and decodes with caches (attention keys/values or
MLA latents, each Engram layer's conv state and n-gram history; see engram_jax/generation.py), and
prints each prompt followed by its completion. A batch holding one prompt (a single --prompt, or
--batch_size 1) streams its tokens as they are produced; larger batches print each completion when it
ends. Every row stops at end-of-sequence or after --max_new_tokens. --output_jsonl writes one line
per prompt: prompt, completion, token ids, per-token log-probabilities and Engram gate means.

--engram_tables host|disk (with --table_dir, --cache_rows, --quantize, as in eval.py) keeps the Engram
tables off the accelerator. Decoding takes the path measured fastest for the placement
(`--decode_path auto`): rows gathered in-graph from device tables, from pinned host memory (RAM
tables on one device), or through an in-graph host callback (memory-mapped tables, several devices);
`--decode_path split` is the older two-program step. Up to --decode_block tokens are decoded per
dispatch (one compiled loop); streamed text appears a block at a time. The end prints decode tokens/s
without compilation, the prefill time and the compilation time (a second identical call reads its
programs from the persistent compilation cache, `--compilation_cache`); --verbosity=0 also prints the
decode path chosen.

Without --config the config saved in the checkpoint is used; `--config.a.b=v` overrides work as in
train.py, on the saved config or on --config's. Bad input (an empty or too long prompt, a budget below 1, sampling
values out of range, a config whose Engram layout is not the checkpoint's) is reported as one
paragraph before anything is restored, as train.py and eval.py report theirs (engram_jax/cli.py).
"""

import json
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from engram_jax.cli import UsageError, checkpoint_dir_of, define_table_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a preset in configs/ (default: the config "
                                          "saved in the checkpoint).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir: reads <workdir>/checkpoints.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A checkpoints directory (instead of --workdir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to restore (default: the latest).")
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt text.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Prompts, one per line, or JSONL with a \"prompt\" field "
                                    "per line (instead of --prompt).")
_OUTPUT_JSONL = flags.DEFINE_string("output_jsonl", None, "Write one JSON line per prompt here: prompt, completion, "
                                    "token_ids, logprobs, engram_gate_means, finish_reason.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy (argmax).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens only; 0 = no limit.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens whose probability reaches p; 1 = "
                            "no limit.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (prompt i draws with the seed folded with i).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts decoded together.")
_TABLES = define_table_flags()
_DECODE_PATH = flags.DEFINE_enum("decode_path", "auto", ["auto", "device", "pinned_host", "callback", "split"],
                                 "Where decode steps read Engram rows: auto (the fastest measured for the placement), "
                                 "device (device tables), pinned_host (RAM tables in pinned host memory, gathered "
                                 "in-graph), callback (an in-graph host callback: any host or disk tables), split "
                                 "(host gather between two programs).")
_DECODE_BLOCK = flags.DEFINE_integer("decode_block", 16, "Decode steps per dispatch (one compiled loop; 1 = one "
                                     "program call per token).")


def _log(message: str):
  print(message, file=sys.stderr, flush=True)


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # absl's default under app.run is INFO: orbax's chatter
    logging.set_verbosity(logging.WARNING)   # would bury the text (--verbosity=0 for it)
  checkpoint_dir = checkpoint_dir_of(_WORKDIR.value, _CHECKPOINT.value)
  if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
    raise UsageError("pass exactly one of --prompt TEXT and --prompts_file FILE")
  from engram_jax import data as data_lib
  from engram_jax import generation
  from engram_jax.config import Config, from_dict
  from engram_jax.runner import load_config_from_checkpoint

  # Everything that can be wrong with the request fails here, before the (slow) restore.
  texts = [_PROMPT.value] if _PROMPT.value is not None else generation.read_prompts(_PROMPTS_FILE.value)
  if _CONFIG.value is not None:
    cfg = from_dict(Config, _CONFIG.value)
  else:
    cfg = load_config_from_checkpoint(checkpoint_dir, _STEP.value)
  tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer_path)
  prompts = [generation.encode_prompt(tokenizer, cfg.data, t) for t in texts]
  generation.check_prompts(prompts, _MAX_NEW.value, cfg.model.max_seq_len, cfg.model.vocab_size)
  generation.sampling_arrays(1, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _SEED.value)
  if _BATCH_SIZE.value < 1:
    raise ValueError(f"--batch_size={_BATCH_SIZE.value}: expected a positive integer")
  if _DECODE_BLOCK.value < 1:
    raise ValueError(f"--decode_block={_DECODE_BLOCK.value}: expected a positive integer")
  tables = _TABLES()

  import jax

  generator = generation.Generator.from_checkpoint(cfg, checkpoint_dir, step=_STEP.value, log=_log,
                                                   decode=_DECODE_PATH.value, block=_DECODE_BLOCK.value, **tables)
  if flags.FLAGS["verbosity"].present:
    _log(generator.describe())
  single = len(texts) == 1 or _BATCH_SIZE.value == 1
  streams = {}

  def on_token(i, token):
    if single:
      if i not in streams:
        streams[i] = generation.TextStream(generator.runner.tokenizer)
        print(("\n" if i else "") + texts[i], end="", flush=True)
      print(streams[i].push(token), end="", flush=True)

  def on_done(i, completion):
    if single:
      print(f"\n[{completion.finish_reason}, {len(completion.token_ids)} tokens]", flush=True)
    else:
      print(f"{'' if i == 0 else chr(10)}{texts[i]}{generator.decode(completion.token_ids)}\n"
            f"[{completion.finish_reason}, {len(completion.token_ids)} tokens]", flush=True)

  completions = generator.generate(prompts, _MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                   top_p=_TOP_P.value, seed=_SEED.value, batch_size=_BATCH_SIZE.value,
                                   on_token=on_token, on_done=on_done)
  from engram_jax.compilation import CompileStats

  _log(f"{generator.timing.describe()} ({generator.path} path); {CompileStats.get().describe()}")
  if _OUTPUT_JSONL.value and jax.process_index() == 0:
    out_dir = os.path.dirname(os.path.abspath(_OUTPUT_JSONL.value))
    os.makedirs(out_dir, exist_ok=True)
    with open(_OUTPUT_JSONL.value, "w", encoding="utf-8") as f:
      for text, completion in zip(texts, completions):
        f.write(json.dumps(generation.completion_record(generator, text, completion)) + "\n")
    print(f"\nCompletions: {_OUTPUT_JSONL.value}")


if __name__ == "__main__":
  from engram_jax.cli import run, suggest_step

  run(main, "generate.py", suggest_step)
