"""Model and tokenizer loading: Hugging Face folders, or tiny random models for tests and CPU runs.

    tok = load_tokenizer("tiny://llama")
    policy = load_policy("tiny://llama", seed=0)        # AutoModelForCausalLM
    critic = load_value_model("tiny://llama", seed=0)   # backbone + scalar value head per token
    rm = load_reward_model("tiny://llama", seed=0)      # AutoModelForSequenceClassification, 1 label
    prm = load_token_classifier("tiny://llama", seed=0) # AutoModelForTokenClassification, 2 labels (PRM)
    save_pretrained(policy, tok, "export/")

`path` is a local HF model folder (config.json + weights + tokenizer files) or `tiny://llama` /
`tiny://qwen2`: 2 layers, hidden 64, random weights from `seed`, so every role that loads the same
path and seed (actor and reference) starts from identical weights without sharing files. Nothing
is ever downloaded: a path that is not a local folder is a ConfigError.

The tiny tokenizer is byte-level BPE over printable ASCII (other characters become <unk>) with
single-digit tokens and merges learned from the synthetic datasets' text by a small deterministic
trainer below. Every process
must build the same vocabulary, and the Rust BPE trainer breaks frequency ties by hash-map order,
so the merges are computed here in Python with an explicit tie-break instead.
"""

from __future__ import annotations

import collections
import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tok_models
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

from rlhf_trainer.data import synthetic_corpus
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.forward import contiguous_rows, packed_hidden_states, require_packing

TINY_PREFIX = "tiny://"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# A small vocabulary matters for RL from a random init: with ~200 tokens a sampled token is a
# digit 5% of the time, so exact_match rewards show up in the first batches. Hence printable
# ASCII, tab and newline only (anything else encodes as <unk>) plus 100 learned merges.
TINY_BYTES = (9, 10, *range(32, 127))
TINY_MERGES = 100
# The tiny architecture: big enough to learn the synthetic tasks, small enough for CPU tests.
TINY_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512,
)
TINY_ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification),
}


# ---- tokenizer ---------------------------------------------------------------------------------


def learn_bpe_merges(words: collections.Counter[str], num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges in order: each round merges the most frequent adjacent pair.

    Ties go to the lexicographically smallest pair, so the result depends only on `words`.
    `words` are pre-tokenized byte-level strings (`ĠHello`) with their counts.
    """
    splits = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, symbols in splits.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, symbols in splits.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = merged
    return merges


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE works on (`Ġ` is a space)."""
    visible = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = (b for b in range(256) if b not in visible)
    return {**{b: chr(b) for b in visible}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _tiny_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Digits are split one by one (as Llama 3 and Qwen do), so every number is a run of digit
    # tokens and no merge ever glues a digit to a space or to another digit.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


@functools.cache
def _tiny_tokenizer_json() -> str:
    # Cached per process: the same string every call, ~0.1 s the first time.
    symbols = sorted(_byte_symbols()[b] for b in TINY_BYTES)
    pre = _tiny_pre_tokenizer()
    words: collections.Counter[str] = collections.Counter()
    for text in synthetic_corpus():
        words.update(w for w, _ in pre.pre_tokenize_str(text) if all(c in symbols for c in w))
    merges = learn_bpe_merges(words, TINY_MERGES)
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, UNK, *symbols])}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=merges, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD, BOS, EOS, UNK])
    # Every encoded text starts with <s>, as with Llama's tokenizer; helpers that join a prompt
    # and a response encode the response with add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
    )
    tok.padding_side = "left"
    return tok


def _tiny_arch(path: str) -> str:
    name = path[len(TINY_PREFIX):]
    if name not in TINY_ARCHITECTURES:
        raise ConfigError(f"model path {path!r}: unknown tiny model (choose from "
                          f"{', '.join(TINY_PREFIX + n for n in TINY_ARCHITECTURES)})")
    return name


def _local_folder(path: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model path {path!r}: not a Hugging Face model folder (no config.json there); "
                          f"models are never downloaded, mount them into the container")
    return folder


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer for `path`, left-padding (prompts are generated from), with a pad token."""
    if path.startswith(TINY_PREFIX):
        _tiny_arch(path)
        return tiny_tokenizer()
    tok = AutoTokenizer.from_pretrained(_local_folder(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # common for causal LMs; masks come from attention_mask
    tok.padding_side = "left"
    return tok


def generation_settings(path: str) -> list:
    """The model's config and generation_config (read without the weights), for its EOS ids.

    Tiny models have none beyond their tokenizer's EOS: an empty list.
    """
    if path.startswith(TINY_PREFIX):
        return []
    folder = _local_folder(path)
    configs = [AutoConfig.from_pretrained(folder, local_files_only=True)]
    if (folder / "generation_config.json").is_file():
        configs.append(GenerationConfig.from_pretrained(folder, local_files_only=True))
    return configs


def _tiny_config(path: str, **extra):
    config_cls = TINY_ARCHITECTURES[_tiny_arch(path)][0]
    tok = tiny_tokenizer()
    return config_cls(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **TINY_SHAPE, **extra,
    )


def _seeded(build, seed: int):
    # A private RNG stream: the weights depend on `seed` only, not on what ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _no_tiny_loading(path: str, load_kwargs: dict) -> None:
    if load_kwargs:  # a quantized base (rlhf_trainer.quantization) is read from a folder by from_pretrained
        raise ConfigError(f"model path {path!r}: a tiny model is built in memory and cannot be loaded with "
                          f"{', '.join(sorted(load_kwargs))}; save it to a folder first (save_pretrained)")


def load_policy(path: str, *, seed: int, **load_kwargs) -> PreTrainedModel:
    """A causal LM (actor / reference). Same path and seed -> the same weights in every process.
    `load_kwargs` go to from_pretrained (quantization_config, device_map: rlhf_trainer.quantization)."""
    if path.startswith(TINY_PREFIX):
        _no_tiny_loading(path, load_kwargs)
        config = _tiny_config(path)
        model_cls = TINY_ARCHITECTURES[_tiny_arch(path)][1]
        return _seeded(lambda: model_cls(config), seed)
    return AutoModelForCausalLM.from_pretrained(_local_folder(path), local_files_only=True, **load_kwargs)


def load_reward_model(path: str, *, seed: int, **load_kwargs) -> PreTrainedModel:
    """A sequence classifier with one label: the score of the last non-pad token of each row.
    `load_kwargs` go to from_pretrained, as for load_policy."""
    if path.startswith(TINY_PREFIX):
        _no_tiny_loading(path, load_kwargs)
        config = _tiny_config(path, num_labels=1)
        model_cls = TINY_ARCHITECTURES[_tiny_arch(path)][2]
        return _seeded(lambda: model_cls(config), seed)
    folder = _local_folder(path)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, local_files_only=True,
                                                               **load_kwargs)
    if model.config.pad_token_id is None:
        # Pooling finds the last real token through pad_token_id; borrow the tokenizer's.
        model.config.pad_token_id = load_tokenizer(path).pad_token_id
    return model


def load_token_classifier(path: str, *, seed: int, num_labels: int = 2) -> PreTrainedModel:
    """A per-token classifier (a process reward model: label 1 = the step is correct), as TRL's
    PRMTrainer trains; built from a causal LM's folder (new head) or read back from a PRM export."""
    if path.startswith(TINY_PREFIX):
        config = _tiny_config(path, num_labels=num_labels)
        return _seeded(lambda: AutoModelForTokenClassification.from_config(config), seed)
    return AutoModelForTokenClassification.from_pretrained(_local_folder(path), num_labels=num_labels,
                                                           local_files_only=True)


class ValueModel(nn.Module):
    """PPO critic: a causal LM's backbone and a linear head giving one value per token."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        self.config = backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, padding_free: bool = False) -> torch.Tensor:
        """(B, T) token ids -> (B, T) values; values at padding positions are meaningless.
        `padding_free` (hyperparameters.paddingFree): the backbone runs the rows' real tokens packed
        (forward.packed_hidden_states) when they are contiguous, after checking once that it keeps
        packed rows apart (ConfigError naming the field otherwise); the same values to float rounding."""
        if padding_free:
            require_packing(self.backbone)  # whatever this batch's rows: ZeRO-3 ranks run the check alike
        if padding_free and contiguous_rows(attention_mask):
            hidden = packed_hidden_states(self.backbone, input_ids, attention_mask)
        else:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=False).last_hidden_state
        return self.value_head(hidden).squeeze(-1)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)


CRITIC_INITS = ("policy", "reward", "prm")


def load_value_model(path: str, *, seed: int, init: str = "policy") -> ValueModel:
    """The PPO critic: a backbone and a value head, both from the model at `path`.

    init "policy": `path` is a causal LM; its backbone and a small seeded head (OpenRLHF's std
    1/(hidden+1): initial values near 0, not noise). init "reward": `path` is a one-label sequence
    classifier (a reward model); its backbone and its score head, so the first values are the reward
    model's scores (InstructGPT, Ouyang et al. 2022, sec. 3.5; OpenRLHF's default critic). init "prm":
    `path` is a process reward model (a two-label token classifier, `algorithm: prm`); its backbone and
    a value head (z_1 - z_0) / 2 from its two labels (ValueInit, losses.prm.value_head_from_prm).
    """
    if init not in CRITIC_INITS:
        raise ValueError(f"unknown critic init {init!r}")
    loaders = {"policy": load_policy, "reward": load_reward_model, "prm": load_token_classifier}
    source = loaders[init](path, seed=seed)
    hidden_size = source.config.get_text_config().hidden_size

    def build() -> ValueModel:
        model = ValueModel(source.base_model, hidden_size)
        nn.init.zeros_(model.value_head.bias)
        if init == "prm":
            from rlhf_trainer.losses.prm import value_head_from_prm

            head = getattr(source, "score", None) or getattr(source, "classifier", None)  # Llama/Qwen: score
            if not isinstance(head, nn.Linear) or head.weight.shape[0] != 2:
                raise ConfigError(f"critic.model: {path} has no two-label head to start the value head from")
            weight, bias = value_head_from_prm(head.weight.data, None if head.bias is None else head.bias.data)
            model.value_head.weight.data.copy_(weight)
            model.value_head.bias.data.copy_(bias)
        elif init == "reward":
            score = getattr(source, "score", None)
            if not isinstance(score, nn.Linear) or score.weight.shape != model.value_head.weight.shape:
                raise ConfigError(f"critic.model: {path} has no one-label score head to start the value head from")
            model.value_head.weight.data.copy_(score.weight.data)
            if score.bias is not None:
                model.value_head.bias.data.copy_(score.bias.data)
        else:
            nn.init.normal_(model.value_head.weight, std=1.0 / (hidden_size + 1))
        return model

    return _seeded(build, seed + 1)


def is_sequence_classifier(path: str) -> bool:
    """Whether a model folder holds a sequence classifier (a reward model); tiny:// models are policies."""
    if path.startswith(TINY_PREFIX):
        return False
    architectures = AutoConfig.from_pretrained(_local_folder(path), local_files_only=True).architectures or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path,
                    *, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` (+ tokenizer) as an HF folder that load_policy / load_reward_model read back.

    `state_dict` overrides the module's own tensors: under ZeRO-3 pass the consolidated weights. Its
    tied weights (a model with tie_word_embeddings: lm_head = the input embeddings) arrive as separate
    copies; they are made one tensor again so the file holds them once, as a live model's save does
    (SmolLM2-135M: 538 MB instead of 651 MB).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        state_dict = dict(state_dict)
        for tied, source in model.get_expanded_tied_weights_keys(all_submodels=True).items():
            if tied in state_dict and source in state_dict and torch.equal(state_dict[tied], state_dict[source]):
                state_dict[tied] = state_dict[source]
    model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
    return directory
