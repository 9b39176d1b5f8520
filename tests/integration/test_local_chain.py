"""Several jobs of one file through the local runner, with the fake trainer (seconds): the StackLLaMA
chain runs in dependency order and each stage reads its source's export; a failed source fails its
dependants; a fromJob cycle fails its jobs; run-local refuses a source that is not in the file."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import yaml
from rlhf_operator import cli, local, localexec

REPO = Path(__file__).resolve().parents[2]
FAKE = [sys.executable, str(Path(__file__).with_name("local_fake_trainer.py"))]
PIPELINE = REPO / "crds" / "examples" / "stackllama-tiny.yaml"
SFT, RM, PPO = "stackllama-tiny-sft", "stackllama-tiny-rm", "stackllama-tiny-ppo"


def pipeline(max_steps: int = 4) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(PIPELINE.read_text()) if d]
    for doc in docs:
        doc["spec"]["hyperparameters"]["maxSteps"] = max_steps
        doc["spec"]["checkpoint"]["intervalSteps"] = 2
    return docs


def local_run(tmp_path: Path, manifests: list[dict], env_for: dict[str, dict] | None = None) -> local.LocalRun:
    supervisor = localexec.Supervisor()
    runners = [local.LocalRunner(m, tmp_path, trainer_command=FAKE, serve_metrics=False, stop_grace=2,
                                 supervisor=supervisor,
                                 extra_env={"FAKE_STEP_SECONDS": "0.05",
                                            **(env_for or {}).get(m["metadata"]["name"], {})})
               for m in manifests]
    return local.LocalRun(runners)


def first(runner: local.LocalRunner, what: str, detail: str = "") -> float:
    return min(t for t, w, d in runner.timeline.entries if w == what and (not detail or d == detail))


def test_the_stackllama_chain_runs_in_order_and_each_stage_reads_its_source_export(tmp_path):
    run = local_run(tmp_path, pipeline())
    statuses = run.run(timeout=120)
    assert {name: s["phase"] for name, s in statuses.items()} == {SFT: "Succeeded", RM: "Succeeded", PPO: "Succeeded"}
    sft, rm, ppo = run.runners
    # each stage's pods started only after its sources Succeeded
    assert first(sft, "phase", "Succeeded") < first(rm, "pod_started")
    assert first(rm, "phase", "Succeeded") < first(ppo, "pod_started")
    # the fake trainer exits 78 unless every model path is a folder with config.json: the export
    config = json.loads((tmp_path / PPO / "config" / "config.json").read_text())
    assert config["model"]["path"] == str(tmp_path.resolve() / SFT / "checkpoints" / "export")
    assert config["reward_model"]["path"] == str(tmp_path.resolve() / RM / "checkpoints" / "export")
    assert config["critic"]["model"] == "reward"  # the critic starts from the reward model's export
    assert [s["name"] for s in statuses[PPO]["sources"]] == [SFT, RM]
    assert "waitingFor" not in statuses[PPO]
    events = (tmp_path / PPO / "events.log").read_text()
    assert f"WaitingForSource: waiting for RLHFJob {SFT}" in events and "SourcesSucceeded" in events


def test_a_failed_source_fails_its_dependants_and_they_start_no_pod(tmp_path):
    env = {SFT: {"FAKE_EXIT_CODE": "65", "FAKE_EXIT_MESSAGE": "sft.jsonl:3: bad row"}}
    run = local_run(tmp_path, pipeline(), env)
    statuses = run.run(timeout=120)
    assert statuses[SFT]["phase"] == "Failed"
    for name in (RM, PPO):
        failed = next(c for c in statuses[name]["conditions"] if c["type"] == "Failed")
        assert (statuses[name]["phase"], failed["reason"]) == ("Failed", "SourceFailed")
        assert f"RLHFJob {SFT} failed" in failed["message"] and "sft.jsonl:3: bad row" in failed["message"]
    assert not run.runners[1].timeline.times("pod_started") and not run.runners[2].timeline.times("pod_started")


def test_a_cycle_fails_every_job_on_it(tmp_path):
    a, b, _ = pipeline()
    a = copy.deepcopy(a)
    a["spec"]["model"] = {"fromJob": RM}  # sft <- rm <- sft
    statuses = local_run(tmp_path, [a, b]).run(timeout=60)
    for name in (SFT, RM):
        failed = next(c for c in statuses[name]["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "SourceCycle" and "->" in failed["message"]


def test_run_local_refuses_a_source_that_is_not_in_the_file(tmp_path, capsys):
    _, rm, _ = pipeline()
    path = tmp_path / "rm-only.yaml"
    path.write_text(yaml.safe_dump(rm))
    assert cli.main(["run-local", str(path), "--workdir", str(tmp_path)]) == 2
    assert f"spec.model.fromJob names RLHFJob {SFT}, which is not in this file" in capsys.readouterr().err


def test_run_local_names_the_job_of_a_bad_document(tmp_path, capsys):
    docs = pipeline()
    docs[1]["spec"]["hyperparameters"]["batchSize"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    assert cli.main(["run-local", str(path), "--workdir", str(tmp_path)]) == 2
    assert f"{RM}: spec.hyperparameters.batchSize" in capsys.readouterr().err
