"""Datasets: JSONL readers, synthetic tasks, a resumable sampler, and tokenisation helpers.

    records = load_dataset(cfg.dataset.path, cfg.dataset.format, kind=ALGORITHMS[cfg.algorithm].data)
    sampler = Sampler(len(records), cfg.hyperparameters.batch_size, seed=cfg.hyperparameters.seed)
    batch = [records[i] for i in sampler.next_batch()]

JSONL formats (one object per line; blank lines are skipped; a bad row is a DataError "file:line: ..."):

| format      | row                                                             | records       |
|-------------|-----------------------------------------------------------------|---------------|
| prompts     | {"prompt": str, "answer": str (optional)}                       | PromptRecord  |
| pairs       | {"prompt": str, "chosen": str, "rejected": str}                  | PairRecord    |
| instruction | {"instruction", "input", "output": str, "history": [[q, a], ..]} | SFTRecord     |
| ranked      | {"prompt": str, "outputs": [best, ..., worst]}                   | every (better, worse) PairRecord |
| pair_list   | {"prompt": str, "output": [chosen, rejected]}                    | PairRecord    |

What an algorithm consumes (`kind`): ppo/grpo/rloo take prompts (from any format; instruction rows
give their output as the answer), dpo/rm take preference pairs, sft takes prompt/response pairs
(instruction rows, the chosen side of pairs, or prompts with answers).

Synthetic datasets (`synthetic://NAME[?key=value&...]`; the `format` field is ignored for them):

- `synthetic://arithmetic` (prompts): "3+4=" -> answer "7". Operands are 0..`max_operand`
  (default 4): 25 distinct prompts, 9 possible answers, each one digit token of the tiny
  tokenizer. A randomly initialised tiny://llama almost never starts with a digit (mean
  exact_match reward ~0.01). Measured on CPU with a plain group-baseline policy gradient (GRPO
  without clipping or KL; AdamW lr 1e-3, 32 prompts x 8 samples per step, 1 new token): mean
  reward 0.01 -> 0.25 by step 75 (it answers with a digit, mostly the same one for every
  prompt), 0.57 by step 150 and 0.80 by step 300, with greedy accuracy over the 25 sums 0.76,
  so the sums themselves are learned, not a constant. With 8 x 4 samples per step the policy
  collapses onto one digit (reward ~0.2) and stays there for hundreds of steps: RL from a random
  init needs many samples per step. Each extra new token can turn a right digit into a wrong
  number ("77"), which EOS-stopping and the PPO truncation penalty must then undo.
  `size` rows (default 512) are drawn with `seed` (default 0).
- `synthetic://preferences` (pairs): the same sums; chosen is the right answer, rejected is a wrong
  number for half the rows (telling them apart needs the sum) and a word for the other half
  (separable by surface form alone), so preference accuracy has an easy first step above 0.5
  and a harder second one. (Designed so; not measured here.)
- `synthetic://instructions` (instruction): add two numbers, repeat a word, next letter of the
  alphabet; a quarter of the rows carry a one-turn history.
"""

from __future__ import annotations

import json
import random
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rlhf_contract.config import PAIR_FORMATS, SYNTHETIC_PREFIX

from rlhf_trainer.errors import ConfigError, DataError


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    answer: str | None = None  # reference answer for rule rewards (exact_match)
    source: str = ""  # "file.jsonl:LINE", for error messages raised later


@dataclass(frozen=True)
class PairRecord:
    prompt: str
    chosen: str
    rejected: str
    source: str = ""


@dataclass(frozen=True)
class SFTRecord:
    prompt: str  # the formatted instruction (and history), ending where the response begins
    response: str
    source: str = ""


Record = PromptRecord | PairRecord | SFTRecord


# ---- instruction template -----------------------------------------------------------------------


def format_instruction(instruction: str, input_text: str = "", history: Sequence[Sequence[str]] = ()) -> str:
    """Alpaca-style prompt; earlier turns come first as instruction/response blocks."""
    turns = [f"### Instruction:\n{q}\n### Response:\n{a}\n" for q, a in history]
    body = f"### Instruction:\n{instruction}\n"
    if input_text:
        body += f"### Input:\n{input_text}\n"
    return "".join(turns) + body + "### Response:\n"


# ---- JSONL rows -------------------------------------------------------------------------------


def _field(row: dict[str, Any], name: str, where: str, *, kind: type = str, optional: bool = False) -> Any:
    if name not in row:
        if optional:
            return None
        raise DataError(f"{where}: missing field {name!r}")
    value = row[name]
    if kind is str and not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {json.dumps(value)[:60]}")
    if kind is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise DataError(f"{where}: field {name!r} must be a list of strings, got {json.dumps(value)[:60]}")
    return value


def _answer(row: dict[str, Any], where: str) -> str | None:
    # Numbers are common in answers ({"answer": 7}); accept them as their text.
    value = row.get("answer")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: field 'answer' must be a string or a number, got {json.dumps(value)[:60]}")


def _history(row: dict[str, Any], where: str) -> list[list[str]]:
    history = row.get("history") or []
    ok = isinstance(history, list) and all(
        isinstance(t, list) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in history
    )
    if not ok:
        raise DataError(f"{where}: field 'history' must be a list of [question, answer] string pairs")
    return history


def parse_row(row: Any, fmt: str, where: str) -> list[Record]:
    """One JSON object of a `fmt` file -> its records (ranked rows give several)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {json.dumps(row)[:60]}")
    if fmt == "prompts":
        return [PromptRecord(_field(row, "prompt", where), _answer(row, where), where)]
    if fmt == "pairs":
        return [PairRecord(_field(row, "prompt", where), _field(row, "chosen", where),
                           _field(row, "rejected", where), where)]
    if fmt == "instruction":
        prompt = format_instruction(_field(row, "instruction", where),
                                    _field(row, "input", where, optional=True) or "", _history(row, where))
        return [SFTRecord(prompt, _field(row, "output", where), where)]
    if fmt == "ranked":
        outputs = _field(row, "outputs", where, kind=list)
        if len(outputs) < 2:
            raise DataError(f"{where}: field 'outputs' needs at least 2 responses (best first), got {len(outputs)}")
        prompt = _field(row, "prompt", where)
        return [PairRecord(prompt, better, worse, where)
                for i, better in enumerate(outputs) for worse in outputs[i + 1:]]
    if fmt == "pair_list":
        output = _field(row, "output", where, kind=list)
        if len(output) != 2:
            raise DataError(f"{where}: field 'output' must be [chosen, rejected], got {len(output)} responses")
        return [PairRecord(_field(row, "prompt", where), output[0], output[1], where)]
    raise ConfigError(f"dataset.format: unknown format {fmt!r}")


def read_jsonl(path: str | Path, fmt: str) -> list[Record]:
    """Every record of a JSONL file; the first bad row raises DataError("name.jsonl:LINE: ...")."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: dataset file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the dataset: {exc}") from exc
    records: list[Record] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
        records.extend(parse_row(row, fmt, where))
    if not records:
        raise DataError(f"{path}: the dataset has no rows")
    return records


# ---- synthetic datasets -------------------------------------------------------------------------


def _params(query: str, defaults: dict[str, int], name: str) -> dict[str, int]:
    params = dict(defaults)
    for key, values in urllib.parse.parse_qs(query, keep_blank_values=True).items():
        if key not in defaults:
            raise ConfigError(f"dataset.path: synthetic://{name} has no parameter {key!r} "
                              f"(allowed: {', '.join(defaults)})")
        try:
            params[key] = int(values[-1])
        except ValueError:
            raise ConfigError(f"dataset.path: synthetic://{name} parameter {key!r} must be an integer") from None
    return params


def _sums(rng: random.Random, max_operand: int) -> tuple[str, str]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return f"{a}+{b}=", str(a + b)


WORDS = ("apple", "river", "stone", "cloud", "green", "tiger", "music", "light", "paper", "smile")
WRONG_WORDS = ("no", "maybe", "cat", "hello", "what")


def synthetic_arithmetic(size: int = 512, max_operand: int = 4, seed: int = 0) -> list[PromptRecord]:
    rng = random.Random(seed)
    return [PromptRecord(*_sums(rng, max_operand), f"synthetic://arithmetic#{i}") for i in range(size)]


def synthetic_preferences(size: int = 512, max_operand: int = 4, seed: int = 0) -> list[PairRecord]:
    rng = random.Random(seed)
    records = []
    for i in range(size):
        prompt, answer = _sums(rng, max_operand)
        if i % 2:
            rejected = rng.choice(WRONG_WORDS)
        else:
            rejected = str(rng.choice([n for n in range(2 * max_operand + 1) if str(n) != answer]))
        records.append(PairRecord(prompt, answer, rejected, f"synthetic://preferences#{i}"))
    return records


def synthetic_instructions(size: int = 256, max_operand: int = 4, seed: int = 0) -> list[SFTRecord]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxy"

    def task(i: int) -> tuple[str, str, str]:
        if i % 3 == 0:
            a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
            return "Add the numbers.", f"{a}+{b}", str(a + b)
        if i % 3 == 1:
            word = rng.choice(WORDS)
            return "Repeat the word.", word, word
        letter = rng.choice(letters)
        return "Name the next letter.", letter, chr(ord(letter) + 1)

    records = []
    for i in range(size):
        history = []
        if i % 4 == 3:
            q, inp, a = task(i + 1)
            history = [[f"{q} {inp}", a]]
        instruction, input_text, output = task(i)
        records.append(SFTRecord(format_instruction(instruction, input_text, history), output,
                                 f"synthetic://instructions#{i}"))
    return records


SYNTHETIC = {
    "arithmetic": (synthetic_arithmetic, {"size": 512, "max_operand": 4, "seed": 0}),
    "preferences": (synthetic_preferences, {"size": 512, "max_operand": 4, "seed": 0}),
    "instructions": (synthetic_instructions, {"size": 256, "max_operand": 4, "seed": 0}),
}


def synthetic_dataset(path: str) -> list[Record]:
    """`synthetic://NAME?key=value` -> its records."""
    parsed = urllib.parse.urlsplit(path)
    name = parsed.netloc or parsed.path
    if name not in SYNTHETIC:
        raise ConfigError(f"dataset.path: unknown synthetic dataset {path!r} "
                          f"(choose from {', '.join(SYNTHETIC_PREFIX + n for n in SYNTHETIC)})")
    build, defaults = SYNTHETIC[name]
    params = _params(parsed.query, defaults, name)
    if params["size"] < 1 or params["max_operand"] < 1:
        raise ConfigError(f"dataset.path: {path}: size and max_operand must be at least 1")
    return build(**params)


def synthetic_corpus() -> Iterator[str]:
    """Text the tiny tokenizer learns its merges from: every synthetic dataset, fully rendered."""
    for build, defaults in SYNTHETIC.values():
        for record in build(**defaults):
            yield from (getattr(record, f) for f in ("prompt", "answer", "chosen", "rejected", "response")
                        if getattr(record, f, None))


# ---- loading for an algorithm ----------------------------------------------------------------


def convert(records: Sequence[Record], kind: str, fmt: str) -> list[Record]:
    """Records in the shape an algorithm consumes (`kind`: prompts | pairs | sft)."""
    if kind == "prompts":
        return [r if isinstance(r, PromptRecord)
                else PromptRecord(r.prompt, r.response if isinstance(r, SFTRecord) else None, r.source)
                for r in records]
    if kind == "pairs":
        if not all(isinstance(r, PairRecord) for r in records):
            raise ConfigError(f"dataset.format: preference training needs pairs ({', '.join(PAIR_FORMATS)}), "
                              f"got {fmt}")
        return list(records)
    if kind == "sft":
        out: list[Record] = []
        for r in records:
            if isinstance(r, SFTRecord):
                out.append(r)
            elif isinstance(r, PairRecord):
                out.append(SFTRecord(r.prompt, r.chosen, r.source))
            elif r.answer is None:
                raise DataError(f"{r.source}: sft needs a response: field 'answer' is missing")
            else:
                out.append(SFTRecord(r.prompt, r.answer, r.source))
        return out
    raise ValueError(f"unknown dataset kind {kind!r}")


def load_dataset(path: str, fmt: str, *, kind: str) -> list[Record]:
    """Read a JSONL file or a synthetic dataset and convert it for `kind` (rlhf_contract.algorithms: each algorithm's `data`)."""
    if path.startswith(SYNTHETIC_PREFIX):
        records = synthetic_dataset(path)
        fmt = {PromptRecord: "prompts", PairRecord: "pairs", SFTRecord: "instruction"}[type(records[0])]
    else:
        records = read_jsonl(path, fmt)
    return convert(records, kind, fmt)


# ---- sampler -----------------------------------------------------------------------------------


class Sampler:
    """Endless, deterministic batches of dataset indices whose position can be saved and restored.

    Epoch e visits every index once in the order of a permutation seeded by (seed, e); a batch may
    span two epochs. Every data-parallel rank draws the same global batch and takes its shard, so
    the position is one (epoch, index) for the whole role.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, epoch: int = 0, index: int = 0):
        if size < 1:
            raise DataError("the dataset is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.index = epoch, index

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.index:self.index + self.batch_size - len(batch)]
            batch.extend(take)
            self.index += len(take)
            if self.index >= self.size:
                self.epoch, self.index = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ConfigError(f"hyperparameters.seed: {self.seed} differs from the checkpoint's {state['seed']}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Contiguous slice `rank` of `world_size` (sizes differ by at most one)."""
    per, extra = divmod(len(items), world_size)
    start = rank * per + min(rank, extra)
    return list(items[start:start + per + (rank < extra)])


# ---- tokenisation -------------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, T) positions counting real tokens only, so left padding starts at 0.

    Generation computes positions this way; pass the same ones when re-scoring the sequences.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompts(tokenizer, prompts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation; too long ones keep their last `max_length` tokens."""
    rows = [tokenizer(p)["input_ids"][-max_length:] for p in prompts]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def encode_prompt_responses(tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                            max_prompt_length: int, max_response_length: int) -> dict[str, torch.Tensor]:
    """Right-padded `prompt + response + EOS` rows for DPO / RM / SFT.

    Returns input_ids, attention_mask and loss_mask (1 on response tokens incl. EOS), all (B, T);
    SFT labels are `input_ids.masked_fill(loss_mask == 0, -100)`. Prompts keep their last tokens,
    responses their first ones (EOS is kept only when the response fits).
    """
    rows, masks = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p = tokenizer(prompt)["input_ids"][-max_prompt_length:]
        r = (tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        r = r[:max_response_length]
        rows.append(p + r)
        masks.append([0] * len(p) + [1] * len(r))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, mask) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        loss_mask[i, :len(row)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def response_mask(response_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled responses (B, R) -> (mask (B, R): tokens up to and including the first EOS,
    ended (B,): whether an EOS was sampled at all; responses without one were truncated)."""
    is_eos = response_ids == eos_token_id
    # Count EOS seen strictly before each position: a token is real while none was seen.
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    return (eos_before == 0).long(), is_eos.any(-1)
