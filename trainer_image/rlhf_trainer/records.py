"""What a dataset row becomes: prompts, preference pairs, prompt/response pairs, stepwise responses.

A prompt is either plain text or a conversation: a tuple of chat messages ({"role", "content"},
plus any other non-empty keys a chat template may read), the last of them not an assistant turn.
How a prompt becomes tokens (chat template, raw text) is decided later by rlhf_trainer.chat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]
Conversation = tuple[Message, ...]
Prompt = str | Conversation


@dataclass(frozen=True)
class PromptRecord:
    prompt: Prompt
    answer: str | None = None  # reference answer for rule rewards (exact_match)
    source: str = ""  # "file.jsonl:LINE" or "file.parquet:row N", for error messages raised later


@dataclass(frozen=True)
class PairRecord:
    prompt: Prompt
    chosen: str
    rejected: str
    source: str = ""


@dataclass(frozen=True)
class SFTRecord:
    prompt: Prompt  # text or the conversation before the response
    response: str  # the assistant's answer that the loss is computed on
    source: str = ""


@dataclass(frozen=True)
class StepRecord:
    """A response labelled step by step, for process reward models (TRL's stepwise format)."""

    prompt: Prompt
    steps: tuple[str, ...]  # the completion's steps, without separators
    targets: tuple[float, ...]  # each step's label as a probability target in [0, 1] (losses.prm.label_target)
    source: str = ""


Record = PromptRecord | PairRecord | SFTRecord | StepRecord


def prompt_text(prompt: Prompt) -> str:
    """A short human-readable form of a prompt (for logs and error messages): the last user turn."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]
