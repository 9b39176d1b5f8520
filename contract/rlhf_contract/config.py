"""The trainer config (`$RLHF_CONFIG`, docs/spec.md "Trainer config JSON"): every setting the operator
and the trainer share, as typed dataclasses of knobs, with a strict JSON load and dump.

    cfg = load_config(os.environ["RLHF_CONFIG"])     # the trainer
    text = dump_config(cfg)                            # the operator (its ConfigMap)
    cfg.hyperparameters.clip_range, cfg.roles["actor"].deepspeed.zero_stage

The operator's parse_spec() reads the same dataclasses from the manifest (camelCase keys) and the
CRD's schema for them is generated (rlhf_contract.generate). Parsing is strict: an unknown key, a
wrong type or a value out of range raises ConfigError naming every bad field by path
(`hyperparameters.clip_range: expected a number`), because a typo silently falling back to a default
would train the wrong thing for hours. How to add a field: docs/contract.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_contract import layout
from rlhf_contract.algorithms import (
    ALGORITHMS,
    MODEL_REWARD_TYPES,
    NAMES,
    ON_DATASET_RESPONSES,
    ONLINE,
    REWARD_TYPES,
    ROLE_NAMES,
    SAMPLING,
    role_set_problem,
    run_by,
)
from rlhf_contract.knobs import Rule, knob, settings_of
from rlhf_contract.sources import SCHEME_RULE

REWARD_RULES = ("exact_match", "regex", "callable")
# Row formats of a dataset file (rlhf_trainer.formats); auto is told from the file's columns.
DATASET_FORMATS = ("auto", "prompts", "pairs", "instruction", "ranked", "pair_list", "completion", "messages",
                   "stepwise")
# Dataset formats that hold preference pairs (what algorithms with data "pairs" need)...
PAIR_FORMATS = ("pairs", "ranked", "pair_list")
# ...and those a pair algorithm accepts in the spec (auto is checked by the trainer once told).
FORMATS_FOR_PAIRS = ("auto", *PAIR_FORMATS)
# dataset.template: these words, or a Jinja chat template (any text holding "{{" or "{%").
DATASET_TEMPLATES = ("auto", "chat", "raw")
SYNTHETIC_PREFIX = "synthetic://"
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
KL_ESTIMATORS = ("k1", "k3")
OLD_LOG_PROBS = ("forward", "sampling")  # where an online step's old policy log-probs come from
LOSS_AGGREGATIONS = ("grpo", "dr_grpo", "dapo")  # rlhf_trainer.losses.aggregation, TRL's loss_type names
NON_FINITE_POLICIES = ("fail", "skip")
# "module:function" of a reward callable (the CRD's CEL rule uses the same pattern).
CALLABLE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"

PPO = ("ppo",)
GROUP = ("grpo", "rloo")
# Critic-free policy gradients (rlhf_trainer.algorithms.grpo's loop).
CRITIC_FREE = run_by("grpo")
# Algorithms whose per-token rewards carry a KL penalty and the score on the last token.
SHAPED_REWARD = ("ppo", "reinforce_pp")
# Preference losses on fixed pairs (rlhf_trainer.algorithms.dpo's loop).
PREFERENCE = run_by("dpo")
STEPWISE = ("prm", "prm-label")
# Algorithms whose rollouts may be conversations (hyperparameters.turns > 1; rlhf_trainer.multiturn).
MULTI_TURN = ("ppo", "grpo", "rloo")
# A week: longer than any phase, and far inside what torch's and Python's clocks hold (a timedelta of 1e15 s
# is an OverflowError in every process at start-up, and each gang restart meets it again).
MAX_DISTRIBUTED_TIMEOUT_SECONDS = 7 * 24 * 3600
# Algorithms that read hyperparameters.prefixSharing: a pair's / a group's responses share their prompt.
PREFIX_SHARING = (*PREFERENCE, *CRITIC_FREE)
SELF_CORRECTION = ("off", "score")
DEFAULT_TURN_INSTRUCTION = "There might be an error in the solution above. Please correct it."


class ConfigError(ValueError):
    """The trainer config is invalid; the message names the field path (`hyperparameters.beta: ...`).
    The trainer exits with wire.EXIT_CONFIG_ERROR on it (permanent: no gang restart)."""


@dataclass(frozen=True)
class ModelConfig:
    """Where a model comes from: an HF folder inside the container, or `tiny://llama|qwen2`."""

    path: str = knob(doc="Hugging Face model folder inside the container, tiny://llama | tiny://qwen2, or a "
                         "source: hf://ORG/NAME[@REVISION], s3://BUCKET/PREFIX, pvc://CLAIM[/SUBPATH] (docs/spec.md, "
                         "Sources).", rule=SCHEME_RULE)


@dataclass(frozen=True)
class RewardConfig:
    """How responses are scored (online algorithms): a reward model role, or a rule run by the actor."""

    type: str = knob("model", "model: a reward role scores responses; rule: a verifier run by the actor; prm: "
                             "a process reward model in the reward role scores every step (plus the outcome "
                             "of `rule`, when set).", enum=REWARD_TYPES, max_length=16)
    rule: str = knob("", "Verifier run by the actor when type is rule (prm-label: the verifier of its "
                         "completions).", enum=REWARD_RULES, max_length=16)
    pattern: str = knob("", "regex rule: reward 1 when re.search(pattern, response) matches.", max_length=1024)
    callable: str = knob("", 'callable rule: "module:function" importable in the trainer image.', max_length=253)
    # type prm: a process reward model (an `algorithm: prm` export at rewardModel.path) scores each step
    skip_pattern: str = knob("", "prm: steps this regex matches (re.search) get no process reward, e.g. "
                                 "'^\\s*#' for comment lines.", max_length=256)
    normalize_steps: bool = knob(True, "prm: divide each step's reward by the number of rewarded steps, so a "
                                       "response's process reward stays in [-1, 1] whatever its length.")



def _template_ok(value: str) -> bool:
    return value in DATASET_TEMPLATES or "{{" in value or "{%" in value


def _column(name: str) -> str:
    return knob("", f"The dataset's column read as `{name}` (\"\" = the column named {name}).", max_length=253)


@dataclass(frozen=True)
class DatasetFields:
    """dataset.fields: the dataset's own column names for the names the row formats read
    (`{prompt: question, answer: solution}`); "" keeps the format's name."""

    prompt: str = _column("prompt")
    query: str = _column("query")
    answer: str = _column("answer")
    chosen: str = _column("chosen")
    rejected: str = _column("rejected")
    completion: str = _column("completion")
    messages: str = _column("messages")
    instruction: str = _column("instruction")
    input: str = _column("input")
    output: str = _column("output")
    history: str = _column("history")
    outputs: str = _column("outputs")

    def mapping(self) -> dict[str, str]:
        """Format name -> column, for the names that are mapped."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name)}


@dataclass(frozen=True)
class DatasetConfig:
    """Training data: a dataset file / save_to_disk folder or `synthetic://NAME`, in one of DATASET_FORMATS."""

    path: str = knob(doc="A .jsonl / .json / .parquet / .csv file or a save_to_disk folder inside the container, "
                         "synthetic://NAME (arithmetic, preferences, instructions), or the same from a source: "
                         "hf://ORG/NAME[@REVISION]/FILE, s3://BUCKET/KEY, pvc://CLAIM/PATH (docs/spec.md, Sources).",
                     rule=SCHEME_RULE)
    format: str = knob("auto", "Row format (docs/spec.md, Datasets); auto tells it from the column names.",
                       enum=DATASET_FORMATS)
    eval_path: str = knob("", "Optional held-out set in the same format (a path or a source, as path).",
                          rule=SCHEME_RULE)
    template: str = knob("auto", "How prompts become text: auto (the tokenizer's chat template if it has one, "
                                 "else raw), chat, raw, or a Jinja chat template.", max_length=65536,
                         rule=Rule(_template_ok, "self in ['auto', 'chat', 'raw'] || self.contains('{{') || "
                                                 "self.contains('{%')",
                                   "must be one of: auto, chat, raw, or a Jinja chat template"))
    fields: DatasetFields = field(default_factory=DatasetFields)
    pretrain_path: str = knob("", "ppo: pretraining texts (JSONL rows {\"text\": ...}, or synthetic://NAME) whose "
                                  "language-modelling loss, times ptxCoef, joins the actor's loss (PPO-ptx); "
                                  "unset = off.", rule=SCHEME_RULE)


# critic.model: these words, or a model folder (any other value).
CRITIC_SOURCES = ("auto", "policy", "reward")


@dataclass(frozen=True)
class CriticConfig:
    """Where the PPO critic starts from (the `critic` section)."""

    model: str = knob("auto", "The critic's initial weights: policy (the policy's backbone and a new value "
                              "head), reward (the reward model's backbone and score head, as InstructGPT and "
                              "OpenRLHF do; with reward.type prm the process reward model's, ValueInit), auto "
                              "(reward when reward.type is model, else policy), or a model folder or source "
                              "(hf://, s3://, pvc://, as model.path); its "
                              "tokenizer must be the policy's.", max_length=4096, algorithms=PPO,
                      rule=SCHEME_RULE)


def critic_problem(algorithm: str, reward_type: str, critic: CriticConfig) -> str | None:
    """critic.model reward needs a reward model (or a process reward model) to start from."""
    if algorithm == "ppo" and critic.model == "reward" and reward_type not in MODEL_REWARD_TYPES:
        return "reward needs a reward model (reward.type model or prm); use policy or a model folder"
    return None


def turns_problem(algorithm: str, reward_type: str, turns: int, self_correction: str) -> str | None:
    """Why hyperparameters.turns does not fit the rest of the job, or None (its CEL twin:
    generate.algorithm_rules). SCoRe trains exactly two attempts; a process reward model scores one
    response; only the MULTI_TURN algorithms sample conversations."""
    if self_correction == "score" and turns != 2:
        return f"must be 2 with selfCorrection score (two attempts; got {turns})"
    if turns > 1 and algorithm not in MULTI_TURN:
        return f"must be 1 for algorithm {algorithm} (multi-turn rollouts: {', '.join(MULTI_TURN)}; got {turns})"
    if turns > 1 and reward_type == "prm":
        return f"must be 1 with reward.type prm (a process reward model scores one response; got {turns})"
    return None


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int = knob(2, "ZeRO stage 0..3; unset = 2, or 0 for reward and reference (no optimizer).",
                           minimum=0, maximum=3, crd_default=False)
    bf16: bool = knob(False, "Train and serve in bfloat16.")
    offload_optimizer: bool = knob(False, "Optimizer states in CPU memory (ZeRO >= 1).")
    gradient_checkpointing: bool = knob(False, "Recompute activations in the backward pass to save memory.")


LORA_EXPORTS = ("merged", "adapter")
# How the frozen base of a LoRA role is loaded (bitsandbytes, CUDA only): TRL's load_in_8bit / load_in_4bit.
QUANTIZATIONS = ("none", "8bit", "4bit")
# 4-bit data types of bitsandbytes (BitsAndBytesConfig.bnb_4bit_quant_type): NormalFloat4 (QLoRA) or FP4.
QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class LoraConfig:
    """A role's LoRA adapters (Hu et al. 2021) trained with peft instead of every weight (`rank` > 0)."""

    rank: int = knob(0, "LoRA rank r; 0 = no adapters, every weight trains.", minimum=0)
    alpha: float = knob(16.0, "LoRA scaling alpha (the update is scaled by alpha / rank).", gt=0)
    dropout: float = knob(0.0, "Dropout on the adapters' input, 0 <= x < 1.", minimum=0, lt=1)
    target_modules: str = knob("all-linear", "Modules that get adapters: all-linear, or comma-separated names "
                                             "(q_proj,v_proj).", max_length=1024)
    export: str = knob("merged", "The exported folder: merged (a plain model, adapters folded in) or adapter "
                                 "(peft's adapter folder, for the base model).", enum=LORA_EXPORTS)
    quantization: str = knob("none", "The frozen base loaded quantized by bitsandbytes (CUDA or its CPU backend): none, "
                                     "8bit (LLM.int8) or 4bit (QLoRA); the adapters train in the role's dtype, "
                                     "the merged export folds them into the unquantized base.", enum=QUANTIZATIONS)
    quant_type: str = knob("nf4", "4-bit data type (bitsandbytes' bnb_4bit_quant_type): nf4 (NormalFloat, QLoRA) "
                                  "or fp4; used with quantization 4bit.", enum=QUANT_TYPES)
    double_quant: bool = knob(False, "Quantize the 4-bit quantization constants too (bnb_4bit_use_double_quant, "
                                     "QLoRA's double quantization: about 0.37 bits per weight less; TRL's "
                                     "use_bnb_nested_quant); used with quantization 4bit.")


def lora_problems(role: str, lora: LoraConfig, zero_stage: int) -> list[tuple[str, str]]:
    """(field under the role, problem) for each cross-field rule of a role's `lora` ([] = valid).

    Only the actor trains adapters (the critic trains every weight; reward and reference are frozen).
    A quantized base needs adapters (its int8 / 4-bit weights cannot train) and ZeRO stage <= 2: stage 3
    would shard and gather the packed bitsandbytes weights as if they were plain tensors. The CRD's
    CEL twins of these rules are on the role items of crds/rlhfjobs.yaml.
    """
    problems = []
    if lora.rank and role != "actor":
        problems.append(("lora.rank", f"only the actor trains LoRA adapters (got rank {lora.rank} on the {role})"))
    if lora.quantization != "none" and not lora.rank:
        problems.append(("lora.quantization", f"{lora.quantization} needs lora.rank > 0: a quantized base does not "
                                              f"train, only adapters on it do"))
    if lora.quantization != "none" and zero_stage == 3:
        problems.append(("lora.quantization", f"{lora.quantization} needs deepspeed.zeroStage <= 2 (got 3): ZeRO-3 "
                                              f"cannot shard a bitsandbytes-quantized base"))
    return problems


@dataclass(frozen=True)
class RoleConfig:
    """One role's process world: how many ranks, and where it runs if colocated."""

    replicas: int = knob(1, "Pods of this role (unless colocated); its data-parallel world is replicas x "
                            "processesPerPod ranks.", minimum=1)
    processes_per_pod: int = knob(1, "Trainer processes each pod starts, one per GPU (torchrun's nproc-per-node); "
                                     "unset = gpus when gpus > 0, else 1.", minimum=1, crd_default=False)
    colocate_with: str = knob("", "Another role's name: this role gets no pods and runs inside that role's "
                                  "processes.", max_length=16)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


def _dual_clip_ok(value: float) -> bool:
    return value == 0 or value > 1


@dataclass(frozen=True)
class Hyperparameters:
    """Every training knob. The manifest spells them in camelCase (`maxSteps`)."""

    max_steps: int = knob(20, "Optimizer steps to train.", minimum=1)
    learning_rate: float = knob(1e-5, "Peak learning rate of the actor (and critic).", gt=0)
    batch_size: int = knob(8, "Prompts (or pairs) per step, global across replicas.", minimum=1)
    micro_batch_size: int = knob(4, "Samples per forward/backward pass on one process.", minimum=1)
    inference_chunk_size: int = knob(8, "Rows per pass that needs no gradient (generation, old and reference "
                                        "log-probs, critic values, reward scores) on one process: bounds those "
                                        "phases' memory.", minimum=1)
    max_prompt_length: int = knob(512, "Prompt tokens kept (left-truncated).", minimum=1)
    max_new_tokens: int = knob(16, "Response tokens sampled per prompt.", minimum=1, algorithms=SAMPLING)
    max_length: int = knob(1024, "Prompt + response tokens per row; longer responses are cut (counted as "
                                 "truncated).", minimum=2,
                           algorithms=ON_DATASET_RESPONSES)
    max_truncated_share: float = knob(0.1, "The job fails at startup when a larger share of its rows would be "
                                           "truncated (maxLength, maxPromptLength).", minimum=0, maximum=1)
    temperature: float = knob(1.0, "Sampling temperature (log-probs use the same scaled logits).", gt=0,
                              algorithms=SAMPLING)
    seed: int = knob(0, "Seed for sampling, data order and initialization.", minimum=0, maximum=2**32 - 1)
    distributed_timeout_seconds: int = knob(1800, "Seconds a collective of a role's world or a bridge message may "
                                                  "wait before the process fails (and the gang restarts); longer "
                                                  "than the longest phase, e.g. a serving role waiting through the "
                                                  "actor's update.", minimum=60, maximum=MAX_DISTRIBUTED_TIMEOUT_SECONDS)
    ppo_epochs: int = knob(1, "Passes over each rollout batch.", minimum=1, algorithms=ONLINE)
    old_log_probs: str = knob("forward", "Where the old policy's log-probs come from: forward (a pass over the "
                                         "rollout after sampling, as OpenRLHF and verl do) or sampling (the "
                                         "sampling pass's own logits, as TRL's PPOTrainer does: one actor forward "
                                         "less per step; equal to float rounding, cached vs whole-row attention).",
                              enum=OLD_LOG_PROBS, algorithms=ONLINE)
    clip_range: float = knob(0.2, "Policy ratio clip epsilon.", gt=0, algorithms=ONLINE)
    clip_range_high: float = knob(0.0, "Upper ratio clip epsilon (DAPO's clip-higher, TRL's epsilon_high, e.g. "
                                       "0.28); 0 = clipRange (symmetric).", minimum=0, algorithms=ONLINE)
    dual_clip: float = knob(0.0, "Dual-clip bound c for negative advantages; 0 = off, else > 1 (e.g. 3).",
                            minimum=0, algorithms=ONLINE,
                            rule=Rule(_dual_clip_ok, "self == 0.0 || self > 1.0", "must be 0 (off) or > 1"))
    value_clip_range: float = knob(0.2, "Value clip range (0 = no value clipping).", minimum=0, algorithms=PPO)
    entropy_coef: float = knob(0.0, "Entropy bonus: the policy loss minus this times the mean entropy of the "
                                    "response tokens (0 = off).", minimum=0, algorithms=PPO)
    vf_coef: float = knob(0.1, "Value loss coefficient (in the reported total loss).", minimum=0, algorithms=PPO)
    gamma: float = knob(1.0, "Discount factor, 0..1.", minimum=0, maximum=1, algorithms=SHAPED_REWARD)
    lam: float = knob(0.95, "GAE lambda, 0..1.", minimum=0, maximum=1, algorithms=PPO)
    kl_coef: float = knob(0.05, "Initial KL penalty coefficient against the reference policy.", minimum=0,
                          algorithms=ONLINE)
    kl_target: float = knob(0.0, "Adaptive KL controller target; 0 = fixed coefficient.", minimum=0,
                            algorithms=PPO)
    kl_horizon: int = knob(10000, "Adaptive KL controller horizon in samples (Ziegler et al. 2019).", minimum=1,
                           algorithms=PPO)
    kl_estimator: str = knob("k1", "KL estimator: k1 (log-ratio) or k3 (unbiased, non-negative).",
                             enum=KL_ESTIMATORS, algorithms=SHAPED_REWARD)
    reward_clip: float = knob(10.0, "Scores are clipped to [-rewardClip, rewardClip].", gt=0,
                              algorithms=SHAPED_REWARD)
    truncation_penalty: float = knob(1.0, "Subtracted from the score of a response with no EOS within "
                                          "maxNewTokens (0 = none).", minimum=0, algorithms=SHAPED_REWARD)
    whiten_advantages: bool = knob(True, "Normalize advantages per batch (over every actor rank's rows).",
                                   algorithms=PPO)
    ptx_coef: float = knob(0.05, "PPO-ptx: weight of the pretraining language-modelling loss in the actor's "
                                 "loss (InstructGPT eq. 2's gamma); used only with dataset.pretrainPath.",
                           minimum=0, algorithms=PPO)
    group_size: int = knob(4, "Samples per prompt, at least 2.", minimum=2, algorithms=(*CRITIC_FREE, "prm-label"))
    loss_aggregation: str = knob("dapo", "How token losses make the loss (TRL's loss_type): dapo (mean over the "
                                         "batch's tokens), grpo (per-response mean, then mean over responses) or "
                                         "dr_grpo (sum / (responses x maxNewTokens)).", enum=LOSS_AGGREGATIONS,
                                 algorithms=CRITIC_FREE)
    turns: int = knob(1, "Policy turns per rollout: the policy answers, the environment replies with "
                         "turnInstruction, the policy answers again, up to this many policy turns; each turn is "
                         "scored and its reward placed on its last token, environment tokens are no actions "
                         "(no loss, no KL). 1 = single-turn.", minimum=1, maximum=8, algorithms=MULTI_TURN)
    turn_instruction: str = knob(DEFAULT_TURN_INSTRUCTION, "The environment's message after each policy turn but "
                                 "the last (a user turn under a chat template, a plain line otherwise).",
                                 max_length=1024, algorithms=MULTI_TURN,
                                 rule=Rule(bool, "self != ''", "must not be empty"))
    self_correction: str = knob("off", "score: SCoRe (Kumar et al. 2024) on two-attempt rollouts (turns 2): stage I "
                                       "(scoreStageOneSteps steps) rewards the second attempt only and holds the "
                                       "first to the reference with scoreFirstTurnKlCoef; stage II rewards both "
                                       "attempts plus scoreAlpha x (r2 - r1) on the second.",
                                enum=SELF_CORRECTION, algorithms=MULTI_TURN)
    score_stage_one_steps: int = knob(10, "SCoRe: steps of stage I (steps 1..N); stage II runs the steps after "
                                          "them up to maxSteps.", minimum=0, algorithms=MULTI_TURN)
    score_first_turn_kl_coef: float = knob(0.1, "SCoRe stage I: KL coefficient on the first attempt's tokens (the "
                                                "paper's beta2, strong; klCoef, beta1, weighs the other tokens).",
                                           minimum=0, algorithms=MULTI_TURN)
    score_alpha: float = knob(10.0, "SCoRe stage II: the second attempt's reward gets scoreAlpha x (r2 - r1) on "
                                    "top (the paper's alpha).", minimum=0, algorithms=MULTI_TURN)
    beta: float = knob(0.1, "Inverse temperature of the implicit reward (orpo: lambda, the odds-ratio "
                            "term's weight).", gt=0, algorithms=PREFERENCE)
    loss_type: str = knob("sigmoid", "sigmoid (DPO), ipo (IPO, on token-averaged log-probs) or hinge (SLiC).",
                          enum=LOSS_TYPES, algorithms=("dpo",))
    label_smoothing: float = knob(0.0, "Conservative DPO label smoothing, 0 <= x < 0.5.", minimum=0, lt=0.5,
                                  algorithms=("dpo", "simpo", "cpo"))
    simpo_gamma: float = knob(0.5, "SimPO's target reward margin gamma (eq. 6; TRL's simpo_gamma).", minimum=0,
                              algorithms=("simpo",))
    cpo_alpha: float = knob(1.0, "CPO's weight of the chosen responses' NLL term (TRL's cpo_alpha).", minimum=0,
                            algorithms=("cpo",))
    prefix_sharing: bool = knob(False, "Compute each prompt once in the actor's training forward, its responses "
                                       "(a pair's two, a group's samples) after it in one row whose attention "
                                       "mask keeps them apart (Wang et al. 2024, prefix sharing), and once per "
                                       "chunk in generation's prefill and the reference's and old log-probs' "
                                       "passes: the same log-probs and samples at fewer token positions, "
                                       "the more so the longer the prompts.",
                                algorithms=PREFIX_SHARING)
    padding_free: bool = knob(False, "Run the forwards of the actor, the reference, and PPO's critic and reward "
                                     "model without padding: a batch's "
                                     "rows go through the model as one packed sequence whose positions restart "
                                     "with each row (TRL's padding_free, verl's use_remove_padding), the same "
                                     "log-probs, values and scores at the cost of the real tokens only. The model must keep packed "
                                     "rows apart (Hugging Face models that build their masks with masking_utils "
                                     "do; checked once, else the trainer exits naming this field).",
                              algorithms=(*PPO, *CRITIC_FREE, *PREFERENCE))
    margin: float = knob(0.0, "Bradley-Terry margin between chosen and rejected.", minimum=0, algorithms=("rm",))
    packing: bool = knob(False, "Pack several samples into one sequence.", algorithms=("sft",))
    step_separator: str = knob("\n", "What ends a step of a response (one line each by default).",
                               max_length=16, algorithms=STEPWISE,
                               rule=Rule(bool, "self != ''", "must not be empty"))
    prm_completions: int = knob(4, "prm-label: completions sampled from each prefix; the prefix is correct when "
                                   "one passes the verifier (best-of-N).", minimum=1, algorithms=("prm-label",))
    sample_interval_steps: int = knob(10, "Every this many steps, write samplesPerStep rollouts (prompt, response, "
                                          "reward, KL, length, truncated) to samples/<role>-<rank>.jsonl on the "
                                          "checkpoint volume (0 = never).", minimum=0, algorithms=ONLINE)
    samples_per_step: int = knob(4, "Rollouts each actor rank writes when samples are due.", minimum=1,
                                 algorithms=ONLINE)
    alarm_negative_kl: float = knob(0.05, "Alarm NegativeKL when a step's mean per-response KL is below minus this "
                                          "and 4 standard errors below 0 (0 = off).", minimum=0, algorithms=ONLINE)
    alarm_length_drop: float = knob(0.5, "Alarm LengthCollapse when the mean response length of the last alarmWindow "
                                         "steps is this share below that of the window before (0 = off).",
                                    minimum=0, lt=1, algorithms=ONLINE)
    alarm_distinct: float = knob(0.3, "Alarm RewardHacking when the responses' distinct-2 (unique bigrams / bigrams "
                                      "inside a response) is below this (0 = off).", minimum=0, maximum=1,
                                 algorithms=ONLINE)
    alarm_reward_jump: float = knob(0.5, "Alarm RewardHacking when the training reward rose by more than this between "
                                         "two evaluations while the held-out reward rose by less than half of it "
                                         "(0 = off; needs dataset.evalPath).", minimum=0, algorithms=ONLINE)
    alarm_window: int = knob(5, "Steps per window of the LengthCollapse and reward-jump alarms.", minimum=1,
                             algorithms=ONLINE)
    non_finite: str = knob("fail", "What a NaN or infinite reward, loss or gradient norm does: fail (the job fails "
                                   "with a permanent error naming the step, the source and the rows) or skip (the "
                                   "batch is skipped and counted in rlhf_trainer_non_finite_total).",
                           enum=NON_FINITE_POLICIES)


@dataclass(frozen=True)
class CheckpointConfig:
    interval_steps: int = knob(10, "Save every N steps (and at the end).", minimum=1)
    keep: int = knob(3, "Complete checkpoints kept; older ones are deleted.", minimum=1)


WANDB_MODES = ("online", "offline")


@dataclass(frozen=True)
class WandbConfig:
    """trackers.wandb: Weights & Biases (rlhf_trainer.trackers.WandbTracker), logged by actor rank 0 only."""

    enabled: bool = knob(False, "Log every step's metrics, the samples and the config to a W&B run (needs the "
                                "trainer image's `trackers` extra; the key comes from apiKeySecret).")
    project: str = knob("", "W&B project (\"\" = the job's namespace).", max_length=128)
    entity: str = knob("", "W&B entity (team or user; \"\" = the key's default).", max_length=128)
    mode: str = knob("online", "online, or offline: the run is written to trackers/wandb/ on the checkpoint volume "
                               "only (upload it later with `wandb sync`).", enum=WANDB_MODES)
    group: str = knob("", "W&B run group (\"\" = none).", max_length=128)


@dataclass(frozen=True)
class MlflowConfig:
    """trackers.mlflow: MLflow (rlhf_trainer.trackers.MlflowTracker), logged by actor rank 0 only."""

    enabled: bool = knob(False, "Log every step's metrics, the samples and the hyperparameters to an MLflow run "
                                "(needs the trainer image's `trackers` extra).")
    tracking_uri: str = knob("", "MLflow tracking server (http(s)://...; its token from tokenSecret) or a file: "
                                 "store; \"\" = a file store in mlruns/ on the checkpoint volume.", max_length=2048)
    experiment: str = knob("", "MLflow experiment name (\"\" = the job's name).", max_length=256)


@dataclass(frozen=True)
class TrackersConfig:
    """Optional experiment trackers besides the TensorBoard event files every job writes."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass(frozen=True)
class TrainerConfig:
    """The whole job as the trainer sees it: built by the operator, read by the trainer."""

    job: str
    algorithm: str
    model: ModelConfig
    dataset: DatasetConfig
    roles: dict[str, RoleConfig]
    namespace: str = "default"
    reward_model: ModelConfig | None = None
    reward: RewardConfig = field(default_factory=RewardConfig)
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    trackers: TrackersConfig = field(default_factory=TrackersConfig)

    def colocated_into(self, host: str) -> tuple[str, ...]:
        """Roles served inside `host`'s processes."""
        return layout.colocated_into(self.placements(), host)

    def placements(self) -> dict[str, layout.Placement]:
        return {name: layout.Placement(role.replicas, role.colocate_with, role.processes_per_pod)
                for name, role in self.roles.items()}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form parse_config() reads back."""
        return dataclasses.asdict(self)


def dataset_format_problem(algorithm: str, dataset: DatasetConfig) -> str | None:
    """Algorithms that learn from preference pairs need a dataset file in a pair format or auto (a
    synthetic:// dataset brings its own format, so `format` is not read)."""
    if ALGORITHMS[algorithm].data != "pairs" or dataset.path.startswith(SYNTHETIC_PREFIX):
        return None
    if dataset.format in FORMATS_FOR_PAIRS:
        return None
    return (f"must be one of {', '.join(FORMATS_FOR_PAIRS)} for algorithm {algorithm}, which learns from "
            f"preference pairs (got {dataset.format!r})")


def dump_config(cfg: TrainerConfig) -> str:
    """The config file's text (stable key order, so an unchanged job renders the same bytes)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


# ---- parsing: structure and types ----------------------------------------------------------

_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _is_type(value: Any, expected: type) -> bool:
    # bool is an int subclass in Python; JSON true must not pass as 1 (nor 1 as true). A float
    # field takes integers too (JSON writes 1e-05 but also 1).
    if expected is bool or isinstance(value, bool):
        return expected is bool and isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)


def _parse_value(value: Any, hint: Any, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # only `X | None` occurs
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _parse_value(value, inner, path, errors)
    if origin is dict:
        _, item_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object, got {json.dumps(value)}")
            return {}
        return {k: _parse_value(v, item_hint, f"{path}.{k}", errors) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _parse_dataclass(value, hint, path, errors)
    if not _is_type(value, hint):
        errors.append(f"{path}: expected {_TYPE_WORDS[hint]}, got {json.dumps(value)}")
        return None
    return float(value) if hint is float else value


def _parse_dataclass(data: Any, cls: type, path: str, errors: list[str]) -> Any:
    prefix = f"{path}." if path else ""
    if not isinstance(data, dict):
        errors.append(f"{path or 'config'}: expected an object, got {json.dumps(data)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {close[0]}?" if close else f"allowed: {', '.join(fields)}"
            errors.append(f"{prefix}{key}: unknown field ({hint})")
    kwargs, missing = {}, False
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _parse_value(data[name], hints[name], prefix + name, errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix}{name}: required")
            missing = True
    # With a bad field inside, the object still builds (values are not type-checked by
    # dataclasses), so parsing goes on and reports sibling errors too.
    return None if missing else cls(**kwargs)


# ---- parsing: values and cross-field rules ---------------------------------------------------


def _check_knobs(obj: Any, path: str, errors: list[str]) -> None:
    """Every knob of a parsed dataclass against its bounds, enum and rule (the manifest's too)."""
    for setting in settings_of(type(obj)):
        value = getattr(obj, setting.name)
        if setting.unset_marker() and value == setting.default:
            continue
        if setting.required and not value:
            errors.append(f"{path}.{setting.name}: must not be empty")
        errors.extend(f"{path}.{setting.name}: {problem}" for problem in setting.problems(value))


def _check_values(cfg: TrainerConfig, errors: list[str]) -> None:
    if cfg.algorithm not in ALGORITHMS:
        errors.append(f"algorithm: {json.dumps(cfg.algorithm)} is not one of {', '.join(NAMES)}")
    _check_knobs(cfg.model, "model", errors)
    _check_knobs(cfg.dataset, "dataset", errors)
    _check_knobs(cfg.dataset.fields, "dataset.fields", errors)
    _check_knobs(cfg.reward, "reward", errors)
    _check_knobs(cfg.hyperparameters, "hyperparameters", errors)
    _check_knobs(cfg.checkpoint, "checkpoint", errors)
    _check_knobs(cfg.critic, "critic", errors)
    _check_knobs(cfg.trackers.wandb, "trackers.wandb", errors)
    _check_knobs(cfg.trackers.mlflow, "trackers.mlflow", errors)
    for name, role in cfg.roles.items():
        if name not in ROLE_NAMES:
            errors.append(f"roles.{name}: unknown role; must be one of: {', '.join(ROLE_NAMES)}")
        _check_knobs(role, f"roles.{name}", errors)
        _check_knobs(role.deepspeed, f"roles.{name}.deepspeed", errors)
        _check_knobs(role.lora, f"roles.{name}.lora", errors)
        errors.extend(f"roles.{name}.{key}: {problem}"
                      for key, problem in lora_problems(name, role.lora, role.deepspeed.zero_stage))
    _check_reward(cfg, errors)
    if errors:
        return  # the layout rules read replicas and names that must be valid first
    errors.extend(f"roles.{name}{'.' + key if key else ''}: {problem}"
                  for name, key, problem in layout.problems(list(cfg.placements().items())))
    if cfg.algorithm in ALGORITHMS:
        problem = role_set_problem(cfg.algorithm, cfg.reward.type, list(cfg.roles))
        if problem:
            errors.append(f"roles: {problem}")
        problem = dataset_format_problem(cfg.algorithm, cfg.dataset)
        if problem:
            errors.append(f"dataset.format: {problem}")
        problem = critic_problem(cfg.algorithm, cfg.reward.type, cfg.critic)
        if problem:
            errors.append(f"critic.model: {problem}")
        hp = cfg.hyperparameters
        problem = turns_problem(cfg.algorithm, cfg.reward.type, hp.turns, hp.self_correction)
        if problem:
            errors.append(f"hyperparameters.turns: {problem}")
    if "actor" in cfg.roles:
        problem = layout.batch_problem(cfg.placements()["actor"], cfg.hyperparameters.batch_size)
        if problem:
            errors.append(f"hyperparameters.batch_size: {problem}")


def _check_reward(cfg: TrainerConfig, errors: list[str]) -> None:
    reward = cfg.reward
    if reward.type == "rule" and not reward.rule:
        errors.append(f"reward.rule: required when reward.type is rule; must be one of: {', '.join(REWARD_RULES)}")
    if reward.rule == "regex" and not reward.pattern:
        errors.append("reward.pattern: required when reward.rule is regex")
    if reward.rule == "callable" and not re.match(CALLABLE_PATTERN, reward.callable):
        errors.append(f'reward.callable: expected "module:function", got {json.dumps(reward.callable)}')
    algorithm = ALGORITHMS.get(cfg.algorithm)
    if algorithm and algorithm.needs_reward_model(reward.type) and (cfg.reward_model is None or not cfg.reward_model.path):
        errors.append(f"reward_model.path: required when reward.type is {reward.type}")


def parse_config(data: dict[str, Any]) -> TrainerConfig:
    """Validate the config dict and return a TrainerConfig; ConfigError lists every bad field."""
    errors: list[str] = []
    cfg = _parse_dataclass(data, TrainerConfig, "", errors)
    if not errors:
        _check_values(cfg, errors)
    if errors:
        raise ConfigError("; ".join(errors))
    return cfg


def load_config(path: str | Path) -> TrainerConfig:
    """Read and parse a config JSON file; unreadable or invalid JSON names the file (and line)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the trainer config: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
