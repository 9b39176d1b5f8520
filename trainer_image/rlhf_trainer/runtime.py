"""One trainer process from start to exit: worlds, bridge, metrics, then the actor loop or a server.

    env = read_process_env(os.environ); cfg = load_config(env.config_path)
    run(env, cfg)   # actor: the algorithm's loop; critic / reward / reference: serve the actor

Everything a loop needs (clients of the other roles, metrics, checkpoints) is gathered in `Context`.
"""

from __future__ import annotations

import importlib
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from rlhf_contract import wire
from rlhf_contract.algorithms import ALGORITHMS
from rlhf_contract.config import ConfigError, TrainerConfig
from rlhf_contract.layout import Placement, bridge_ranks, served_actor_ranks, serving_rank

from rlhf_trainer import checkpoint, distributed, quantization
from rlhf_trainer.alarms import AlarmMonitor, Thresholds
from rlhf_trainer.bridge import Bridge
from rlhf_trainer.distributed import ProcessEnv
from rlhf_trainer.finite import NonFiniteGuard
from rlhf_trainer.metrics import TrainerMetrics, jsonl_path_for
from rlhf_trainer.samples import samples_path_for
from rlhf_trainer.stopping import Stopped, StopRequest
from rlhf_trainer.trackers import build_trackers


def log(*parts: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def check_process(env: ProcessEnv, cfg: TrainerConfig) -> None:
    """The env must describe a process the config has; mismatches are config errors (exit 78).
    (The config's own layout rules were checked when it was loaded.)"""
    placements = cfg.placements()
    if env.role not in cfg.roles or cfg.roles[env.role].colocate_with:
        raise ConfigError(f"RLHF_ROLE: {env.role!r} is not a role with pods of its own in the config")
    role = cfg.roles[env.role]
    if not 0 <= env.pod_index < role.replicas or env.pods != role.replicas:
        raise ConfigError(
            f"RLHF_ROLE_RANK/RLHF_ROLE_REPLICAS: {env.pod_index}/{env.pods} does not fit roles.{env.role}.replicas "
            f"= {role.replicas}"
        )
    if env.processes_per_pod != role.processes_per_pod:
        raise ConfigError(f"{wire.ENV_PROCESSES_PER_POD}: {env.processes_per_pod} but roles.{env.role}."
                          f"processes_per_pod = {role.processes_per_pod}")
    expected = sorted(r for r, p in placements.items() if p.colocate_with == env.role)
    if sorted(env.colocated_roles) != expected:
        raise ConfigError(f"RLHF_COLOCATED_ROLES: {list(env.colocated_roles)} but the config colocates {expected}")
    if env.role == "actor":  # a quantized base needs bitsandbytes and its device: fail before anything loads
        quantization.for_this_process(cfg.roles["actor"])


@dataclass
class Context:
    env: ProcessEnv
    cfg: TrainerConfig
    placements: dict[str, Placement]
    bridge: Bridge | None
    metrics: TrainerMetrics
    # This process's non-finite checks (hyperparameters.non_finite); drive() sets its step.
    guard: NonFiniteGuard
    # Services this process runs for colocated roles, by role name.
    local_services: dict[str, Any] = field(default_factory=dict)
    # Strategies of this process's trainable roles (for checkpoints), by role name.
    strategies: dict[str, Any] = field(default_factory=dict)
    # The actor's trained model in an actor process (set before colocated roles start).
    actor_model: Any = None
    # The online algorithms' alarms (rlhf_trainer.alarms); None for the offline ones.
    alarms: AlarmMonitor | None = None
    # Held-out records of dataset.eval_path (algorithms/evaluation.py), read with the training data.
    eval_records: list[Any] = field(default_factory=list)
    # SIGTERM to this process or another of the gang (None: never stop early, e.g. in unit tests).
    stop: StopRequest | None = None
    # Peak memory of each op the serving processes ran for this actor rank since the step log last took
    # them: `<role>_<op>_peak_memory_bytes` (roles.RemoteClient; drive() adds them to the step's row).
    served_peak_memory: dict[str, float] = field(default_factory=dict)

    @property
    def hp(self):
        return self.cfg.hyperparameters

    @property
    def hosted_roles(self) -> list[str]:
        return [self.env.role, *self.env.colocated_roles]

    def client(self, role: str):
        """How this actor process reaches `role`: in-process when colocated here, else over the bridge."""
        from rlhf_trainer.roles import LocalClient, RemoteClient

        if role in self.local_services:
            return LocalClient(self.local_services[role])
        host, rank = serving_rank(role, self.env.rank, self.placements)
        return RemoteClient(self.bridge, role, bridge_ranks(self.placements)[(host, rank)],
                            peaks=self.served_peak_memory)

    def remote_hosts(self) -> list[int]:
        """Bridge ranks of every serving process this actor rank talks to (each once)."""
        ranks = bridge_ranks(self.placements)
        hosts = {serving_rank(r, self.env.rank, self.placements) for r in self.placements if r != "actor"}
        return sorted(ranks[h] for h in hosts if h[0] != "actor")

    def rows_per_rank(self, rows_per_prompt: int = 1) -> int:
        return self.hp.batch_size // self.placements["actor"].ranks * rows_per_prompt

    def grad_accum(self, rows: int) -> int:
        return max(1, math.ceil(rows / self.hp.micro_batch_size))


def build_service(ctx: Context, role: str):
    """The service object of a serving role (and register its strategy if it trains)."""
    from rlhf_trainer import models
    from rlhf_trainer.roles import CriticService, ProcessRewardService, ReferenceService, RewardService
    from rlhf_trainer.strategy import DeepSpeedStrategy

    hp, cfg = ctx.hp, ctx.cfg
    # A frozen role has no optimizer: its `deepspeed.bf16` setting is the dtype of its weights.
    frozen_dtype = torch.bfloat16 if cfg.roles[role].deepspeed.bf16 else torch.float32
    if role == "reference":
        temperature = hp.temperature if ALGORITHMS[cfg.algorithm].online else 1.0
        from rlhf_trainer import lora

        if ctx.actor_model is not None and lora.is_lora(ctx.actor_model):
            # Colocated with a LoRA actor: its frozen base IS the initial policy; no second copy.
            log("reference: the actor's base model with its adapters disabled")
            return ReferenceService(ctx.actor_model, temperature, chunk_size=hp.inference_chunk_size, adapters_off=True,
                                    padding_free=hp.padding_free)
        return ReferenceService(models.load_policy(cfg.model.path, seed=hp.seed).to(frozen_dtype), temperature,
                                chunk_size=hp.inference_chunk_size, padding_free=hp.padding_free)
    if role == "reward":
        from rlhf_trainer.chat import Renderer
        from rlhf_trainer.sampling import stop_token_ids

        path = cfg.reward_model.path
        tokenizer = models.load_tokenizer(path)
        # The reward model's own chat template when it has one (dataset.template is the policy's).
        renderer = Renderer(tokenizer, "auto", stop_ids=stop_token_ids(tokenizer, *models.generation_settings(path)),
                            setting="rewardModel")
        if cfg.reward.type == "prm":
            return ProcessRewardService(models.load_token_classifier(path, seed=hp.seed).to(frozen_dtype), renderer,
                                        max_prompt_length=hp.max_prompt_length, max_length=hp.max_length)
        return RewardService(models.load_reward_model(path, seed=hp.seed).to(frozen_dtype), renderer,
                             max_prompt_length=hp.max_prompt_length, max_length=hp.max_length,
                             chunk_size=hp.inference_chunk_size, padding_free=hp.padding_free)
    if role == "critic":
        rows = ctx.rows_per_rank()
        path, init = critic_source(cfg, models.is_sequence_classifier)
        if path != cfg.model.path and not same_vocabulary(models.load_tokenizer(path), models.load_tokenizer(cfg.model.path)):
            if cfg.critic.model != "auto":
                raise ConfigError(f"critic.model: the tokenizer of {path} differs from the policy's; the critic reads "
                                  f"the policy's tokens, so it must start from a model with the same vocabulary")
            log("critic: the reward model's tokenizer differs from the policy's; starting from the policy")
            path, init = cfg.model.path, "policy"
        log(f"critic: starting from {path} ({init})")
        strategy = DeepSpeedStrategy(
            models.load_value_model(path, seed=hp.seed, init=init),
            cfg.roles["critic"].deepspeed,
            learning_rate=hp.learning_rate,
            micro_batch_size=hp.micro_batch_size,
            grad_accum=ctx.grad_accum(rows),
        )
        ctx.strategies["critic"] = strategy
        world = distributed.world_size()
        return CriticService(
            strategy,
            micro_batch_size=hp.micro_batch_size,
            chunk_size=hp.inference_chunk_size,
            value_clip_range=hp.value_clip_range,
            normaliser=lambda n: distributed.all_reduce_sum(n) / world,
            guard=ctx.guard,
            padding_free=hp.padding_free,
        )
    raise ValueError(f"no service for role {role!r}")


def critic_source(cfg: TrainerConfig, is_classifier) -> tuple[str, str]:
    """(model path, init) the PPO critic starts from (critic.model; rlhf_trainer.models.load_value_model).

    auto = the reward model when reward.type is model, else the policy; reward with reward.type prm is
    the process reward model (init "prm"); a folder is read as a reward model when `is_classifier(path)`
    says it holds a sequence classifier, else as a policy.
    """
    choice = cfg.critic.model
    if choice == "auto":
        choice = "reward" if cfg.reward.type == "model" and cfg.reward_model is not None else "policy"
    if choice == "policy":
        return cfg.model.path, "policy"
    if choice == "reward":
        if cfg.reward_model is None:
            raise ConfigError("critic.model: reward needs a reward model (reward.type model or prm)")
        # A process reward model's two-label head becomes the value head (ValueInit, losses.prm).
        return cfg.reward_model.path, "prm" if cfg.reward.type == "prm" else "reward"
    return choice, "reward" if is_classifier(choice) else "policy"


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map every token to the same id (a critic must read the policy's ids)."""
    return a.get_vocab() == b.get_vocab()


@dataclass(frozen=True)
class GroupPlan:
    """How this process joins one process group: rank `rank` of `size`, rendezvous at `addr`."""

    addr: tuple[str, int]
    rank: int
    size: int
    timeout: timedelta  # a collective / message waiting longer fails the process (a retryable exit)


def plan_groups(env: ProcessEnv, cfg: TrainerConfig) -> tuple[GroupPlan, GroupPlan | None]:
    """(this role's world, the bridge or None when every role runs in this one process). Pure.

    Both groups wait hyperparameters.distributed_timeout_seconds. ConfigError when the env lacks
    an address the layout needs.
    """
    timeout = timedelta(seconds=cfg.hyperparameters.distributed_timeout_seconds)
    if env.role not in env.role_addrs and env.world_size > 1:
        raise ConfigError(f"RLHF_ROLE_ADDRS: no address for role {env.role!r}")
    world = GroupPlan(env.role_addrs.get(env.role, ("127.0.0.1", wire.ROLE_PORT)), env.rank, env.world_size, timeout)
    ranks = bridge_ranks(cfg.placements())
    if len(ranks) == 1:
        return world, None
    if env.bridge_addr is None:
        raise ConfigError("RLHF_BRIDGE_ADDR: required when roles run in separate processes")
    return world, GroupPlan(env.bridge_addr, ranks[(env.role, env.rank)], len(ranks), timeout)


def connect(env: ProcessEnv, cfg: TrainerConfig) -> Context:
    world, bridge_plan = plan_groups(env, cfg)
    # Before joining the worlds: a tracker library missing from the image fails this process alone, at once.
    trackers = build_trackers(cfg, env.checkpoint_dir, env.role, env.rank)
    distributed.init_role_world(master_addr=world.addr[0], master_port=world.addr[1], rank=world.rank,
                                world_size=world.size, local_rank=env.local_rank, timeout=world.timeout)
    bridge = None
    if bridge_plan is not None:
        bridge = Bridge.connect(bridge_plan.addr, bridge_plan.rank, bridge_plan.size, timeout=bridge_plan.timeout)
    metrics = TrainerMetrics(jsonl_path_for(env.checkpoint_dir, env.role, env.rank),
                             samples_path=samples_path_for(env.checkpoint_dir, env.role, env.rank), tracker=trackers)
    metrics.gauges["rank"].set(env.rank)
    if trackers.links():
        metrics.set_tracker_links(trackers.links())
        log(f"{env.role}-{env.rank}: tracker runs {trackers.links()}")
    port = metrics.serve(env.metrics_port, env.pod_ip)
    if port:
        log(f"metrics on {env.pod_ip or '0.0.0.0'}:{port}/metrics")
    return new_context(env, cfg, bridge, metrics)


def new_context(env: ProcessEnv, cfg: TrainerConfig, bridge: Bridge | None, metrics: TrainerMetrics) -> Context:
    """A process's Context once its worlds are up: with its non-finite guard and, online, its alarms."""
    guard = NonFiniteGuard(cfg.hyperparameters.non_finite, reduce=distributed.all_reduce_sum,
                           count=metrics.count_non_finite)
    ctx = Context(env, cfg, cfg.placements(), bridge, metrics, guard)
    if ALGORITHMS[cfg.algorithm].online:
        ctx.alarms = AlarmMonitor(Thresholds.of(cfg.hyperparameters))
    return ctx


def install_stop(env: ProcessEnv) -> StopRequest:
    """From now on SIGTERM asks the gang to stop after its step instead of killing this process."""
    stop = StopRequest(env.checkpoint_dir, env.restart_attempt, env.termination_grace)
    stop.install()
    return stop


def resume_step(ctx: Context) -> int | None:
    roles = sorted(ctx.cfg.roles)
    return checkpoint.select_resume_step(ctx.env.checkpoint_dir, roles, log=log)


def run_server(ctx: Context) -> None:
    """A critic / reward / reference process: build its services, resume, answer its actors."""
    for role in ctx.hosted_roles:
        ctx.local_services[role] = build_service(ctx, role)
    savers = {r: checkpoint.RoleCheckpointer(ctx.env.checkpoint_dir, r, ctx.strategies.get(r)) for r in ctx.hosted_roles}
    step = resume_step(ctx)
    if step is not None:
        for saver in savers.values():
            saver.load(step)
        log(f"{ctx.env.role}-{ctx.env.rank}: resumed from step {step}")

    def save(step: int) -> None:
        for saver in savers.values():
            saver.save(step, {})
        ctx.metrics.set_checkpoint_step(step)

    from rlhf_trainer.roles import serve

    ranks = bridge_ranks(ctx.placements)
    actors = [ranks[("actor", a)] for a in served_actor_ranks(ctx.env.role, ctx.env.rank, ctx.placements)]
    log(f"{ctx.env.role}-{ctx.env.rank}: serving {ctx.hosted_roles} for actor bridge ranks {actors}")
    serve(ctx.bridge, ctx.local_services, actors, save, metrics=ctx.metrics)


def run(env: ProcessEnv, cfg: TrainerConfig) -> None:
    check_process(env, cfg)
    torch.manual_seed(cfg.hyperparameters.seed)
    stop = install_stop(env)
    ctx = connect(env, cfg)
    ctx.stop = stop
    finished = False
    try:
        if env.role == "actor":
            module = importlib.import_module(f"rlhf_trainer.algorithms.{ALGORITHMS[cfg.algorithm].module}")
            module.run(ctx)
        else:
            run_server(ctx)
            if stop.signalled_at is not None:  # served the actors' last save, then their "stop"
                raise Stopped()
        finished = True
    finally:
        ctx.metrics.stop(failed=not finished)
