"""rlhf_trainer.trackers: which values become which TensorBoard scalars, the samples table, and real
event files read back (TFRecord framing + tensorboardX's Event proto)."""

import struct

import pytest
from rlhf_trainer.samples import Sample
from rlhf_trainer.trackers import TensorBoardTracker, samples_markdown, scalar_tag, scalars


@pytest.mark.parametrize(("name", "tag"), [
    ("reward_mean", "train/reward_mean"), ("eval_loss", "eval/loss"), ("generate_seconds", "time/generate_seconds"),
    ("train_peak_memory_bytes", "time/train_peak_memory_bytes"),
])
def test_scalar_tag(name, tag):
    assert scalar_tag(name) == tag


def test_scalars_keep_finite_numbers_only():
    row = {"step": 3, "time": 1e9, "kl": 0.5, "loss": None, "reward_mean": float("nan"), "alarms": {"A": "b"},
           "eval_exact_match": 1, "flag": True}
    assert scalars(row) == {"train/kl": 0.5, "eval/exact_match": 1.0}


def test_samples_markdown_escapes_pipes_and_newlines():
    text = samples_markdown([Sample(2, "a|b", "x\ny", 1.0, None, 3, True)])
    assert text.splitlines()[-1] == "| a\\|b | x\\ny | 1 |  | 3 | True |"


def read_events(folder):
    """Every Event of the event files under `folder` (TFRecord: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            events.append(event)
            pos += 12 + length + 4
    return events


def test_event_files_hold_the_steps_scalars_and_the_samples(tmp_path):
    tracker = TensorBoardTracker(tmp_path / "tensorboard" / "actor-0")
    for step in (1, 2):
        tracker.log_step(step, {"step": step, "reward_mean": step / 10, "eval_loss": 1.0 / step})
    tracker.log_samples(2, [Sample(2, "1+1=", "2", 1.0, 0.1, 2, False)])
    tracker.close()
    events = read_events(tmp_path / "tensorboard" / "actor-0")
    values = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}
    assert values[("train/reward_mean", 2)] == pytest.approx(0.2)
    assert values[("eval/loss", 1)] == pytest.approx(1.0)
    texts = [v for e in events for v in e.summary.value if v.tag.startswith("samples")]
    assert texts and b"1+1=" in texts[0].tensor.string_val[0]


def test_nothing_is_written_before_the_first_step(tmp_path):
    TensorBoardTracker(tmp_path / "tb").close()
    assert not (tmp_path / "tb").exists()


# ---- W&B and MLflow: the pure decisions, and a missing library ---------------------------------------

import sys  # noqa: E402

from rlhf_contract.config import (  # noqa: E402
    ConfigError,
    MlflowConfig,
    TrackersConfig,
    WandbConfig,
    parse_config,
)
from rlhf_trainer import trackers  # noqa: E402

ON = TrackersConfig(wandb=WandbConfig(enabled=True), mlflow=MlflowConfig(enabled=True))


@pytest.mark.parametrize(("role", "rank", "config", "expected"), [
    ("actor", 0, ON, ("wandb", "mlflow")),
    ("actor", 1, ON, ()),                        # one run per job: the other actor ranks log nothing there
    ("critic", 0, ON, ()),
    ("actor", 0, TrackersConfig(), ()),          # off by default
    ("actor", 0, TrackersConfig(mlflow=MlflowConfig(enabled=True)), ("mlflow",)),
])
def test_remote_trackers_enabled(role, rank, config, expected):
    assert trackers.remote_trackers_enabled(config, role, rank) == expected


def test_wandb_init_kwargs_name_the_run_after_the_job_and_resume_it(tmp_path):
    kwargs = trackers.wandb_init_kwargs(WandbConfig(enabled=True, mode="offline"), "grpo-tiny", "team-a", "id1",
                                        tmp_path, {"algorithm": "grpo"})
    assert kwargs["project"] == "team-a" and kwargs["entity"] is None and kwargs["name"] == "grpo-tiny"
    assert (kwargs["id"], kwargs["resume"], kwargs["mode"]) == ("id1", "allow", "offline")
    assert kwargs["config"] == {"algorithm": "grpo"} and kwargs["dir"] == str(tmp_path)


def test_stable_run_id_is_made_once_and_read_back(tmp_path):
    first = trackers.stable_run_id(tmp_path / "trackers" / "wandb-run-id", new=lambda: "abc")
    assert first == "abc"
    assert trackers.stable_run_id(tmp_path / "trackers" / "wandb-run-id", new=lambda: "other") == "abc"


def test_mlflow_uri_defaults_to_a_file_store_on_the_checkpoint_volume(tmp_path):
    assert trackers.mlflow_tracking_uri(MlflowConfig(), tmp_path) == (tmp_path / "mlruns").resolve().as_uri()
    assert trackers.mlflow_tracking_uri(MlflowConfig(tracking_uri="http://ml:5000"), tmp_path) == "http://ml:5000"


@pytest.mark.parametrize(("uri", "link"), [
    ("http://ml:5000/", "http://ml:5000/#/experiments/7/runs/r1"),
    ("file:///ck/mlruns", "file:///ck/mlruns/7/r1"),
])
def test_mlflow_run_link(uri, link):
    assert trackers.mlflow_run_link(uri, "7", "r1", "file:///ck/mlruns/7/r1/artifacts") == link


def test_flat_params():
    assert trackers.flat_params({"algorithm": "grpo", "hyperparameters": {"beta": 0.1, "seed": 0}}) == {
        "algorithm": "grpo", "hyperparameters.beta": "0.1", "hyperparameters.seed": "0"}


@pytest.mark.parametrize(("module", "field"), [("wandb", "trackers.wandb.enabled"),
                                                ("mlflow", "trackers.mlflow.enabled")])
def test_an_enabled_tracker_without_its_library_is_a_config_error_naming_the_field(monkeypatch, tmp_path,
                                                                                     module, field):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    cfg = sft_config(**{module: {"enabled": True}})
    with pytest.raises(ConfigError, match=rf"^{field}: is true but the trainer image lacks the {module} package"):
        trackers.build_trackers(cfg, tmp_path, "actor", 0)
    assert trackers.build_trackers(cfg, tmp_path, "actor", 1).links() == {}  # other ranks never import it


def sft_config(**trackers_cfg):
    return parse_config({"job": "j", "algorithm": "sft", "model": {"path": "tiny://llama"},
                         "dataset": {"path": "synthetic://instructions"}, "roles": {"actor": {}},
                         "hyperparameters": {"max_steps": 7}, "trackers": trackers_cfg})


def test_mlflow_run_is_resumed_after_a_gang_restart_and_marked_by_how_the_process_ended(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = sft_config(mlflow={"enabled": True})
    first = trackers.build_trackers(cfg, tmp_path, "actor", 0)
    first.log_step(1, {"step": 1, "loss": 2.0})
    first.close(failed=True)  # the gang fails: the run is FAILED until a new attempt resumes it
    (mlflow_tracker,) = [t for t in first.trackers if isinstance(t, trackers.MlflowTracker)]
    assert mlflow_tracker.client.get_run(mlflow_tracker.run_id).info.status == "FAILED"
    second = trackers.build_trackers(cfg, tmp_path, "actor", 0)
    assert second.links() == first.links()  # the same run: its id is kept on the volume
    (resumed,) = [t for t in second.trackers if isinstance(t, trackers.MlflowTracker)]
    assert resumed.client.get_run(resumed.run_id).info.status == "RUNNING"
    second.log_step(2, {"step": 2, "loss": 1.0})
    second.close()
    run = resumed.client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED" and run.data.params["hyperparameters.max_steps"] == "7"
    assert [(m.step, m.value) for m in resumed.client.get_metric_history(resumed.run_id, "train/loss")] == [
        (1, 2.0), (2, 1.0)]
