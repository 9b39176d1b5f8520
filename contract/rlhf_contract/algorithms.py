"""The algorithm table: the one place an algorithm is declared (docs/contract.md "Add an algorithm").

Every other per-algorithm fact is derived from a row here: the CRD's `algorithm` enum and its role
rules (rlhf_contract.generate), parse_spec()'s and the trainer config's role checks, which dataset
the trainer loads (`data`), which trainer module runs it (`module`), docs/spec.md's roles table.
"""

from __future__ import annotations

from dataclasses import dataclass

# Every role name, in bridge-rank order: the actor's rank 0 is bridge rank 0 (it hosts the store).
ROLE_NAMES = ("actor", "critic", "reward", "reference")
# Roles that hold an optimizer; the others are frozen (ZeRO stage 0 is their default).
TRAINED_ROLES = ("actor", "critic")
FROZEN_ROLES = ("reward", "reference")
REWARD_TYPES = ("model", "rule", "prm")
# Reward types scored by a model in a `reward` role: a sequence classifier, or a process reward model.
MODEL_REWARD_TYPES = ("model", "prm")
# What an algorithm consumes from its dataset (rlhf_trainer.data.convert): prompts to sample from,
# preference pairs, prompt/response pairs to imitate, or responses labelled step by step (a PRM's).
DATA_KINDS = ("prompts", "pairs", "sft", "steps")
# What a finished job exports to $RLHF_CHECKPOINT_DIR/export: a causal LM (a policy: what `model` starts
# from), a one-label sequence classifier (a reward model: what `rewardModel` is), a process reward
# model (a token classifier: `rewardModel` with reward.type prm), or a labelled dataset (prm-label).
EXPORT_KINDS = ("policy", "reward", "prm", "dataset")


@dataclass(frozen=True)
class Algorithm:
    """One row of the table.

    roles: the roles it always needs. An online algorithm samples responses and scores them, so it
    also needs a `reward` role exactly when `reward.type` is model or prm (a rule reward runs in the actor).
    module: `rlhf_trainer.algorithms.<module>` has `run(ctx)`, started on the actor's ranks.
    exports: the kind of model its export folder holds (EXPORT_KINDS); a job naming this one in
    `fromJob` must want that kind.
    """

    name: str
    roles: tuple[str, ...]
    online: bool
    data: str
    module: str
    summary: str
    exports: str = "policy"

    def required_roles(self, reward_type: str) -> tuple[str, ...]:
        """Role names this algorithm needs with this reward type (reward last)."""
        return (*self.roles, "reward") if self.needs_reward_model(reward_type) else self.roles

    def needs_reward_model(self, reward_type: str) -> bool:
        return self.online and reward_type in MODEL_REWARD_TYPES


TABLE = (
    Algorithm("ppo", ("actor", "critic", "reference"), online=True, data="prompts", module="ppo",
              summary="PPO with a critic, per-token KL penalty and GAE (Ouyang et al. 2022)"),
    Algorithm("grpo", ("actor", "reference"), online=True, data="prompts", module="grpo",
              summary="GRPO: group-normalised advantages, no critic (Shao et al. 2024)"),
    Algorithm("rloo", ("actor", "reference"), online=True, data="prompts", module="grpo",
              summary="RLOO: leave-one-out baseline, no critic (Ahmadian et al. 2024)"),
    Algorithm("reinforce_pp", ("actor", "reference"), online=True, data="prompts", module="grpo",
              summary="REINFORCE++: KL-shaped token rewards, returns whitened over the batch, no critic (Hu 2025)"),
    Algorithm("dpo", ("actor", "reference"), online=False, data="pairs", module="dpo",
              summary="DPO and its variants IPO, hinge, cDPO on preference pairs (Rafailov et al. 2023)"),
    Algorithm("simpo", ("actor",), online=False, data="pairs", module="dpo",
              summary="SimPO: reference-free, length-normalised preference loss with a margin (Meng et al. 2024)"),
    Algorithm("orpo", ("actor",), online=False, data="pairs", module="dpo",
              summary="ORPO: SFT on the chosen response plus an odds-ratio preference term, no reference (Hong et al. 2024)"),
    Algorithm("cpo", ("actor",), online=False, data="pairs", module="dpo",
              summary="CPO: reference-free sigmoid preference loss on sequence log-probs plus the chosen "
                      "responses' NLL (Xu et al. 2024)"),
    Algorithm("rm", ("actor",), online=False, data="pairs", module="rm",
              summary="Bradley-Terry reward model training on preference pairs", exports="reward"),
    Algorithm("sft", ("actor",), online=False, data="sft", module="sft",
              summary="supervised fine-tuning on the response tokens"),
    Algorithm("prm", ("actor",), online=False, data="steps", module="prm",
              summary="process reward model: each step's correctness at its separator token (Lightman et al. 2023)",
              exports="prm"),
    Algorithm("prm-label", ("actor",), online=False, data="prompts", module="prm_label",
              summary="labels a policy's responses step by step for prm: first wrong step by binary search "
                      "with best-of-N completions checked by the rule reward", exports="dataset"),
)
ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in TABLE}
NAMES = tuple(ALGORITHMS)
ONLINE = tuple(a.name for a in TABLE if a.online)
PAIR_ALGORITHMS = tuple(a.name for a in TABLE if a.data == "pairs")
# Algorithms that sample responses to prompts (the online ones and prm-label), and those that train on
# the dataset's own responses (pairs, demonstrations, stepwise rows): sampling vs length knobs.
SAMPLING = tuple(a.name for a in TABLE if a.data == "prompts")
ON_DATASET_RESPONSES = tuple(a.name for a in TABLE if a.data != "prompts")


def run_by(module: str) -> tuple[str, ...]:
    """Names of the algorithms whose loop is `rlhf_trainer.algorithms.<module>` (its variants share its knobs)."""
    return tuple(a.name for a in TABLE if a.module == module)


def required_roles(algorithm: str, reward_type: str) -> tuple[str, ...]:
    """Role names `algorithm` needs; KeyError for an unknown algorithm."""
    return ALGORITHMS[algorithm].required_roles(reward_type)


def role_set_problem(algorithm: str, reward_type: str, names: list[str]) -> str | None:
    """Why the role names given do not fit the algorithm, or None: they must be exactly required_roles()."""
    required = required_roles(algorithm, reward_type)
    missing = [n for n in required if n not in names]
    extra = [n for n in dict.fromkeys(names) if n not in required]
    if not missing and not extra:
        return None
    why = f"algorithm {algorithm}" + (f" with reward.type {reward_type}" if ALGORITHMS[algorithm].online else "")
    detail = "; ".join([f"missing: {', '.join(missing)}"] * bool(missing) + [f"not allowed: {', '.join(extra)}"] * bool(extra))
    return f"must be exactly the roles {', '.join(required)} for {why} ({detail})"
