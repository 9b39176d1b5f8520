"""Records -> token rows at startup: lengths enforced, truncation counted, the job refused above a share.

    rows, report = tokenize_records(records, renderer, "pairs", max_prompt_length=512, max_length=1024)
    if (message := truncation_error(report, "pairs.jsonl", "pairs", max_prompt_length=512, max_length=1024,
                                    max_share=0.1)):
        raise ConfigError(message)

Lengths (docs/spec.md "Datasets"): a prompt keeps its last `max_prompt_length` tokens (for dpo/rm/sft
also at most `max_length - 1`, so one response token fits); a response keeps its first
`max_length - len(prompt)` tokens (dpo/rm/sft; RL samples its responses, bounded by maxNewTokens).
A row is truncated when either part lost tokens; a cut response loses its EOS, which is what a
row too long to train on looks like (TRL's DPO/SFT trainers truncate the same way, keep_end for
prompts and keep_start for completions). A pair whose chosen and rejected rows are identical token
for token (after truncation, or already in the data) gives DPO a zero gradient and the reward model
no signal (loss log 2, accuracy 0): it is dropped and counted.

Every row is tokenized once, at startup, before a model is built, so a template that fails on row N
and a dataset too long for the settings both fail the job at once (permanent errors) instead of
after the first steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rlhf_trainer.records import PairRecord, Prompt, PromptRecord, Record, SFTRecord, StepRecord

Ids = tuple[int, ...]


@dataclass(frozen=True)
class PromptRow:
    """A prompt to sample from (ppo/grpo/rloo): its token ids and what the rewards need."""

    ids: Ids
    truncated: bool
    prompt: Prompt  # as in the dataset (text or messages), for rule rewards and the reward model
    answer: str | None
    source: str


@dataclass(frozen=True)
class ResponseRow:
    """One sft row: prompt ids (no loss) and response ids (loss, ending with a stop token if it fits)."""

    prompt: Ids
    response: Ids
    truncated: bool
    source: str


@dataclass(frozen=True)
class PairRow:
    """One dpo / rm pair: the shared prompt ids and each response's ids."""

    prompt: Ids
    chosen: Ids
    rejected: Ids
    truncated: bool
    source: str


@dataclass(frozen=True)
class StepRow:
    """One prm row: prompt + (step + separator) ids, each labelled separator's index and its target."""

    ids: Ids
    positions: tuple[int, ...]
    targets: tuple[float, ...]
    truncated: bool
    source: str


Row = PromptRow | ResponseRow | PairRow | StepRow


@dataclass(frozen=True)
class LengthReport:
    """What tokenizing a dataset did to it (counts of rows as read, before identical pairs are dropped)."""

    rows: int
    truncated: int  # rows that lost prompt or response tokens
    dropped: int  # pairs dropped as identical after truncation
    longest_prompt: int  # tokens of the longest prompt before truncation
    longest_row: int  # tokens of the longest prompt + response before truncation (0 for prompts)
    prompts_truncated: int  # rows whose prompt was cut (a share of `truncated`)

    @property
    def share(self) -> float:
        return self.truncated / self.rows if self.rows else 0.0

    def describe(self) -> str:
        return (f"{self.rows} rows, {self.truncated} truncated ({self.share:.1%}), {self.dropped} identical pairs "
                f"dropped; longest prompt {self.longest_prompt} tokens, longest row {self.longest_row}")


def truncate_row(prompt: Sequence[int], response: Sequence[int], *, max_prompt_length: int,
                 max_length: int) -> tuple[Ids, Ids, bool]:
    """(prompt ids, response ids, truncated): the prompt's last tokens, then the response's first ones.

    The prompt keeps at most min(max_prompt_length, max_length - 1) tokens, the response fills the
    rest of max_length. `truncated` is whether either lost a token.
    """
    keep_prompt = max(1, min(max_prompt_length, max_length - 1))
    p = tuple(prompt[-keep_prompt:]) if len(prompt) > keep_prompt else tuple(prompt)
    r = tuple(response[:max_length - len(p)])
    return p, r, len(p) < len(prompt) or len(r) < len(response)


def tokenize_records(records: Sequence[Record], renderer, kind: str, *, max_prompt_length: int,
                     max_length: int, step_separator: str = "\n") -> tuple[list[Row], LengthReport]:
    """Every record as token rows for `kind` (prompts | pairs | sft | steps) and what truncation did.

    `renderer` is an rlhf_trainer.chat.Renderer (prompt_ids / response_ids); its DataErrors name the
    record's source row. Steps are joined with `step_separator` (rlhf_trainer.stepwise.encode_steps).
    """
    rows: list[Row] = []
    truncated = dropped = longest_prompt = longest_row = prompts_cut = 0
    for record in records:
        prompt = renderer.prompt_ids(record.prompt, record.source)
        longest_prompt = max(longest_prompt, len(prompt))
        if kind == "prompts":
            assert isinstance(record, PromptRecord), record
            cut = len(prompt) > max_prompt_length
            truncated += cut
            prompts_cut += cut
            rows.append(PromptRow(tuple(prompt[-max_prompt_length:]), cut, record.prompt, record.answer, record.source))
            continue
        limits = {"max_prompt_length": max_prompt_length, "max_length": max_length}
        if kind == "steps":
            from rlhf_trainer.stepwise import encode_steps

            assert isinstance(record, StepRecord), record
            encoded = encode_steps(renderer.tokenizer, prompt, record.steps, step_separator, **limits)
            cut = encoded.truncated
            longest_row = max(longest_row, encoded.full_length)
            rows.append(StepRow(tuple(encoded.ids), tuple(encoded.positions), record.targets[:len(encoded.positions)],
                                cut, record.source))
        elif kind == "sft":
            assert isinstance(record, SFTRecord), record
            response = renderer.response_ids(record.prompt, record.response, record.source)
            p, r, cut = truncate_row(prompt, response, **limits)
            longest_row = max(longest_row, len(prompt) + len(response))
            rows.append(ResponseRow(p, r, cut, record.source))
        else:
            assert isinstance(record, PairRecord), record
            chosen = renderer.response_ids(record.prompt, record.chosen, record.source)
            rejected = renderer.response_ids(record.prompt, record.rejected, record.source)
            p, c, cut_c = truncate_row(prompt, chosen, **limits)
            _, r, cut_r = truncate_row(prompt, rejected, **limits)
            cut = cut_c or cut_r
            longest_row = max(longest_row, len(prompt) + max(len(chosen), len(rejected)))
            if c == r:
                dropped += 1
            else:
                rows.append(PairRow(p, c, r, cut, record.source))
        truncated += cut
        prompts_cut += len(prompt) > min(max_prompt_length, max_length - 1)
    report = LengthReport(len(records), truncated, dropped, longest_prompt, longest_row, prompts_cut)
    return rows, report


def truncation_error(report: LengthReport, dataset: str, kind: str, *, max_prompt_length: int, max_length: int,
                     max_share: float) -> str | None:
    """The startup error when more than `max_share` of the rows are truncated (None if within it).

    Names the dataset, the share, and each setting that cut rows with the length it would need.
    """
    if report.share <= max_share or report.truncated == 0:
        return None
    raise_these = []
    if report.prompts_truncated:
        raise_these.append(f"hyperparameters.maxPromptLength (now {max_prompt_length}; the longest prompt has "
                           f"{report.longest_prompt} tokens)")
    if kind != "prompts" and report.longest_row > max_length:
        raise_these.append(f"hyperparameters.maxLength (now {max_length}; the longest prompt + response has "
                           f"{report.longest_row} tokens)")
    return (f"dataset {dataset}: {report.truncated} of {report.rows} rows ({report.share:.0%}) would be truncated, "
            f"more than hyperparameters.maxTruncatedShare = {max_share:g}; raise " + " and ".join(raise_these)
            + ", or raise maxTruncatedShare to train on truncated rows")
