"""Experiment trackers: TensorBoard event files on the checkpoint volume, next to metrics/ and samples/,
and, when spec.trackers enables them, a Weights & Biases and an MLflow run (docs/observability.md).

    $RLHF_CHECKPOINT_DIR/tensorboard/<role>-<rank>/events.out.tfevents.*     every trainer process
    tensorboard --logdir <checkpoint volume>/tensorboard
    $RLHF_CHECKPOINT_DIR/trackers/wandb/{offline-,}run-*/                     W&B, actor rank 0 only
    $RLHF_CHECKPOINT_DIR/mlruns/<experiment id>/<run id>/                     MLflow's default file store

W&B and MLflow see what TensorBoard sees (the same tags), as TRL's `report_to` gives each of them,
but only actor rank 0 logs there: one run per job, as TRL / OpenRLHF / verl log from the main
process. Their run ids are kept under trackers/ so a gang restart resumes the same runs. The run's
link (a URL, or for an offline W&B run or a file store its folder) goes to status.progress.trackers
through the `rlhf_trainer_trackers_info` series (TrainerMetrics.set_tracker_links). Both libraries
are optional (the `trackers` extra); enabling one without it is a ConfigError naming the field.

Every numeric value of a step's metrics line becomes a scalar (`train/<name>`, held-out metrics
`eval/<name without eval_>`, phase timings `time/<name>`) at that step, and each batch of samples a
text table (`samples`), as TRL's `report_to="tensorboard"` logs them. The writer is tensorboardX
(maintained, writes the same event files as TensorFlow's without TensorFlow or the tensorboard
server package); it is created on the first step, so processes that record none (the serving
roles) leave no empty folder.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_contract import wire
from rlhf_contract.config import ConfigError, MlflowConfig, TrackersConfig, TrainerConfig, WandbConfig

# Keys of a metrics line that are not curves.
NOT_SCALARS = ("step", "time")


def scalar_tag(name: str) -> str:
    """`eval_loss` -> `eval/loss`, `generate_seconds` -> `time/generate_seconds`, `kl` -> `train/kl`."""
    if name.startswith("eval_"):
        return "eval/" + name.removeprefix("eval_")
    if name.endswith("_seconds") or name.endswith("_peak_memory_bytes"):
        return "time/" + name
    return "train/" + name


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics line by tag (None, NaN, text and dicts are left out)."""
    out = {}
    for name, value in row.items():
        if name in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[scalar_tag(name)] = float(value)
    return out


def samples_markdown(samples: Sequence[Any]) -> str:
    """A markdown table of rollouts (rlhf_trainer.samples.Sample) for TensorBoard's text panel."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "\\n")

    lines = ["| prompt | response | reward | kl | length | truncated |", "|---|---|---|---|---|---|"]
    for s in samples:
        kl = "" if s.kl is None else f"{s.kl:.4g}"
        lines.append(f"| {cell(s.prompt)} | {cell(s.response)} | {s.reward:.4g} | {kl} | {s.length} | {s.truncated} |")
    return "\n".join(lines)


class TensorBoardTracker:
    """Scalars and sample tables of one trainer process under `logdir`."""

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self._writer = None

    def _open(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self.logdir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(logdir=str(self.logdir), flush_secs=10)
        return self._writer

    def log_step(self, step: int, row: Mapping[str, Any]) -> None:
        writer = self._open()
        for tag, value in scalars(row).items():
            writer.add_scalar(tag, value, global_step=step)

    def log_samples(self, step: int, samples: Sequence[Any]) -> None:
        self._open().add_text("samples", samples_markdown(samples), global_step=step)

    def close(self, failed: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def tensorboard_dir_for(checkpoint_dir: str | Path, role: str, rank: int) -> Path:
    return Path(checkpoint_dir) / "tensorboard" / f"{role}-{rank}"


# ---- Weights & Biases and MLflow (actor rank 0) ---------------------------------------------------

SAMPLE_COLUMNS = ("step", "prompt", "response", "reward", "kl", "length", "truncated")


def require(module: str, field_path: str) -> Any:
    """Import an optional tracker library; ConfigError naming the spec field that asked for it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{field_path}: is true but the trainer image lacks the {module} package ({err}); "
                          "install the trackers extra (pip install 'rlhf-operator[trackers]') or set it false") from None


def stable_run_id(path: Path, new: Callable[[], str] = lambda: uuid.uuid4().hex[:16]) -> str:
    """The run id kept in `path` (made on the first start), so a gang restart resumes the same run."""
    if path.exists():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = new()
    path.write_text(run_id + "\n")
    return run_id


def wandb_init_kwargs(cfg: WandbConfig, job: str, namespace: str, run_id: str, folder: Path,
                      config: Mapping[str, Any]) -> dict[str, Any]:
    """wandb.init()'s arguments: one run per job, named after it, resumed by id after a gang restart."""
    return {"project": cfg.project or namespace, "entity": cfg.entity or None, "group": cfg.group or None,
            "name": job, "id": run_id, "resume": "allow", "mode": cfg.mode, "dir": str(folder),
            "config": dict(config), "job_type": "train"}


def mlflow_tracking_uri(cfg: MlflowConfig, checkpoint_dir: str | Path) -> str:
    """trackingUri, or a file store in mlruns/ on the checkpoint volume when it is unset."""
    return cfg.tracking_uri or (Path(checkpoint_dir) / wire.MLRUNS_DIR).resolve().as_uri()


def mlflow_run_link(tracking_uri: str, experiment_id: str, run_id: str, artifact_uri: str) -> str:
    """The MLflow UI's page of the run for a server, else (a file store) the run's folder."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return artifact_uri.removesuffix("/artifacts")


def flat_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings -> {"hyperparameters.clip_range": "0.2", ...} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]  # MLflow's limit on a param value is 6000 characters
    return out


def sample_rows(samples: Sequence[Any]) -> list[list[Any]]:
    """Rollouts (rlhf_trainer.samples.Sample) as rows of SAMPLE_COLUMNS."""
    return [[s.step, s.prompt, s.response, s.reward, s.kl, s.length, s.truncated] for s in samples]


class WandbTracker:
    """One W&B run per job (actor rank 0): scalars by TensorBoard's tags, samples as a wandb.Table."""

    def __init__(self, cfg: TrainerConfig, checkpoint_dir: str | Path):
        self._wandb = require("wandb", "trackers.wandb.enabled")
        folder = Path(checkpoint_dir) / wire.TRACKERS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        run_id = stable_run_id(folder / "wandb-run-id")
        kwargs = wandb_init_kwargs(cfg.trackers.wandb, cfg.job, cfg.namespace, run_id, folder, cfg.to_dict())
        # console off: the trainer's log stays on stderr as it is; silent: no banner with the run's URL twice.
        self.run = self._wandb.init(**kwargs, settings=self._wandb.Settings(silent=True, console="off"))
        self.link = self.run.url or Path(self.run.dir).parent.resolve().as_uri()

    def log_step(self, step: int, row: Mapping[str, Any]) -> None:
        self.run.log(scalars(row), step=step)

    def log_samples(self, step: int, samples: Sequence[Any]) -> None:
        table = self._wandb.Table(columns=list(SAMPLE_COLUMNS), data=sample_rows(samples))
        self.run.log({"samples": table}, step=step)

    def close(self, failed: bool = False) -> None:
        """Finish the run; a failed or stopped process marks it failed (a gang restart resumes it)."""
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    """One MLflow run per job (actor rank 0): metrics by TensorBoard's tags, the settings as params,
    samples as markdown artifacts samples/step-<N>.md. Talks to the store through MlflowClient (no
    global active run), so nothing else in the process is affected."""

    def __init__(self, cfg: TrainerConfig, checkpoint_dir: str | Path):
        require("mlflow", "trackers.mlflow.enabled")
        from mlflow.entities import Metric, Param, RunStatus
        from mlflow.tracking import MlflowClient

        self._metric, self._status = Metric, RunStatus
        uri = mlflow_tracking_uri(cfg.trackers.mlflow, checkpoint_dir)
        if uri.startswith("file:"):
            # MLflow 3 refuses a new file store unless asked: a file store is what a shared volume holds well.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = cfg.trackers.mlflow.experiment or cfg.job
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        id_file = Path(checkpoint_dir) / wire.TRACKERS_DIR / "mlflow-run-id"
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if run_id:
            run = self.client.get_run(run_id)
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=cfg.job, tags={"rlhf.dev/job": cfg.job,
                                                                                 "rlhf.dev/algorithm": cfg.algorithm})
            self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flat_params(
                {"algorithm": cfg.algorithm, "hyperparameters": cfg.to_dict()["hyperparameters"]}).items()])
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run.info.run_id + "\n")
        self.run_id = run.info.run_id
        self.link = mlflow_run_link(uri, experiment_id, self.run_id, run.info.artifact_uri)

    def log_step(self, step: int, row: Mapping[str, Any]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(tag, value, now, step) for tag, value in scalars(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_samples(self, step: int, samples: Sequence[Any]) -> None:
        self.client.log_text(self.run_id, samples_markdown(samples), f"samples/step-{step:06d}.md")

    def close(self, failed: bool = False) -> None:
        """FINISHED, or FAILED when the process ends on an error or a stop (a gang restart resumes the run)."""
        status = self._status.FAILED if failed else self._status.FINISHED
        self.client.set_terminated(self.run_id, self._status.to_string(status))


class Trackers:
    """Every tracker of one process behind one log_step / log_samples / close (TrainerMetrics.tracker)."""

    def __init__(self, trackers: Sequence[Any]):
        self.trackers = list(trackers)

    def links(self) -> dict[str, str]:
        """{"wandb": ..., "mlflow": ...} of the trackers that have a run (status.progress.trackers)."""
        names = {WandbTracker: "wandb", MlflowTracker: "mlflow"}
        return {names[type(t)]: t.link for t in self.trackers if type(t) in names and t.link}

    def log_step(self, step: int, row: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_step(step, row)

    def log_samples(self, step: int, samples: Sequence[Any]) -> None:
        for tracker in self.trackers:
            tracker.log_samples(step, samples)

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(failed=failed)


def remote_trackers_enabled(trackers: TrackersConfig, role: str, rank: int) -> tuple[str, ...]:
    """Which of wandb / mlflow this process logs to: the enabled ones, on actor rank 0 only. Pure."""
    if role != "actor" or rank != 0:
        return ()
    return tuple(name for name, on in (("wandb", trackers.wandb.enabled), ("mlflow", trackers.mlflow.enabled)) if on)


def build_trackers(cfg: TrainerConfig, checkpoint_dir: str | Path, role: str, rank: int) -> Trackers:
    """TensorBoard for every process, plus W&B / MLflow on actor rank 0 when enabled (ConfigError when
    an enabled tracker's library is missing)."""
    made: list[Any] = [TensorBoardTracker(tensorboard_dir_for(checkpoint_dir, role, rank))]
    kinds = {"wandb": WandbTracker, "mlflow": MlflowTracker}
    made += [kinds[name](cfg, checkpoint_dir) for name in remote_trackers_enabled(cfg.trackers, role, rank)]
    return Trackers(made)
