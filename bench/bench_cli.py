"""Wall time of a first and a second identical generate.py call (the persistent compilation cache).

  python bench/bench_cli.py --workdir runs/tiny [--repeats 3] [--max_new_tokens 64]

Each repeat starts from an empty cache directory: the first call compiles every program and writes
it, the second reads them back. Prints each pair, the medians and the ratio second / first, and the
programs each call compiled and read (generate.py's own count), as one JSON line at the end.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def call(workdir, cache, max_new_tokens, prompt):
  start = time.perf_counter()
  out = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--workdir", workdir, "--prompt", prompt,
                        "--max_new_tokens", str(max_new_tokens), "--compilation_cache", cache],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  seconds = time.perf_counter() - start
  if out.returncode:
    raise SystemExit(out.stderr)
  programs = re.search(r"(\d+) programs: (\d+) compiled, (\d+) read", out.stderr)
  rate = re.search(r"\(([\d.]+) tokens/s\)", out.stderr)
  return {"seconds": seconds, "programs": list(map(int, programs.groups())), "decode_tokens_per_s": float(rate.group(1))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--prompt", default="The os module")
  args = parser.parse_args()
  pairs = []
  for r in range(args.repeats):
    with tempfile.TemporaryDirectory() as cache:
      first = call(args.workdir, cache, args.max_new_tokens, args.prompt)
      second = call(args.workdir, cache, args.max_new_tokens, args.prompt)
    pairs.append((first, second))
    print(f"repeat {r}: first {first['seconds']:.2f} s {first['programs']}, second {second['seconds']:.2f} s "
          f"{second['programs']}, ratio {second['seconds'] / first['seconds']:.3f}", flush=True)
  first = statistics.median(p[0]["seconds"] for p in pairs)
  second = statistics.median(p[1]["seconds"] for p in pairs)
  ratios = [p[1]["seconds"] / p[0]["seconds"] for p in pairs]
  print(json.dumps({"first_s": round(first, 2), "second_s": round(second, 2), "ratio_of_medians": round(second / first, 3),
                    "ratios": [round(x, 3) for x in ratios], "pairs": pairs}))


if __name__ == "__main__":
  main()
