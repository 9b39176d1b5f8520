"""Pure helpers of the local runner: progress from metrics lines, bars, manifest loading, volumes."""

import io
import json
from pathlib import Path

import pytest
import yaml
from rlhf_operator import api, builders, local

REPO = Path(__file__).resolve().parents[2]


def test_progress_from_row_maps_names_and_drops_nan_and_missing():
    row = {"step": 3, "reward_mean": 0.5, "kl": float("nan"), "last_checkpoint_step": 2, "loss": 1.0}
    assert local.progress_from_row(row) == {"step": 3, "rewardMean": 0.5, "lastCheckpointStep": 2}
    assert local.progress_from_row(None) == {}


def test_last_json_line_skips_a_torn_tail(tmp_path):
    path = tmp_path / "m.jsonl"
    assert local.last_json_line(path) is None
    path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + '\n{"step": 3, "kl"')
    assert local.last_json_line(path) == {"step": 2}


def test_progress_line():
    row = {"step": 5, "reward_mean": 0.25, "kl": 0.0123}
    assert local.format_progress_line("actor-0", row, 10) == "actor-0      step 5/10  reward 0.25  kl 0.0123"


def _job():
    return api.parse_job(yaml.safe_load((REPO / "crds" / "examples" / "ppo-tiny.yaml").read_text()))


def test_plain_progress_prints_only_rank0_step_changes():
    out = io.StringIO()
    job = _job()
    n = job.spec.hyperparameters.max_steps
    progress = local.Progress(out, bars=False)
    rows = {"actor-0": {"step": 1}, "critic-0": {"step": 1}, "actor-1": {"step": 1}}
    progress.update(job, rows)
    progress.update(job, rows)
    progress.update(job, {**rows, "actor-0": {"step": 2}})
    assert out.getvalue().splitlines() == [
        f"actor-0      step 1/{n}", f"critic-0     step 1/{n}", f"actor-0      step 2/{n}"]


def test_bars_are_tqdm_bars_per_series_with_a_status_line():
    out = io.StringIO()
    job = _job()
    n = job.spec.hyperparameters.max_steps
    progress = local.Progress(out, bars=True)
    progress.update(job, {"actor-0": {"step": 1}, "critic-0": {"step": 1}})
    progress.update(job, {"actor-0": {"step": 2, "reward_mean": 0.5}, "critic-0": {"step": 2}})
    progress.line("Normal Running: all pods running")
    assert [type(b).__name__ for b in progress._bars.values()] == ["tqdm", "tqdm"]
    assert progress._bars["actor-0"].n == 2 and progress._bars["actor-0"].total == n
    text = out.getvalue()
    assert f"2/{n}" in text and "reward 0.5" in text and "ppo-tiny: -, restarts 0" in text
    assert "Normal Running: all pods running" in text
    progress.close()
    assert progress._bars == {}


@pytest.mark.parametrize(("text", "match"), [
    ("apiVersion: rlhf.dev/v1alpha1\nkind: Pod\n", "at least one RLHFJob"),
    ("apiVersion: v1\nkind: RLHFJob\n", "apiVersion must be rlhf.dev/v1alpha1"),
    ("a: [", "not YAML"),
])
def test_load_manifest_errors(tmp_path, text, match):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(local.LocalRunError, match=match):
        local.load_manifests(path)


def test_every_built_pod_volume_maps_to_a_local_folder(tmp_path):
    job = api.parse_job(yaml.safe_load((REPO / "crds" / "examples" / "ppo-tiny.yaml").read_text()))
    pods = builders.build_gang(job, 0, builders.BuildSettings())
    for pod in pods:
        pod_dir = tmp_path / "pods" / pod["metadata"]["name"]
        mounts = local.pod_mounts(pod, lambda path, vol, pod_dir=pod_dir: local.volume_dir(tmp_path, pod_dir, path, vol))
        assert mounts["/checkpoints"] == tmp_path / "checkpoints"
        assert mounts["/etc/rlhf"] == tmp_path / "config"
        assert all(str(p).startswith(str(tmp_path)) for p in mounts.values())


def test_relative_model_and_dataset_paths_are_read_next_to_the_manifest(tmp_path):
    obj = {"kind": "RLHFJob", "spec": {
        "model": {"path": "models/policy"}, "rewardModel": {"path": "/abs/rm"},
        "dataset": {"path": "pairs.jsonl", "evalPath": "synthetic://preferences", "format": "pairs"}}}
    spec = local.resolve_local_paths(obj, tmp_path / "jobs")["spec"]
    assert spec["model"] == {"path": str(tmp_path / "jobs" / "models" / "policy")}
    assert spec["rewardModel"] == {"path": "/abs/rm"}
    assert spec["dataset"] == {"path": str(tmp_path / "jobs" / "pairs.jsonl"), "evalPath": "synthetic://preferences",
                               "format": "pairs"}
    assert obj["spec"]["dataset"]["path"] == "pairs.jsonl"  # the caller's manifest is left as it was
    tiny = {"spec": {"model": {"path": "tiny://llama"}}}
    assert local.resolve_local_paths(tiny, tmp_path) == tiny


def test_a_job_asking_for_more_gpus_than_the_machine_shows_is_named_with_its_roles():
    # ppo.yaml: actor 2 x 8, critic 1 x 8, reward 1 x 2 GPUs; the reference is colocated (no pods)
    job = api.parse_job(yaml.safe_load((REPO / "crds" / "examples" / "ppo.yaml").read_text()))
    (problem,) = local.gpu_shortages([job], visible=8)
    assert "ask for 26 GPUs (actor 2 x 8, critic 1 x 8, reward 1 x 2;" in problem and "shows 8" in problem
    assert local.gpu_shortages([job], visible=26) == []
    assert local.gpu_shortages([job], visible=0) == []  # no GPUs: the run is on CPUs
    assert local.gpu_shortages([_job()], visible=1) == []  # ppo-tiny asks for none


def test_a_job_asking_for_gpus_on_a_machine_without_any_is_told_it_runs_on_the_cpus():
    job = api.parse_job(yaml.safe_load((REPO / "crds" / "examples" / "ppo.yaml").read_text()))
    (note,) = local.cpu_fallback_notes([job], visible=0)
    assert note.startswith(f"{job.name}: its roles ask for GPUs (actor 8, critic 8, reward 2; roles[].gpus)")
    assert "running every rank on the CPUs" in note
    assert local.cpu_fallback_notes([job], visible=8) == []  # GPUs there: gpu_shortages' business
    assert local.cpu_fallback_notes([_job()], visible=0) == []  # ppo-tiny asks for none
