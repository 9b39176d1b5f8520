"""`rlhf-operator run-local` as a user runs it, on real-looking data: the users' long-pairs case (tiny model)
and GRPO, DPO and SFT on the real SmolLM2-135M-Instruct with chat-formatted data (its chat template
renders them); each exported folder reloads with transformers and generates.

Time and disk (2 CI cores): a SmolLM2 job loads the 538 MB model once per role process (reference
colocated in the actor's process), trains 2 steps and writes one 2.1 GB checkpoint (fp32 weights +
Adam states) and a 0.6 GB export; each test deletes its run folder when done.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rlhf_operator import report
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow
CASES = Path(__file__).parent / "cases"
RUN_TIMEOUT = 1200


def run_local(manifest: Path, workdir: Path) -> tuple[dict, Path, str]:
    """(status, run folder, CLI output) of `rlhf-operator run-local MANIFEST` run from the manifest's folder."""
    exe = Path(sys.executable).with_name("rlhf-operator")
    done = subprocess.run([str(exe), "run-local", manifest.name, "--workdir", str(workdir), "--fresh", "--no-progress",
                           "--no-metrics-server"], cwd=manifest.parent, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    name = yaml.safe_load(manifest.read_text())["metadata"]["name"]
    run_dir = workdir / name
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(run_dir.glob("pods/*/log.txt")))
    return status, run_dir, done.stdout[-3000:] + done.stderr[-2000:] + "\n" + logs


def metrics(run_dir: Path) -> list[dict]:
    return report.history(report.read_jsonl(run_dir / "checkpoints" / "metrics" / "actor-0.jsonl")).final


# ---- the users' long-pairs case (tests/integration/cases/long-pairs, from a user's report) ----------


def test_long_pairs_train_at_their_real_length(tmp_path):
    case = tmp_path / "case"
    shutil.copytree(CASES / "long-pairs", case)
    status, run_dir, out = run_local(case / "job.yaml", tmp_path / "runs")
    assert status.get("phase") == "Succeeded", out
    rows = metrics(run_dir)
    assert [r["truncated_rows"] for r in rows] == [0, 0, 0]
    # Before: answers cut to 17 tokens were identical, the loss stayed log 2 and the accuracy 0.
    assert math.isclose(rows[0]["loss"], math.log(2), rel_tol=1e-4)  # step 1: policy == reference
    # After: the pairs differ, the loss moves off log 2 (the case's learning rate 1e-2 makes it swing).
    assert all(abs(r["loss"] - math.log(2)) > 0.01 for r in rows[1:]), rows
    assert max(r["preference_accuracy"] for r in rows) > 0, rows
    assert "2 rows, 0 truncated (0.0%), 0 identical pairs dropped" in out


def test_long_pairs_cut_short_fail_at_startup_naming_dataset_share_and_setting(tmp_path):
    case = tmp_path / "case"
    shutil.copytree(CASES / "long-pairs", case)
    job = yaml.safe_load((case / "job.yaml").read_text())
    job["spec"]["hyperparameters"]["maxLength"] = 24
    (case / "job.yaml").write_text(yaml.safe_dump(job))
    status, _, out = run_local(case / "job.yaml", tmp_path / "runs")
    assert status.get("phase") == "Failed" and status.get("restarts", 0) == 0, out
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PermanentError", failed
    assert "pairs.jsonl: 2 of 2 rows (100%) would be truncated" in failed["message"], failed
    assert "raise hyperparameters.maxLength (now 24" in failed["message"], failed


# ---- SmolLM2-135M-Instruct, chat-formatted data ----------------------------------------------------

QUESTIONS = [("What is 3+4?", "7"), ("What is 2+5?", "7"), ("What is 6+2?", "8"), ("What is 9-4?", "5")]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_data(folder: Path) -> None:
    """Chat-formatted data in TRL's conversational forms (the chat template renders every row)."""
    rows = {
        "prompts.jsonl": [{"prompt": [user(q)], "answer": a} for q, a in QUESTIONS],
        "pairs.jsonl": [{"chosen": [user(q), assistant(f"{q[8:-1]} = {a}")], "rejected": [user(q), assistant("No idea.")]}
                        for q, a in QUESTIONS],
        "chat.jsonl": [{"messages": [user(q), assistant(f"The answer is {a}.")]} for q, a in QUESTIONS],
    }
    for name, items in rows.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in items))


ACTOR_AND_REFERENCE = [{"name": "actor"}, {"name": "reference", "colocateWith": "actor"}]
JOBS = {
    "grpo": ("prompts.jsonl", ACTOR_AND_REFERENCE, {"reward": {"type": "rule", "rule": "exact_match"}},
             {"batchSize": 2, "microBatchSize": 4, "groupSize": 2, "maxNewTokens": 16, "learningRate": 1.0e-6}),
    "dpo": ("pairs.jsonl", ACTOR_AND_REFERENCE, {}, {"batchSize": 2, "microBatchSize": 2, "learningRate": 5.0e-6}),
    "sft": ("chat.jsonl", [{"name": "actor"}], {}, {"batchSize": 2, "microBatchSize": 2, "learningRate": 1.0e-5}),
}


def manifest(algorithm: str, model: Path) -> dict:
    data, roles, extra, hyperparameters = JOBS[algorithm]
    return {
        "apiVersion": "rlhf.dev/v1alpha1", "kind": "RLHFJob", "metadata": {"name": f"smollm2-{algorithm}"},
        "spec": {"algorithm": algorithm, "image": "trainer", "model": {"path": str(model)},
                 "dataset": {"path": data}, "roles": roles, **extra,
                 "hyperparameters": {"maxSteps": 2, **hyperparameters},
                 # one checkpoint, at the end (2.1 GB): the smallest the checkpoint settings allow
                 "checkpoint": {"intervalSteps": 100, "keep": 1},
                 "failurePolicy": {"maxRestarts": 0, "backoffSeconds": 1}},
    }


def assert_export_reloads_and_generates(export: Path, original: Path) -> None:
    config = json.loads((export / "config.json").read_text())
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert tokenizer.chat_template, "the exported tokenizer lost its chat template"
    text = tokenizer.apply_chat_template([user("What is 3+4?")], add_generation_prompt=True, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    before = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert changed, "training changed no weight"


@pytest.mark.parametrize("algorithm", list(JOBS))
def test_smollm2_trains_on_chat_data_and_exports_a_working_model(algorithm, smollm2, tmp_path):
    write_data(tmp_path)
    path = tmp_path / f"{algorithm}.yaml"
    path.write_text(yaml.safe_dump(manifest(algorithm, smollm2)))
    try:
        status, run_dir, out = run_local(path, tmp_path / "runs")
        assert status.get("phase") == "Succeeded", out
        rows = metrics(run_dir)
        assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows), rows
        assert all(r["truncated_rows"] == 0 for r in rows)
        assert "4 rows, 0 truncated" in out
        if algorithm == "dpo":
            assert math.isclose(rows[0]["loss"], math.log(2), rel_tol=1e-4) and rows[1]["loss"] < math.log(2), rows
        if algorithm == "grpo":
            # "3 + 4 = 7 ..." scores 1 (its last number), not 0.1 (its first): some samples are right
            assert max(r["reward_mean"] for r in rows) > 0.1, rows
        assert_export_reloads_and_generates(run_dir / "checkpoints" / "export", smollm2)
    finally:
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)  # GBs of checkpoint and export
