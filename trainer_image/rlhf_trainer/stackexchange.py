"""Question/answer threads with votes -> SFT rows (also the RL prompts) and preference pairs, by the seed
StackLLaMA's rule (TRL's stack_llama example; the data of lvwerra/stack-exchange-paired):

    score(answer) = -1 if upvotes < 0 else round(log2(1 + upvotes)),  +1 if the asker accepted it
    pairs: two answers of one question with different scores, the higher one chosen; at most ten
           pairs per question, drawn at random (seeded) when a question has more
    text:  "Question: <question>\\n\\nAnswer: <answer>"  (the prompt ends before the answer)

The score is Askell et al. 2021 ("A General Language Assistant as a Laboratory for Alignment", section
on preference model pre-training), as the StackLLaMA post applies it. The SFT rows are each question's
best answer (highest score, then most upvotes); the seed fine-tunes on the preferred answers of its
pairs, which repeats the same answers once per pair. The seed splits its threads between the three
stages; a small set is better used whole by each.

Input: JSONL, one thread per line (crds/examples/data/stackqa.jsonl is a small hand-written one):

    {"id": 3, "question": "What is 7 + 5?",
     "answers": [{"text": "12", "upvotes": 25, "accepted": true}, {"text": "13", "upvotes": 0}]}

Usage (standard library only, so it also runs where the trainer image runs):

    python -m rlhf_trainer.stackexchange crds/examples/data/stackqa.jsonl runs/stackqa \\
        [--manifest crds/examples/stackllama-tiny.yaml]

writes runs/stackqa/sft.jsonl (format prompts: the prompt and its best answer; SFT imitates the answers,
PPO samples from the prompts) and pairs.jsonl (format pairs: prompt, chosen, rejected); --manifest
also writes a copy of the manifest whose dataset paths under /data/stackqa/ point at those files, for
`rlhf-operator run-local`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_trainer.errors import DataError

MAX_PAIRS_PER_QUESTION = 10
# Where the example manifests expect the converted files in a container (a volume or the image).
CONTAINER_DIR = "/data/stackqa/"
FILES = {"sft": "sft.jsonl", "pairs": "pairs.jsonl"}


@dataclass(frozen=True)
class Answer:
    text: str
    upvotes: int
    accepted: bool = False

    @property
    def score(self) -> int:
        return answer_score(self.upvotes, self.accepted)


@dataclass(frozen=True)
class Thread:
    id: int
    question: str
    answers: tuple[Answer, ...]


def answer_score(upvotes: int, accepted: bool) -> int:
    """The seed's answer score: -1 for a negative vote count, else round(log2(1 + upvotes)); +1 if accepted."""
    base = -1 if upvotes < 0 else round(math.log2(1 + upvotes))
    return base + (1 if accepted else 0)


def prompt_text(question: str) -> str:
    return f"Question: {question}\n\nAnswer: "


def _field(row: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = row.get(key)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} must be {'an integer' if kind is int else 'a ' + kind.__name__}, "
                        f"got {json.dumps(value)[:60]}")
    return value


def parse_thread(row: Any, where: str) -> Thread:
    """One JSONL row -> Thread; DataError naming `where` (file:line) and the field otherwise."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {json.dumps(row)[:60]}")
    answers = _field(row, "answers", list, where)
    parsed = []
    for i, answer in enumerate(answers):
        at = f"{where}: answers[{i}]"
        if not isinstance(answer, dict):
            raise DataError(f"{at}: expected an object with text, upvotes, accepted")
        accepted = answer.get("accepted", False)
        if not isinstance(accepted, bool):
            raise DataError(f"{at}: field 'accepted' must be true or false, got {json.dumps(accepted)}")
        parsed.append(Answer(_field(answer, "text", str, at), _field(answer, "upvotes", int, at), accepted))
    if sum(a.accepted for a in parsed) > 1:
        raise DataError(f"{where}: more than one accepted answer")
    return Thread(_field(row, "id", int, where), _field(row, "question", str, where), tuple(parsed))


def read_threads(path: Path) -> list[Thread]:
    threads = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
        threads.append(parse_thread(row, where))
    if not threads:
        raise DataError(f"{path}: no threads")
    return threads


def best_answer(thread: Thread) -> Answer | None:
    """The answer an SFT row imitates: highest score, then most upvotes, then the first; None if no answers."""
    if not thread.answers:
        return None
    return max(thread.answers, key=lambda a: (a.score, a.upvotes, -thread.answers.index(a)))


def pairs(thread: Thread, seed: int = 0) -> list[tuple[Answer, Answer]]:
    """(chosen, rejected) for answers with different scores, higher score chosen; at most
    MAX_PAIRS_PER_QUESTION, a seeded random sample (seed, thread id) when there are more."""
    candidates = [(a, b) if a.score > b.score else (b, a)
                  for a, b in itertools.combinations(thread.answers, 2) if a.score != b.score]
    if len(candidates) > MAX_PAIRS_PER_QUESTION:
        candidates = random.Random(seed * 1_000_003 + thread.id).sample(candidates, MAX_PAIRS_PER_QUESTION)
    return candidates


def convert(threads: list[Thread], seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Rows of each output file (FILES): sft the prompt and its best answer, pairs the preferences."""
    out: dict[str, list[dict[str, str]]] = {name: [] for name in FILES}
    for thread in threads:
        prompt = prompt_text(thread.question)
        best = best_answer(thread)
        if best is None:
            continue
        out["sft"].append({"prompt": prompt, "answer": best.text})
        out["pairs"] += [{"prompt": prompt, "chosen": c.text, "rejected": r.text} for c, r in pairs(thread, seed)]
    return out


def write(rows: dict[str, list[dict[str, str]]], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, file in FILES.items():
        paths[name] = out_dir / file
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows[name]), encoding="utf-8")
    return paths


def localize_manifest(text: str, out_dir: Path) -> str:
    """A manifest's text with its CONTAINER_DIR dataset paths pointing at out_dir (for run-local)."""
    return text.replace(CONTAINER_DIR, f"{out_dir.resolve()}/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_trainer.stackexchange", description=__doc__.splitlines()[0])
    parser.add_argument("threads", type=Path, help="JSONL of question threads with answer votes")
    parser.add_argument("out_dir", type=Path, help="folder for sft.jsonl and pairs.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair sampling")
    parser.add_argument("--manifest", type=Path, action="append", default=[],
                        help=f"also write a copy of this manifest with {CONTAINER_DIR} paths into out_dir")
    args = parser.parse_args(argv)
    try:
        threads = read_threads(args.threads)
    except (OSError, DataError) as exc:
        print(f"stackexchange: {exc}", file=sys.stderr)
        return 1
    rows = convert(threads, args.seed)
    paths = write(rows, args.out_dir)
    scores = [a.score for t in threads for a in t.answers]
    print(f"{len(threads)} questions, {len(scores)} answers (scores {min(scores)}..{max(scores)}): "
          + ", ".join(f"{len(rows[n])} rows in {p}" for n, p in paths.items()))
    for manifest in args.manifest:
        target = args.out_dir / manifest.name
        target.write_text(localize_manifest(manifest.read_text(), args.out_dir))
        print(f"manifest with local dataset paths: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
