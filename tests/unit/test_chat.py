"""rlhf_trainer.chat: prompts and responses through a chat template, raw text, or a user Jinja template,
on the tiny tokenizer and on the real SmolLM2-135M-Instruct tokenizer."""

from __future__ import annotations

import pytest
from rlhf_trainer import models
from rlhf_trainer.chat import Renderer, raw_conversation
from rlhf_trainer.data import format_instruction, pad_right
from rlhf_trainer.errors import ConfigError, DataError
from transformers import AutoTokenizer

USER = {"role": "user", "content": "What is 3+4?"}
SYSTEM = {"role": "system", "content": "Answer with a number."}
# A ChatML-like template in printable ASCII (the tiny vocabulary), writing the BOS token itself.
JINJA = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
         "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def tiny():
    return models.load_tokenizer("tiny://llama")  # a fresh one: a Jinja template is set on it


@pytest.fixture(scope="module")
def smol(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


# ---- raw ------------------------------------------------------------------------------------------


def test_auto_without_a_chat_template_is_raw_text_with_the_tokenizers_bos(tiny):
    renderer = Renderer(tiny, "auto")
    assert renderer.mode == "raw"
    assert renderer.prompt_ids("3+4=") == tiny("3+4=")["input_ids"]
    assert renderer.prompt_ids("3+4=")[0] == tiny.bos_token_id
    assert renderer.response_ids("3+4=", "7") == tiny("7", add_special_tokens=False)["input_ids"] + [tiny.eos_token_id]


def test_raw_conversations_are_alpaca_blocks_with_the_system_turn_first():
    turns = (SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, USER)
    assert raw_conversation(turns) == ("Answer with a number.\n### Instruction:\nHi\n### Response:\nHello\n"
                                       "### Instruction:\nWhat is 3+4?\n### Response:\n")
    # the same blocks as the synthetic instruction set's text
    assert raw_conversation(turns[1:]) == format_instruction("What is 3+4?", history=[["Hi", "Hello"]])


def test_chat_without_a_template_is_a_config_error_naming_the_setting(tiny):
    with pytest.raises(ConfigError, match="dataset.template: chat, but the tokenizer has no chat template"):
        Renderer(tiny, "chat")


# ---- a user Jinja template on the tiny tokenizer --------------------------------------------------


def test_a_jinja_template_renders_prompts_with_one_bos_and_the_generation_prompt(tiny):
    renderer = Renderer(tiny, JINJA)
    assert renderer.mode == "chat" and tiny.chat_template == JINJA  # saved with an exported tokenizer
    assert renderer.prompt_text("3+4=") == "<s><user>3+4=</s>\n<assistant>"
    ids = renderer.prompt_ids((SYSTEM, USER))
    assert ids.count(tiny.bos_token_id) == 1 and ids[0] == tiny.bos_token_id  # not doubled
    assert tiny.decode(ids) == "<s><system>Answer with a number.</s>\n<user>What is 3+4?</s>\n<assistant>"


def test_a_response_ends_at_its_end_of_turn_token_without_what_follows(tiny):
    renderer = Renderer(tiny, JINJA)
    response = renderer.response_ids((USER,), "7")
    # the template writes "7</s>\n": the newline after the end of turn is neither trained nor sampled
    assert response == tiny("7", add_special_tokens=False)["input_ids"] + [tiny.eos_token_id]


def test_an_sft_row_has_loss_on_the_assistant_turn_only(tiny):
    renderer = Renderer(tiny, JINJA)
    prompt = renderer.prompt_ids((SYSTEM, USER))
    response = renderer.response_ids((SYSTEM, USER), "7")
    batch = pad_right([prompt], [response], tiny.pad_token_id)
    trained = batch["input_ids"][0][batch["loss_mask"][0] == 1].tolist()
    assert tiny.decode(trained) == "7</s>"
    assert tiny.decode(batch["input_ids"][0][batch["loss_mask"][0] == 0].tolist()).endswith("<assistant>")


def test_a_jinja_template_that_does_not_render_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="dataset.template: the Jinja chat template does not render a user turn"):
        Renderer(tiny, "{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}")


def test_a_template_failing_on_one_row_is_a_data_error_naming_the_row(tiny):
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
                "{% endif %}{{ m['content'] }}{% endfor %}")
    renderer = Renderer(tiny, template)
    with pytest.raises(DataError, match=r"^train\.jsonl:7: the chat template \(dataset\.template\) fails on this "
                                        r"row: no system turns"):
        renderer.prompt_ids((SYSTEM, USER), "train.jsonl:7")


def test_a_template_that_is_not_prompt_then_response_is_refused(tiny):
    # the generation prompt says "A:" but an assistant turn is written "Assistant:"
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}Assistant: {% endif %}{{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    renderer = Renderer(tiny, template)
    with pytest.raises(DataError, match=r"^t\.jsonl:2: .* does not render the conversation as the prompt followed"):
        renderer.response_ids("hi", "7", "t.jsonl:2")


def test_any_stop_id_ends_a_rendered_response(tiny):
    semicolon = tiny(";", add_special_tokens=False)["input_ids"][0]
    renderer = Renderer(tiny, "{% for m in messages %}{{ m['content'] }};x{% endfor %}", stop_ids=[semicolon])
    assert renderer.stop_ids == (tiny.eos_token_id, semicolon)
    assert renderer.response_ids("a", "b")[-1] == semicolon


# ---- the real SmolLM2 tokenizer -------------------------------------------------------------------


def test_smollm2_auto_uses_its_chat_template_as_transformers_does(smol):
    renderer = Renderer(smol, "auto")
    assert renderer.mode == "chat"
    expected = smol.apply_chat_template([USER], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert renderer.prompt_ids((USER,)) == expected
    text = renderer.prompt_text("What is 3+4?")  # a text prompt is one user turn
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nWhat is 3+4?<|im_end|>\n"
                                                                     "<|im_start|>assistant\n")
    assert renderer.prompt_ids("What is 3+4?").count(smol.convert_tokens_to_ids("<|im_start|>")) == 3


def test_smollm2_response_is_the_assistant_turn_through_im_end(smol):
    renderer = Renderer(smol, "auto")
    response = renderer.response_ids((SYSTEM, USER), "3 + 4 = 7")
    assert smol.decode(response) == "3 + 4 = 7<|im_end|>"
    assert response[-1] == smol.eos_token_id
    # prompt + response are the tokens of the whole conversation, up to the end of the assistant turn
    whole = smol.apply_chat_template([SYSTEM, USER, {"role": "assistant", "content": "3 + 4 = 7"}],
                                     tokenize=True)["input_ids"]
    assert renderer.prompt_ids((SYSTEM, USER)) + response == whole[:len(whole) - 1]  # all but the final "\n"


def test_smollm2_raw_is_plain_text(smol):
    renderer = Renderer(smol, "raw")
    assert renderer.prompt_ids("3+4=") == smol("3+4=")["input_ids"]
    assert renderer.response_ids("3+4=", "7")[-1] == smol.eos_token_id
