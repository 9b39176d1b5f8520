"""W&B and MLflow trackers (rlhf_trainer.trackers) in a tiny job run by the local runner, offline: the
W&B offline run files and the MLflow file store on the checkpoint volume hold every step's metrics (read
back with W&B's and MLflow's own formats), and the runs' links reach status.progress.trackers."""

import json
import struct
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from rlhf_operator import local

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 3


def wandb_records(path: Path):
    """The protobuf Records of a W&B run file (`run-<id>.wandb`): a 7-byte W&B header, then LevelDB's log
    format (32 KiB blocks of chunks: crc32c u32, length u16, type u8 = full / first / middle / last).
    wandb >= 0.20 reads these files in its Go core only, so the framing is read here."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, parts, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """step -> {key: number} of the run's history records (W&B's step is the trainer's step)."""
    out: dict[int, dict[str, float]] = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            out.setdefault(int(row["_step"]), {}).update(row)
    return out


def mlflow_metric(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of one metric of an MLflow file store run (`metrics/<tag>`: `ms value step` lines)."""
    lines = (run_dir / "metrics" / tag).read_text().split("\n")
    return {int(step): float(value) for _ms, value, step in (line.split() for line in lines if line)}


@pytest.mark.timeout(900)
def test_offline_wandb_and_mlflow_file_store_hold_every_step(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the spec's mode decides
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    obj = yaml.safe_load((REPO / "crds" / "examples" / "grpo-tiny.yaml").read_text())
    obj["spec"]["hyperparameters"].update(maxSteps=MAX_STEPS, sampleIntervalSteps=1, samplesPerStep=2)
    obj["spec"]["checkpoint"]["intervalSteps"] = MAX_STEPS
    obj["spec"]["trackers"] = {"wandb": {"enabled": True, "mode": "offline", "project": "tests",
                                         "apiKeySecret": {"name": "wandb", "key": "api-key"}},
                               "mlflow": {"enabled": True, "experiment": "tiny"}}
    runner = local.LocalRunner(obj, tmp_path, serve_metrics=False)
    status = runner.run(timeout=600)
    logs = "\n".join(p.read_text()[-3000:] for p in runner.run_dir.glob("pods/*/log.txt"))
    assert status["phase"] == "Succeeded", logs
    checkpoints = runner.run_dir / "checkpoints"
    lines = [json.loads(line) for line in (checkpoints / "metrics" / "actor-0.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in lines if r.get("reward_mean") is not None}  # training steps (0: the first eval)
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))

    links = status["progress"]["trackers"]
    # W&B offline: the link is the run's folder (upload with `wandb sync`); its run file has every step.
    wandb_dir = Path(urlparse(links["wandb"]).path)
    assert wandb_dir.parent == (checkpoints / "trackers" / "wandb").resolve() and wandb_dir.name.startswith("offline-run-")
    (run_file,) = wandb_dir.glob("run-*.wandb")
    history = wandb_history(run_file)
    for step, row in steps.items():
        assert history[step]["train/reward_mean"] == pytest.approx(row["reward_mean"]), (step, history.get(step))
        assert history[step]["train/loss"] == pytest.approx(row["loss"])
    assert "eval/reward_mean" in history[0]  # the eval before the first step, at step 0
    assert any("samples/_type" in history[s] for s in history), "no samples table logged"
    assert list(wandb_dir.glob("files/media/table/samples_*.table.json"))

    # MLflow: the default store is mlruns/ on the checkpoint volume; the link is the run's folder.
    run_dir = Path(urlparse(links["mlflow"]).path)
    assert run_dir.parent.parent == (checkpoints / "mlruns").resolve()
    assert mlflow_metric(run_dir, "train/reward_mean") == pytest.approx({s: r["reward_mean"] for s, r in steps.items()})
    assert (run_dir / "params" / "hyperparameters.max_steps").read_text() == str(MAX_STEPS)
    assert "| prompt | response |" in (run_dir / "artifacts" / "samples" / "step-000001.md").read_text()
    assert yaml.safe_load((run_dir / "meta.yaml").read_text())["status"] == 3  # RunStatus.FINISHED

    # Only actor rank 0 opens runs: one W&B run folder, and the reference pod never logs a tracker run.
    assert len(list((checkpoints / "trackers" / "wandb").glob("*run-*"))) == 1
    pod_logs = {p.parent.name: p.read_text() for p in runner.run_dir.glob("pods/*/log.txt")}
    assert "tracker runs" in pod_logs["grpo-tiny-actor-0"]
    assert "tracker runs" not in pod_logs["grpo-tiny-reference-0"]
