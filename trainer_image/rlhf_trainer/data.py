"""Datasets: loading for an algorithm, synthetic tasks, a resumable sampler, and tokenisation helpers.

    records = load_dataset(cfg.dataset.path, cfg.dataset.format, kind=ALGORITHMS[cfg.algorithm].data)
    sampler = Sampler(len(records), cfg.hyperparameters.batch_size, seed=cfg.hyperparameters.seed)
    batch = [records[i] for i in sampler.next_batch()]

Files (JSONL, JSON, Parquet, CSV, save_to_disk folders) and their row formats are read by
rlhf_trainer.formats; the records are defined in rlhf_trainer.records.

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
- `synthetic://partial_sums` (prompts) and `synthetic://partial_sum_steps` (stepwise): multi-operand
  sums solved one partial sum per line, for process reward models (rlhf_trainer.stepwise). They
  are not part of the tiny tokenizer's corpus, so adding them changed no tokenisation.
"""

from __future__ import annotations

import random
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from rlhf_contract.config import PAIR_FORMATS, SYNTHETIC_PREFIX

from rlhf_trainer.chat import RAW_GENERATION_PROMPT, raw_block
from rlhf_trainer.errors import ConfigError, DataError
from rlhf_trainer.formats import read_records, read_table
from rlhf_trainer.records import PairRecord, PromptRecord, Record, SFTRecord, StepRecord

# ---- instruction template -----------------------------------------------------------------------


def format_instruction(instruction: str, input_text: str = "", history: Sequence[Sequence[str]] = ()) -> str:
    """Alpaca-style prompt; earlier turns come first as instruction/response blocks.

    The text of the synthetic instruction set; the blocks are those the `raw` template writes a
    conversation with (rlhf_trainer.chat.raw_block)."""
    turns = [raw_block("user", q) + raw_block("assistant", a) for q, a in history]
    body = raw_block("user", instruction) + (raw_block("input", input_text) if input_text else "")
    return "".join(turns) + body + RAW_GENERATION_PROMPT


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
    from rlhf_trainer.stepwise import SYNTHETIC_STEPS  # it builds this module's records

    builders = {**SYNTHETIC, **SYNTHETIC_STEPS}
    parsed = urllib.parse.urlsplit(path)
    name = parsed.netloc or parsed.path
    if name not in builders:
        raise ConfigError(f"dataset.path: unknown synthetic dataset {path!r} "
                          f"(choose from {', '.join(SYNTHETIC_PREFIX + n for n in builders)})")
    build, defaults = builders[name]
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
    """Records in the shape an algorithm consumes (`kind`: prompts | pairs | sft | steps)."""
    if kind == "steps":
        if not all(isinstance(r, StepRecord) for r in records):
            raise ConfigError(f"dataset.format: a process reward model learns from stepwise rows, got {fmt}")
        return list(records)
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


def load_dataset(path: str, fmt: str, *, kind: str, fields: dict[str, str] | None = None) -> list[Record]:
    """Read a dataset file / folder (rlhf_trainer.formats) or a synthetic dataset and convert it for
    `kind` (rlhf_contract.algorithms: each algorithm's `data`); `fields` maps format names to the file's columns."""
    if path.startswith(SYNTHETIC_PREFIX):
        records = synthetic_dataset(path)
        fmt = {PromptRecord: "prompts", PairRecord: "pairs", SFTRecord: "instruction",
               StepRecord: "stepwise"}[type(records[0])]
    else:
        records, fmt = read_records(path, fmt, fields)
    return convert(records, kind, fmt)


def load_texts(path: str) -> list[str]:
    """Plain texts for a language-modelling term (PPO-ptx's pretraining data): rows {"text": str} of a
    dataset file (rlhf_trainer.formats reads it), or a synthetic:// dataset rendered as prompt + response."""
    if path.startswith(SYNTHETIC_PREFIX):
        return [r.prompt + (getattr(r, "response", None) or getattr(r, "answer", None) or getattr(r, "chosen", ""))
                for r in synthetic_dataset(path)]
    rows, where = read_table(path)
    texts = []
    for i, row in enumerate(rows):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{where(i)}: field 'text' must be a string, got {str(text)[:60]!r}")
        texts.append(text)
    if not texts:
        raise DataError(f"{path}: the text dataset has no rows")
    return texts


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of `text + EOS`, each cut to its first max_length tokens: input_ids and
    attention_mask (B, T)."""
    rows = [(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])[:max_length] for t in texts]
    return pad_right([[] for _ in rows], rows, tokenizer.pad_token_id)


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


def pad_left(rows: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Prompt token rows -> left-padded input_ids and attention_mask (B, T), as generation wants them."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pad_right(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
              pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `prompt + response` rows for DPO / RM / SFT (rlhf_trainer.tokenized makes the rows).

    Returns input_ids, attention_mask and loss_mask (1 on response tokens), all (B, T); SFT labels
    are `input_ids.masked_fill(loss_mask == 0, -100)`.
    """
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    loss_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[i, :len(p) + len(r)] = torch.tensor([*p, *r])
        attention_mask[i, :len(p) + len(r)] = 1
        loss_mask[i, len(p):len(p) + len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def response_mask(response_ids: torch.Tensor, stop_ids: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled responses (B, R) -> (mask (B, R): tokens up to and including the first stop token,
    ended (B,): whether a stop token was sampled at all; responses without one were truncated).

    `stop_ids` are every id that ends a response (a model may have several EOS ids)."""
    stops = torch.tensor([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), dtype=response_ids.dtype)
    is_eos = torch.isin(response_ids, stops)
    # Count EOS seen strictly before each position: a token is real while none was seen.
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    return (eos_before == 0).long(), is_eos.any(-1)
