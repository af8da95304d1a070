"""Streaming text stays O(1) per token: the cost of an output's last 256 tokens over
its first 256, through the engine's output processor (`serving.output.RequestOutput`:
incremental decode, stop-string search, held-back text), beside a whole-text decode
per token (what the engine and the HTTP layer each did before).

  python benchmarks/detokenize.py [--tokens 4096] [--window 256] [--repeats 5]

Prints, per tokenizer, the seconds of the first and the last window and their ratio
(median over repeats, measured side by side in one run). A ratio near 1 is the goal;
the whole-text decode grows with the output's length.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pdserve_jax.core.sampling import SamplingParams
from pdserve_jax.model.tokenizer import byte_tokenizer
from pdserve_jax.serving.output import RequestOutput


def _text(n_tokens: int) -> list:
  """A byte stream of English with a multi-byte character every few words."""
  words = "and the king said unto them é in the beginning was the word".split()
  out, i = [], 0
  while len(out) < n_tokens:
    out += list((words[i % len(words)] + " ").encode())
    i += 1
  return out[:n_tokens]


def _windows(ids, decode, window, incremental: bool):
  """Seconds spent on the first and on the last `window` tokens of `ids`."""
  times = []
  if incremental:
    out = RequestOutput([1], SamplingParams(max_tokens=len(ids), stop=("\n\n", "THE END")),
                        frozenset(), decode)
    step = out.emit
  else:
    seen = []

    def step(t):  # the old way: decode everything so far, search the whole text
      seen.append(t)
      text = decode(seen)
      return any(s in text for s in ("\n\n", "THE END"))
  for t in ids:
    start = time.perf_counter()
    step(t)
    times.append(time.perf_counter() - start)
  return sum(times[:window]), sum(times[-window:])


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--window", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  tk = byte_tokenizer()
  ids = _text(args.tokens)
  print(f"{args.tokens}-token output, windows of {args.window} tokens, median of "
        f"{args.repeats} runs")
  print(f"{'how':<28}{'first (ms)':>12}{'last (ms)':>12}{'last/first':>12}")
  for name, incremental in (("output processor", True), ("whole decode per token", False)):
    runs = [_windows(ids, tk.decode, args.window, incremental) for _ in range(args.repeats)]
    first = statistics.median(r[0] for r in runs)
    last = statistics.median(r[1] for r in runs)
    print(f"{name:<28}{first * 1e3:>12.2f}{last * 1e3:>12.2f}{last / first:>12.2f}")


if __name__ == "__main__":
  main()
