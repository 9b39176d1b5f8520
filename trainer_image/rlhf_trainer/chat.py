"""Prompts and responses -> token ids, through the model's chat template, raw text, or a user template.

    renderer = Renderer(tokenizer, cfg.dataset.template, stop_ids=models.stop_token_ids(model, tokenizer))
    renderer.prompt_ids(record.prompt)                      # for sampling: ends with the generation prompt
    renderer.response_ids(record.prompt, record.response)   # the response's tokens after prompt_ids

`dataset.template` (docs/spec.md "Datasets"):
- `auto`: `chat` when the tokenizer has a chat template, else `raw`;
- `chat`: `tokenizer.apply_chat_template`; a text prompt is one user turn. The prompt is rendered
  with the generation prompt (`<|im_start|>assistant\n`); a response is the text the template adds
  after it for the assistant turn, cut after the first stop token (the turn's end-of-turn token;
  what follows it, such as a newline, is never trained on or sampled). Text is tokenized with
  add_special_tokens=False, as transformers' own apply_chat_template(tokenize=True) does, so a
  template that writes the BOS token gets exactly one;
- `raw`: text prompts as they are (tokenized with the tokenizer's special tokens, e.g. its BOS);
  conversations as Alpaca blocks (`### Instruction:` / `### Response:`, as in
  rlhf_trainer.data.format_instruction); the response is its text plus EOS;
- any other value holding `{{` or `{%`: a Jinja chat template used instead of the tokenizer's (and
  saved with the exported tokenizer).

Prompt and response are tokenized separately and concatenated, as generation produces them (the
prompt's ids, then sampled ids), so training rows and sampled rows split at the same place.

A multi-turn rollout (rlhf_trainer.multiturn) continues a sampled turn with
`renderer.environment_ids(prompt, history, message, ended=...)`: the tokens that close the policy's turn,
the environment's message as the next user turn, and the next generation prompt, rendered by the
template as the difference of two renders (verl's multi-turn rollouts compute the tokens between
turns the same way), so the sampled ids are never re-tokenized.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf_trainer.errors import ConfigError, DataError
from rlhf_trainer.records import Conversation, Prompt

MODES = ("auto", "chat", "raw")
# Stands for a sampled turn's text while the template renders what surrounds it.
PLACEHOLDER = "\x00policy-turn\x00"
RAW_HEADERS = {"user": "Instruction", "assistant": "Response", "input": "Input"}
RAW_GENERATION_PROMPT = "### Response:\n"  # where a raw conversation's answer starts


def is_jinja(template: str) -> bool:
    return "{{" in template or "{%" in template


def raw_block(role: str, text: str) -> str:
    """One Alpaca block: `### Instruction:\\n...\\n` for a user turn, `### Response:` for the assistant."""
    return f"### {RAW_HEADERS.get(role, role.capitalize())}:\n{text}\n"


def raw_conversation(turns: Conversation) -> str:
    """A conversation as Alpaca text ending with the response header; system turns come first as text."""
    system = "".join(f"{m['content']}\n" for m in turns if m["role"] == "system")
    body = "".join(raw_block(m["role"], m["content"]) for m in turns if m["role"] != "system")
    return system + body + RAW_GENERATION_PROMPT


def as_conversation(prompt: Prompt) -> list[dict]:
    """A text prompt is one user turn; a conversation is copied into plain dicts (JSON may give lists)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def cut_at_stop(ids: list[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """(ids up to and including the first stop token, whether one was found)."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i + 1], True
    return ids, False


class Renderer:
    """Turns prompts (text or conversations) and responses into token ids for one tokenizer.

    `template` is a dataset.template value; `stop_ids` are every token that ends a response (the
    model's EOS ids; the tokenizer's EOS is always one). Raises ConfigError for `chat` without a
    chat template and for a Jinja template that does not render a one-turn conversation.
    """

    def __init__(self, tokenizer, template: str = "auto", *, stop_ids: Sequence[int] = (),
                 setting: str = "dataset.template"):
        self.tokenizer = tokenizer
        self.setting = setting
        if template not in MODES and not is_jinja(template):
            raise ConfigError(f"{setting}: {template[:40]!r} is not one of {', '.join(MODES)} nor a Jinja template")
        if is_jinja(template):
            tokenizer.chat_template = template
            self.mode = "chat"
            self._check_renders()
        elif template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{setting}: chat, but the tokenizer has no chat template; use raw, or give a "
                              f"Jinja chat template as {setting}")
        else:
            has_template = bool(getattr(tokenizer, "chat_template", None))
            self.mode = "chat" if template == "chat" or (template == "auto" and has_template) else "raw"
        self.eos_id = tokenizer.eos_token_id
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *stop_ids]))

    def _check_renders(self) -> None:
        try:
            self._render([{"role": "user", "content": "hi"}], generation=True)
        except Exception as exc:  # jinja2 raises several types
            raise ConfigError(f"{self.setting}: the Jinja chat template does not render a user turn: {exc}") from exc

    def _render(self, turns: list[dict], *, generation: bool) -> str:
        return self.tokenizer.apply_chat_template(turns, add_generation_prompt=generation, tokenize=False)

    def _render_at(self, turns: list[dict], generation: bool, where: str) -> str:
        try:
            return self._render(turns, generation=generation)
        except Exception as exc:  # jinja2.TemplateError, or a template's raise_exception()
            raise DataError(f"{where or 'a row'}: the chat template ({self.setting}) fails on this row: {exc}") from exc

    def prompt_text(self, prompt: Prompt, where: str = "") -> str:
        """The prompt as the text the model continues (chat: ending with the generation prompt)."""
        if self.mode == "chat":
            return self._render_at(as_conversation(prompt), True, where)
        return prompt if isinstance(prompt, str) else raw_conversation(tuple(prompt))

    def prompt_ids(self, prompt: Prompt, where: str = "") -> list[int]:
        """Token ids of the prompt (raw text gets the tokenizer's special tokens, chat text none)."""
        text = self.prompt_text(prompt, where)
        return self.tokenizer(text, add_special_tokens=self.mode == "raw")["input_ids"]

    def response_ids(self, prompt: Prompt, response: str, where: str = "") -> list[int]:
        """Token ids of `response` as the turn after `prompt`, ending with a stop token.

        Raises DataError (naming `where`) when the template fails, or does not render the
        conversation as the prompt's text followed by the response's.
        """
        if self.mode == "raw":
            return self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.eos_id]
        turns = as_conversation(prompt)
        head = self._render_at(turns, True, where)
        full = self._render_at([*turns, {"role": "assistant", "content": response}], False, where)
        if not full.startswith(head):
            raise DataError(f"{where or 'a row'}: the chat template ({self.setting}) does not render the "
                            f"conversation as the prompt followed by the response; use raw or another template")
        ids, stopped = cut_at_stop(self.tokenizer(full[len(head):], add_special_tokens=False)["input_ids"],
                                   self.stop_ids)
        return ids if stopped else ids + [self.eos_id]

    def environment_ids(self, prompt: Prompt, history: Sequence[str], message: str, *, ended: bool,
                        where: str = "") -> list[int]:
        """Token ids between a sampled policy turn and the next one: the rest of the policy's turn,
        `message` (the environment's turn), and the generation prompt of the next policy turn.

        history: the texts after the prompt so far, alternating policy turn, environment message, ...,
        ending with the policy turn just sampled. ended: whether that turn sampled a stop token;
        a truncated turn is closed here (under a chat template its end-of-turn token is then an
        environment token, never an action). chat: the template's own text, as the difference of
        two renders with a placeholder for the last turn's text; raw: "\\n" + message + "\\n" after a
        text prompt, an Alpaca instruction block and "### Response:" after a conversation.
        Raises DataError (naming `where`) when the template fails or renders the conversation with
        a different prefix once the message is added.
        """
        if self.mode == "raw":
            text = (f"\n{message}\n" if isinstance(prompt, str)
                    else "\n" + raw_block("user", message) + RAW_GENERATION_PROMPT)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        turns = as_conversation(prompt)
        for i, text in enumerate(history[:-1]):
            turns.append({"role": "assistant" if i % 2 == 0 else "user", "content": text})
        turns.append({"role": "assistant", "content": PLACEHOLDER})
        closed = self._render_at(turns, False, where)
        following = self._render_at([*turns, {"role": "user", "content": message}], True, where)
        if not following.startswith(closed) or PLACEHOLDER not in closed:
            raise DataError(f"{where or 'a row'}: the chat template ({self.setting}) does not render a "
                            f"conversation as its earlier turns followed by the next one; use raw or another template")
        tail = self.tokenizer(closed[closed.rindex(PLACEHOLDER) + len(PLACEHOLDER):],
                              add_special_tokens=False)["input_ids"]
        if ended:  # the policy sampled the turn's stop token: the environment adds what follows it
            cut, found = cut_at_stop(tail, self.stop_ids)
            tail = tail[len(cut):] if found else tail
        return tail + self.tokenizer(following[len(closed):], add_special_tokens=False)["input_ids"]
