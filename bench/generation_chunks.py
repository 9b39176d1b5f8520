"""Rollout passes over several chunks of uneven prompts: this checkout against another commit's.

    python bench/generation_chunks.py --before <commit> --repeats 3 [--pass logprobs]

`--pass generate` (default): `common.sample()` generates `inferenceChunkSize` rows per call. It used to
left-pad every chunk to the batch's longest prompt; it now takes the rows by prompt length and pads each
chunk to its own longest, so a chunk of short prompts runs no prefill over, and caches no key for,
another chunk's long one.

`--pass logprobs`: the no-grad log-prob pass over the sampled rows (old log-probs, the reference's;
the critic's values and the reward's scores take the same path, `forward.chunked_rows`). Its chunks
used to be slices of the batch at the batch's width; they now take the rows by left padding and drop
the columns that are padding in all of a chunk's rows. Rows: the prompts left-padded to the longest,
then `--new-tokens` response tokens.

Each measurement is a fresh process that imports the trainer from one checkout (`git worktree` of
`--before`, or this one) and times `sample()` on the same rows: a SmolLM2-135M-shaped Llama (random
weights, fp32, one thread), `--rows` prompts whose lengths are uniform in 8..`--longest` tokens,
`--chunk` rows per call, `--new-tokens` greedy tokens. The two checkouts alternate; the report gives
the median seconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from checkouts import against_commit  # bench/
from trainer_vs_trl import SHAPES  # bench/: the Trainer-vs-TRL bench's model shapes

ONE = r"""
import json, random, sys, time
sys.path[:0] = sys.argv[1].split(":")
import torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
from rlhf_contract.config import Hyperparameters
from rlhf_trainer import models
from rlhf_trainer.algorithms import common
rows, chunk, longest, new = (int(v) for v in sys.argv[2:6])
tok = models.load_tokenizer("tiny://llama")
config = LlamaConfig(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                     **json.loads(sys.argv[6]))
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
rng = random.Random(0)
ids = [[rng.randrange(10, 200) for _ in range(rng.randint(8, longest))] for _ in range(rows)]
hp = Hyperparameters(inference_chunk_size=chunk, max_new_tokens=new, max_prompt_length=longest)
never = (49151,)  # no stop token: every row samples `new` tokens on both sides
if sys.argv[7] == "generate":
    run = lambda rows: common.sample(model, tok, rows, hp, never, greedy=True)
else:
    from rlhf_trainer.data import pad_left
    from rlhf_trainer.forward import chunked_token_logprobs
    def run(rows):
        enc = pad_left([r + [rng.randrange(10, 200) for _ in range(new)] for r in rows], tok.pad_token_id)
        with torch.no_grad():
            chunked_token_logprobs(model, enc["input_ids"], enc["attention_mask"], chunk_size=chunk,
                                   response_length=new)
run(ids[:1])  # warm-up
start = time.perf_counter()
run(ids)
print("RESULT " + json.dumps({"seconds": time.perf_counter() - start,
                              "prompt_tokens": sum(map(len, ids))}))
"""


def measure(code: Path, args) -> dict:
    paths = ":".join(str(code / part) for part in ("trainer_image", "contract"))
    shape = json.dumps(SHAPES["smollm2-135m"][1])
    out = subprocess.run([sys.executable, "-c", ONE, paths, str(args.rows), str(args.chunk), str(args.longest),
                          str(args.new_tokens), shape, args.pass_], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare against")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--longest", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--pass", dest="pass_", choices=("generate", "logprobs"), default="generate")
    args = parser.parse_args()
    results = against_commit(args.before, args.repeats, lambda code: measure(code, args))
    times = {name: [r["seconds"] for r in rs] for name, rs in results.items()}
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{platform.machine()}, {args.pass_}, {args.rows} prompts of 8..{args.longest} tokens, chunks of {args.chunk}, "
          f"{args.new_tokens} new tokens: before {medians['before']:.2f} s, now {medians['now']:.2f} s, "
          f"before / now {medians['before'] / medians['now']:.2f}x")


if __name__ == "__main__":
    main()
