"""Our trainer's DPO / GRPO / PPO step against TRL's on the same tiny model, data and batch.

    python bench/trainer_vs_trl.py                      # CPU, writes bench/RESULTS.md "Trainer vs TRL"
    python bench/trainer_vs_trl.py --device cuda --repeats 5 --steps 20
    python bench/trainer_vs_trl.py --only dpo --no-write
    python bench/trainer_vs_trl.py --model smollm2-135m --precision bf16 --threads 1 --repeats 2 --steps 3 \
        --warmup 1 --only dpo --only grpo           # a real size on CPU (minutes per measurement)

Each measurement is a fresh subprocess (`--one SIDE-ALGO`) that builds the model, runs `--warmup`
steps, then times `--steps` steps and prints one JSON line. The driver interleaves ours and TRL's
(A B A B ...) `--repeats` times, because this machine's speed drifts by several times over minutes,
and compares medians.

`--model smollm2-135m` builds (once, under bench/out/) a LlamaForCausalLM of SmolLM2-135M's shape with
random weights and the tiny tokenizer widened to its 49152-id vocabulary: a real size without a
download. `--model qwen2.5-0.5b` does the same at Qwen2.5-0.5B's shape (494M parameters, the GPU MFU
check: `bash bench/gpu_checks.sh`). `--precision bf16` runs both sides in bfloat16 (TRL's default is bf16 autocast; ours then
sets deepspeed.bf16 on every role); TRL runs without gradient checkpointing (its default recomputes
activations, ours does not) so both sides do the same arithmetic. `--threads 1` pins each side to one
torch thread: on a shared machine the CPU seconds per step it reports are steadier than wall time.

What is compared, per algorithm (same model, same tokenizer and prompts):
- dpo: 8 pairs per step of synthetic://preferences, reference model forward each step, beta 0.1.
- grpo: 8 prompts x 4 samples of synthetic://arithmetic, 8 new tokens, exact-match rule reward,
  k3 KL to the reference (beta 0.05), one update per batch.
- ppo: 8 prompts, 8 new tokens, tiny reward model (TRL's PPOTrainer takes only a model reward),
  critic initialised from the policy, one PPO epoch, one mini-batch; the old log-probs come from the
  sampling pass on both sides (ours: oldLogProbs sampling). TRL's PPOTrainer exists only in
  trl 1.12 (`trl.experimental.ppo`), which wants its own environment: `--trl-ppo-python` (default
  bench/out/trl112/bin/python) runs that side. `bash bench/setup_trl.sh` installs both TRL versions.

Ours runs in-process with every role colocated (one process, world of one, ZeRO stage 0), i.e. the
same work as TRL's single-process trainers; the multi-process bridge path is covered by the tests, not timed here.
On a GPU it also reports tokens/s and an approximate training MFU (6 x params x trained tokens per
second over the device's dense bf16 peak, `--peak-tflops`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALGOS = ("dpo", "grpo", "ppo")
DEFAULT_PROMPTS, GROUP, NEW_TOKENS, PROMPT_LEN, LR = 8, 4, 8, 16, 1e-5
PROMPTS = DEFAULT_PROMPTS  # prompts (DPO: pairs) per step; --prompts
# Real architectures, built with random weights: no hub is reachable, and a step's cost depends on the
# shape, not on the values. Each: (transformers config class, its fields from the model's config.json).
SHAPES = {
    # HuggingFaceTB/SmolLM2-135M (134.5M parameters)
    "smollm2-135m": ("LlamaConfig", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True)),
    # Qwen/Qwen2.5-0.5B (494M parameters; q/k/v biases are Qwen2's default): the GPU MFU check's model
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
}
MODELS = ("tiny", *SHAPES)


def model_path(name: str) -> str:
    """The model both sides load: `tiny://llama`, or a folder with a random model of one of SHAPES."""
    if name == "tiny":
        return "tiny://llama"
    folder = HERE / "out" / f"{name}-random-v2"  # v2: its padding tokens round-trip (build_shaped)
    if not (folder / "config.json").is_file():
        build_shaped(name, folder)
    return str(folder)


def build_shaped(name: str, folder: Path) -> None:
    """A causal LM of SHAPES[name] (seed 0) and the tiny tokenizer widened to its vocabulary.

    The tokenizer encodes the synthetic datasets as tiny://llama does; its vocabulary is padded up to
    the model's with added tokens `<xN>`, so that every id the model samples decodes to some text and
    that text encodes back to the same ids. (Plain vocabulary entries would not: the byte-level
    pre-tokenizer splits `<x37342>` into 8 tokens, and the reward model, which re-encodes the decoded
    response as a real reward model with its own tokenizer must, scored 5x longer rows than TRL's.)
    """
    import json

    import torch
    import transformers
    from rlhf_trainer import models
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    config_class, shape = SHAPES[name]
    spec = json.loads(models._tiny_tokenizer_json())
    vocab = spec["model"]["vocab"]
    for i in range(shape["vocab_size"] - len(vocab)):
        spec["added_tokens"].append({"id": len(vocab), "content": f"<x{i}>", "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": False})
        vocab[f"<x{i}>"] = len(vocab)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token=models.PAD,
                                  bos_token=models.BOS, eos_token=models.EOS, unk_token=models.UNK)
    assert len(tok) == shape["vocab_size"], len(tok)
    config = getattr(transformers, config_class)(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                                 eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    models.save_pretrained(AutoModelForCausalLM.from_config(config), tok, folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- our side ---------------------------------------------------------------------------------------


def with_contexts(prompts: list[str], context_tokens: int, ragged: bool) -> list[str]:
    """Each prompt after a context of `context_tokens` random digits (one token each in the tiny tokenizer:
    the Digits pre-tokenizer), the long prompt of real data (a document, a conversation) that prefix
    sharing saves. `ragged`: each context 0..context_tokens digits long (uniform), the uneven rows of real
    data, which a padded batch pads to its longest. Seed 0: both sides get the same prompts."""
    import random

    if not context_tokens:
        return list(prompts)
    rng = random.Random(0)
    out = []
    for prompt in prompts:
        length = rng.randint(0, context_tokens) if ragged else context_tokens
        out.append("".join(rng.choice("0123456789") for _ in range(length)) + "\n" + prompt)
    return out


def preference_rows(context_tokens: int, ragged: bool = False) -> list[dict[str, str]]:
    """The DPO pairs both sides train on: synthetic://preferences, their prompts `with_contexts`."""
    from rlhf_trainer.data import synthetic_preferences

    pairs = synthetic_preferences()
    prompts = with_contexts([r.prompt for r in pairs], context_tokens, ragged)
    return [{"prompt": p, "chosen": r.chosen, "rejected": r.rejected} for p, r in zip(prompts, pairs, strict=True)]


def prompt_rows(context_tokens: int, ragged: bool = False) -> list[dict[str, str]]:
    """The GRPO / PPO prompts both sides sample from: synthetic://arithmetic, `with_contexts`."""
    from rlhf_trainer.data import synthetic_arithmetic

    rows = synthetic_arithmetic()
    prompts = with_contexts([r.prompt for r in rows], context_tokens, ragged)
    return [{"prompt": p, "answer": r.answer} for p, r in zip(prompts, rows, strict=True)]


def dataset(algorithm: str, context_tokens: int, ragged: bool = False) -> dict[str, str]:
    """Our dataset for `algorithm`: the synthetic one itself, or its rows with contexts as JSONL."""
    kind, fmt = ("preferences", "pairs") if algorithm == "dpo" else ("arithmetic", "prompts")
    if not context_tokens:
        return {"path": f"synthetic://{kind}", **({"format": fmt} if algorithm == "dpo" else {})}
    return {"path": str(rows_file(algorithm, context_tokens, ragged)), "format": fmt}


def rows_file(algorithm: str, context_tokens: int, ragged: bool) -> Path:
    """The rows of `algorithm` (preference_rows or prompt_rows) written as JSONL under bench/out."""
    kind = "preferences" if algorithm == "dpo" else "arithmetic"
    rows = preference_rows(context_tokens, ragged) if algorithm == "dpo" else prompt_rows(context_tokens, ragged)
    path = HERE / "out" / f"{kind}-context{context_tokens}{'-ragged' if ragged else ''}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _our_context(algorithm: str, model: str, bf16: bool = False, prefix_sharing: bool = False,
                 context_tokens: int = 0, padding_free: bool = False, ragged: bool = False):
    from rlhf_contract.config import parse_config
    from rlhf_trainer.distributed import ProcessEnv, init_role_world
    from rlhf_trainer.metrics import TrainerMetrics
    from rlhf_trainer.runtime import new_context

    # One process: ZeRO has nothing to shard, so stage 0 (DeepSpeed engine, no partitioning bookkeeping).
    zero0 = {"deepspeed": {"zero_stage": 0, "bf16": bf16}}
    frozen = {"colocate_with": "actor", "deepspeed": {"bf16": bf16}}  # bf16: the weights' dtype
    roles = {"actor": zero0, "reference": frozen}
    reward = {"type": "rule", "rule": "exact_match"}
    reward_model = None
    if algorithm == "ppo":
        roles.update(critic={"colocate_with": "actor", **zero0}, reward=frozen)
        reward, reward_model = {"type": "model"}, {"path": model}
    micro = PROMPTS * GROUP if algorithm == "grpo" else PROMPTS
    rows = 2 * micro if algorithm == "dpo" else micro  # a DPO pair is two rows
    cfg = parse_config({
        "job": "bench", "algorithm": algorithm, "model": {"path": model}, "reward_model": reward_model,
        "reward": reward, "dataset": dataset(algorithm, context_tokens, ragged), "roles": roles,
        "hyperparameters": {
            "batch_size": PROMPTS, "micro_batch_size": micro, "group_size": GROUP, "max_new_tokens": NEW_TOKENS,
            "max_prompt_length": PROMPT_LEN + context_tokens + 1, "learning_rate": LR, "kl_coef": 0.05, "beta": 0.1,
            # Every no-grad pass over the whole batch at once, as TRL's trainers do here.
            "inference_chunk_size": rows,
            # PPO's old log-probs from the sampling pass, as TRL's PPOTrainer takes them.
            "old_log_probs": "sampling" if algorithm == "ppo" else "forward",
            # Each pair's / group's prompt once in the actor's passes and generation's prefill
            # (TRL has no equivalent; --prefix-sharing). PPO samples once per prompt: nothing to share.
            "prefix_sharing": prefix_sharing and algorithm != "ppo",
            # Packed log-prob forwards of the actor and the reference (--padding-free; TRL's DPO and GRPO pad)
            "padding_free": padding_free,
        },
    })
    colocated = tuple(r for r in roles if r != "actor")
    env = ProcessEnv("bench", "actor", 0, 1, colocated, "", {}, None, str(HERE / "out" / "ckpt"), 0, 0, "")
    init_role_world(master_addr="127.0.0.1", master_port=_free_port(), rank=0, world_size=1)
    return new_context(env, cfg, None, TrainerMetrics(None))


def run_ours(algorithm: str, steps: int, warmup: int, device: str, model: str, bf16: bool,
             prefix_sharing: bool = False, context_tokens: int = 0, padding_free: bool = False,
             ragged: bool = False) -> dict:
    import torch
    from rlhf_trainer.algorithms.common import load_rows, start_colocated, text_pipeline
    from rlhf_trainer.data import Sampler

    ctx = _our_context(algorithm, model, bf16, prefix_sharing, context_tokens, padding_free, ragged)
    renderer = text_pipeline(ctx)
    records = load_rows(ctx, renderer)  # run_algorithm()'s steps, without drive()'s checkpoints and export
    start_colocated(ctx)
    if algorithm == "dpo":
        from rlhf_trainer.algorithms.dpo import DPO as Algo
    elif algorithm == "grpo":
        from rlhf_trainer.algorithms.grpo import GroupPolicyGradient

        def Algo(c, r):  # noqa: N802 (a factory in the place of a class)
            return GroupPolicyGradient(c, r, "grpo")
    else:
        from rlhf_trainer.algorithms.ppo import PPO as Algo
    algo = Algo(ctx, renderer)
    sampler = Sampler(len(records), PROMPTS, seed=0)
    times, cpu, tokens, phases = [], [], 0.0, {}
    for i in range(warmup + steps):
        batch = [records[j] for j in sampler.next_batch()]
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0, timings = time.perf_counter(), time.process_time(), {}
        stats = algo.step(batch, timings)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            tokens += stats["tokens"]
            for key, value in timings.items():
                if key.endswith("_seconds"):
                    phases.setdefault(key[:-len("_seconds")], []).append(value)
    params = sum(p.numel() for p in algo.strategy.module.parameters())
    result = _result("ours", algorithm, times, tokens, params, cpu)
    result["phases"] = {name: statistics.median(values) for name, values in phases.items()}
    return result


# ---- TRL's side -------------------------------------------------------------------------------------


class _StepTimer:
    """A transformers TrainerCallback timing each optimizer step (built lazily: transformers import)."""

    def __new__(cls, warmup: int, device: str):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            # From one step's end to the next's: the whole step, data loading and generation included.
            def __init__(self):
                self.times, self.cpu, self._last, self._cpu = [], [], 0.0, 0.0

            def _now(self):
                if device == "cuda":
                    import torch

                    torch.cuda.synchronize()
                return time.perf_counter()

            def on_train_begin(self, args, state, control, **kw):
                self._last, self._cpu = self._now(), time.process_time()

            def on_step_end(self, args, state, control, **kw):
                now, cpu = self._now(), time.process_time()
                if state.global_step > warmup:
                    self.times.append(now - self._last)
                    self.cpu.append(cpu - self._cpu)
                self._last, self._cpu = now, cpu

        return Timer()


def _trl_common(steps: int, warmup: int, device: str, out: Path, bf16: bool) -> dict:
    # bf16: TRL's default (autocast); gradient checkpointing off (TRL turns it on by default) so that
    # both sides do the same arithmetic: ours does not recompute activations unless asked.
    return dict(bf16=bf16, gradient_checkpointing=False,
        output_dir=str(out), max_steps=warmup + steps, learning_rate=LR, logging_steps=10**6, save_strategy="no",
        report_to=[], use_cpu=(device == "cpu"), dataloader_num_workers=0, disable_dropout=True, seed=0,
    )


def run_trl(algorithm: str, steps: int, warmup: int, device: str, model: str, bf16: bool,
            context_tokens: int = 0, ragged: bool = False) -> dict:
    from datasets import Dataset
    from rlhf_trainer import models
    from rlhf_trainer.rewards import build_reward_fn

    tok = models.load_tokenizer(model)
    policy = models.load_policy(model, seed=0)
    out = HERE / "out" / f"trl-{algorithm}"
    timer = _StepTimer(warmup, device)
    if algorithm == "dpo":
        from trl import DPOConfig, DPOTrainer

        rows = preference_rows(context_tokens, ragged)
        args = DPOConfig(**_trl_common(steps, warmup, device, out, bf16), per_device_train_batch_size=PROMPTS, beta=0.1,
                         max_length=PROMPT_LEN + context_tokens + 1 + NEW_TOKENS + 1)
        trainer = DPOTrainer(model=policy, ref_model=models.load_policy(model, seed=0), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[timer])
        samples_per_step = PROMPTS
    else:
        from rlhf_contract.config import RewardConfig
        from trl import GRPOConfig, GRPOTrainer

        rule = build_reward_fn(RewardConfig(type="rule", rule="exact_match"))

        def exact_match(prompts, completions, answer, **_):
            return rule(prompts, completions, answer)

        rows = prompt_rows(context_tokens, ragged)
        args = GRPOConfig(**_trl_common(steps, warmup, device, out, bf16), per_device_train_batch_size=PROMPTS * GROUP,
                          num_generations=GROUP, steps_per_generation=1,
                          max_completion_length=NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0, beta=0.05,
                          num_iterations=1)
        # GRPOTrainer builds its reference model from the policy's path: give it a folder.
        folder = model if not model.startswith("tiny://") else models.save_pretrained(policy, tok, out / "tiny-llama")
        trainer = GRPOTrainer(model=str(folder), reward_funcs=exact_match, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tok, callbacks=[timer])
        samples_per_step = PROMPTS * GROUP
    trainer.train()
    params = sum(p.numel() for p in policy.parameters())
    tokens = samples_per_step * (PROMPT_LEN + NEW_TOKENS) * len(timer.times)  # an upper bound, for tokens/s
    return _result("trl", algorithm, timer.times, tokens, params, timer.cpu)


TRL_PPO_SCRIPT = r'''
import json, sys, time, os
sys.path[:0] = os.environ["RLHF_TRAINER_PATH"].split(os.pathsep)
from datasets import Dataset
from transformers import TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer
from rlhf_trainer import models
steps, warmup, device, P, N, L = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]),
                                  int(sys.argv[5]), int(sys.argv[6]))
model = sys.argv[7]  # the same model as ours: policy, reference, reward and value all start from it
tok = models.load_tokenizer(model)
tok.padding_side = "left"
with open(sys.argv[8]) as rows:  # ours' dataset file: the same prompts
    ds = Dataset.from_list([{"input_ids": tok(json.loads(r)["prompt"])["input_ids"][-L:]} for r in rows])
class Timer(TrainerCallback):
    # PPOTrainer's own loop calls no on_step_begin: time from one step's end to the next's.
    times = []
    def on_train_begin(self, *a, **k): self.last = time.perf_counter()
    def on_step_end(self, args, state, *a, **k):
        now = time.perf_counter()
        if state.global_step > warmup: self.times.append(now - self.last)
        self.last = now
timer = Timer()
args = PPOConfig(output_dir=os.environ["OUT"], per_device_train_batch_size=P, gradient_accumulation_steps=1,
                 num_ppo_epochs=1, num_mini_batches=1, total_episodes=P * (steps + warmup), response_length=N,
                 local_rollout_forward_batch_size=P, learning_rate=1e-5, report_to=[], save_strategy="no",
                 use_cpu=(device == "cpu"), kl_coef=0.05, missing_eos_penalty=1.0, stop_token="eos",
                 num_sample_generations=0, logging_steps=10**6, seed=0)
trainer = PPOTrainer(args=args, processing_class=tok, model=models.load_policy(model, seed=0),
                     ref_model=models.load_policy(model, seed=0),
                     reward_model=models.load_reward_model(model, seed=0),
                     value_model=models.load_reward_model(model, seed=0),
                     train_dataset=ds, callbacks=[timer])
trainer.train()
print("RESULT " + json.dumps({"times": timer.times}))
'''


def trl_ppo_invocation(steps: int, warmup: int, device: str, model: str, context_tokens: int,
                       ragged: bool) -> tuple[dict[str, str], list[str]]:
    """(environment additions, arguments) for TRL_PPO_SCRIPT in TRL 1.12's own venv."""
    # The trainer's package and the contract it imports (TRL 1.12's own venv has neither installed).
    paths = os.pathsep.join(str(HERE.parent / d) for d in ("trainer_image", "contract"))
    env = {"RLHF_TRAINER_PATH": paths, "OUT": str(HERE / "out" / "trl-ppo")}
    return env, [str(steps), str(warmup), device, str(PROMPTS), str(NEW_TOKENS), str(PROMPT_LEN + context_tokens + 1),
                 model, str(rows_file("ppo", context_tokens, ragged))]


def run_trl_ppo(steps: int, warmup: int, device: str, python: str, model: str, context_tokens: int = 0,
                ragged: bool = False) -> dict:
    env, script_args = trl_ppo_invocation(steps, warmup, device, model, context_tokens, ragged)
    proc = subprocess.run([python, "-c", TRL_PPO_SCRIPT, *script_args], env={**os.environ, **env},
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"TRL PPO failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    times = json.loads(lines[-1][len("RESULT "):])["times"]
    return _result("trl", "ppo", times, PROMPTS * (PROMPT_LEN + NEW_TOKENS) * len(times), 0)


def _result(side: str, algorithm: str, times: list[float], tokens: float, params: int,
            cpu: list[float] | None = None) -> dict:
    """One measurement: median step wall time (and CPU seconds of the process, steadier on a shared
    machine), samples/s, tokens/s, and the process's peak resident memory (ru_maxrss, whole run)."""
    import resource

    samples = PROMPTS * GROUP if algorithm == "grpo" else PROMPTS
    step = statistics.median(times)
    return {"side": side, "algorithm": algorithm, "step_s": step, "samples_per_s": samples / step,
            "tokens_per_s": tokens / sum(times), "params": params, "steps": len(times),
            "step_cpu_s": statistics.median(cpu) if cpu else None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---- driver -----------------------------------------------------------------------------------------


def one(args) -> None:
    global PROMPTS  # the batch of every function here; --prompts sets it for this measurement
    PROMPTS = args.prompts
    side, algorithm = args.one.split("-")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if side == "ours":
        result = run_ours(algorithm, args.steps, args.warmup, args.device, model_path(args.model),
                          args.precision == "bf16", args.prefix_sharing, args.context_tokens, args.padding_free,
                          args.ragged)
    elif algorithm == "ppo":
        result = run_trl_ppo(args.steps, args.warmup, args.device, args.trl_ppo_python, model_path(args.model),
                             args.context_tokens, args.ragged)
    else:
        result = run_trl(algorithm, args.steps, args.warmup, args.device, model_path(args.model),
                         args.precision == "bf16", args.context_tokens, args.ragged)
    print("RESULT " + json.dumps(result), flush=True)


def measure(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, "--trl-ppo-python", args.trl_ppo_python, "--model", args.model,
           "--threads", str(args.threads), "--precision", args.precision, "--prompts", str(args.prompts),
           "--context-tokens", str(args.context_tokens), *(["--prefix-sharing"] if args.prefix_sharing else []),
           *(["--padding-free"] if args.padding_free else []), *(["--ragged"] if args.ragged else [])]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def machine(device: str) -> str:
    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name()} ({platform.machine()}, {os.cpu_count()} CPU cores)"
    return f"CPU only, {os.cpu_count()} cores, {platform.processor() or platform.machine()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=ALGOS, action="append")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per side (0 = torch's default); 1 is steadier on a shared machine")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="both sides: ours deepspeed.bf16 on every role, TRL's bf16 (autocast)")
    p.add_argument("--model", choices=MODELS, default="tiny",
                   help="tiny://llama (framework overhead) or a random model of a real shape (SHAPES)")
    p.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS,
                   help="prompts (DPO: pairs) per step; a GPU wants more than the CPU default to fill its matrix units")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    p.add_argument("--trl-ppo-python", default=str(HERE / "out" / "trl112" / "bin" / "python"))
    p.add_argument("--prefix-sharing", action="store_true",
                   help="ours: DPO and GRPO with hyperparameters.prefixSharing (each pair's / group's prompt once)")
    p.add_argument("--padding-free", action="store_true",
                   help="ours: hyperparameters.paddingFree (packed log-prob forwards of the actor and the reference)")
    p.add_argument("--context-tokens", type=int, default=0,
                   help="a context of this many tokens before each prompt (both sides), as in real data")
    p.add_argument("--ragged", action="store_true",
                   help="each context 0..--context-tokens tokens long (uniform), the uneven rows of real data")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)
    global PROMPTS  # the report's figures
    PROMPTS = args.prompts
    algos = args.only or list(ALGOS)
    results: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for algorithm in algos:
            for side in (("ours", "trl") if rep % 2 == 0 else ("trl", "ours")):  # alternate who goes first
                try:
                    r = measure(f"{side}-{algorithm}", args)
                except RuntimeError as exc:
                    print(f"{side}-{algorithm}: {exc}", file=sys.stderr)
                    continue
                results.setdefault((side, algorithm), []).append(r)
                print(f"rep {rep} {side:4} {algorithm:4} step {r['step_s']:.4f}s  {r['samples_per_s']:.1f} samples/s",
                      flush=True)
    text = report(args, algos, results)
    print(text)
    if not args.no_write:
        write_results(text, HERE / "RESULTS.md", subsection_title(args))


def subsection_title(args) -> str:
    """`### cpu` for the tiny model (the framework-overhead figures); the real sizes get their own."""
    if args.model == "tiny":
        return f"### {args.device}"
    return (f"### {args.device}, {args.model}, {args.precision}" + (f", {args.threads} thread(s)" if args.threads else "")
            + (", ours paddingFree" if args.padding_free else ""))


def _median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def report(args, algos, results) -> str:
    """The RESULTS.md subsection: medians over repeats of each run's median step (wall and CPU seconds)."""
    flags = f"--model {args.model} --precision {args.precision}" + (f" --threads {args.threads}" if args.threads else "")
    flags += f" --prompts {args.prompts}" if args.prompts != DEFAULT_PROMPTS else ""
    flags += " --prefix-sharing" if args.prefix_sharing else ""
    flags += " --padding-free" if args.padding_free else ""
    flags += f" --context-tokens {args.context_tokens}" if args.context_tokens else ""
    flags += " --ragged" if args.ragged else ""
    model = "tiny Llama (`tiny://llama`, 0.1M parameters)"
    if args.model != "tiny":
        config_class, shape = SHAPES[args.model]
        params = next((r["params"] for rows in results.values() for r in rows if r.get("params")), 0)
        model = (f"a {args.model}-shaped {config_class.removesuffix('Config')}ForCausalLM ({params / 1e6:.1f}M "
                 f"parameters, random weights, vocabulary {shape['vocab_size']}, tied embeddings)")
    lines = [
        subsection_title(args),
        "",
        f"Command: `python bench/trainer_vs_trl.py --device {args.device} {flags} --repeats {args.repeats} "
        f"--steps {args.steps} --warmup {args.warmup}`  ",
        f"Machine: {machine(args.device)}; {time.strftime('%Y-%m-%d')}.  ",
        f"Setup: {model}; {PROMPTS} prompts/pairs per step, GRPO {GROUP} samples per prompt, {NEW_TOKENS} new "
        f"tokens; {args.precision} on both sides; TRL without gradient checkpointing; fresh process per "
        "measurement, ours and TRL interleaved (order alternating per repeat); medians over repeats of each "
        "run's median step. CPU s: CPU seconds of the whole process per step (steadier than wall time on a "
        "shared machine). Peak RSS: the measuring process's ru_maxrss."
        + (" Ours: DPO and GRPO with prefixSharing (each pair's / group's prompt once)." if args.prefix_sharing
           else "")
        + (" Ours: paddingFree (the actor's and the reference's log-prob forwards packed, no padding); TRL at its "
           "defaults (padded)." if args.padding_free else "")
        + (f" Prompts: {'0 to ' if args.ragged else ''}{args.context_tokens} context tokens before each "
           "synthetic prompt." if args.context_tokens else ""),
        "",
        "| algorithm | ours samples/s | TRL samples/s | ours / TRL (wall) | ours CPU s/step | TRL CPU s/step | "
        "ours / TRL (CPU) | ours tokens/s | peak RSS ours / TRL |" + (" ours MFU |" if args.device == "cuda" else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if args.device == "cuda" else ""),
    ]
    for algorithm in algos:
        ours, trl = results.get(("ours", algorithm), []), results.get(("trl", algorithm), [])
        if not ours:
            lines.append(f"| {algorithm} | failed | | | | | | | |")
            continue
        o, t = _median(ours, "samples_per_s"), _median(trl, "samples_per_s")
        oc, tc = _median(ours, "step_cpu_s"), _median(trl, "step_cpu_s")
        tok = _median(ours, "tokens_per_s")
        # TRL's PPO runs in a subprocess of its own venv: no CPU seconds or peak RSS of it here
        trl_cpu = f"{tc:.2f} | {tc / oc:.2f}x" if algorithm != "ppo" else "not measured | "
        trl_rss = f"{_median(trl, 'peak_rss_mib'):.0f} MiB" if algorithm != "ppo" else "not measured"
        row = (f"| {algorithm} | {o:.2f} | {t:.2f} | {o / t:.2f}x | {oc:.2f} | {trl_cpu} | {tok:.0f} | "
               f"{_median(ours, 'peak_rss_mib'):.0f} MiB / {trl_rss} |")
        if args.device == "cuda":
            row += f" {100 * 6 * ours[0]['params'] * tok / (args.peak_tflops * 1e12):.2g}% |"
        lines.append(row)
    phases = {a: results.get(("ours", a), []) for a in algos}
    lines += ["", "Ours per phase (median seconds of wall time per step): " + "; ".join(
        f"{a}: " + ", ".join(f"{name} {statistics.median(r['phases'][name] for r in rows):.2f}"
                             for name in rows[0].get("phases", {}))
        for a, rows in phases.items() if rows)]
    raw = HERE / "out" / f"trainer_vs_trl-{args.model}-{args.precision}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({f"{k[0]}-{k[1]}": v for k, v in results.items()}, indent=1))
    return "\n".join(lines)


def write_results(text: str, path: Path, title: str) -> None:
    """Replace (or add) the subsection `title` of the "Trainer vs TRL" section of bench/RESULTS.md."""
    section_title = "## Trainer vs TRL"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if section_title not in old:
        old = old.rstrip() + f"\n\n{section_title}\n\nWritten by bench/trainer_vs_trl.py, one subsection per setup.\n"
    start = old.index(section_title)
    end = old.find("\n## ", start + len(section_title))
    section = old[start:] if end < 0 else old[start:end + 1]
    if title + "\n" in section:
        s0 = section.index(title + "\n")
        s1 = section.find("\n### ", s0 + len(title))
        section = section[:s0] + (section[s1 + 1:] if s1 >= 0 else "")
    section = section.rstrip() + "\n\n" + text.rstrip() + "\n"
    rest = "" if end < 0 else old[end + 1:]
    path.write_text(old[:start] + section + ("\n" + rest if rest else ""))


if __name__ == "__main__":
    main()
