"""A remote source through the local runner, with the fake trainer (seconds): each pod runs its source
initializer first (rlhf_operator.localexec), the model is fetched once from a local S3-compatible server
(moto's, tests/conftest.py), the trainer config names the fetched folder, and gang restarts fetch nothing again."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from rlhf_operator import local, localexec

FAKE = [sys.executable, str(Path(__file__).with_name("local_fake_trainer.py"))]


@pytest.fixture
def s3_endpoint(s3):
    """moto's server (tests/conftest.py) with the model tiny/m in bucket `models`."""
    s3.client.make_bucket("models")
    s3.client.put_object("models", "tiny/m/config.json", io.BytesIO(b"{}"), 2)
    return s3.url


def manifest(endpoint: str) -> dict:
    return {"apiVersion": "rlhf.dev/v1alpha1", "kind": "RLHFJob", "metadata": {"name": "s3-sft"},
            "spec": {"algorithm": "sft", "image": "trainer:1", "model": {"path": "s3://models/tiny/m"},
                     "dataset": {"path": "synthetic://instructions", "format": "instruction"},
                     "sources": {"s3": {"endpoint": endpoint, "region": "us-east-1"}},
                     "roles": [{"name": "actor", "replicas": 2}],
                     "hyperparameters": {"maxSteps": 2, "batchSize": 2, "microBatchSize": 1},
                     "failurePolicy": {"maxRestarts": 1, "backoffSeconds": 1}}}


def test_the_model_is_fetched_once_and_gang_restarts_find_it(tmp_path, s3_endpoint):
    # Secrets are the runner's env locally (secretKeyRef env passes through); the first attempt's
    # trainers fail (exit 1) so the gang restarts once, then the job fails: two attempts in all.
    runner = local.LocalRunner(manifest(s3_endpoint), tmp_path, trainer_command=FAKE, serve_metrics=False,
                               stop_grace=2, supervisor=localexec.Supervisor(),
                               extra_env={"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                                          "FAKE_EXIT_CODE": "1", "FAKE_EXIT_MESSAGE": "boom"})
    statuses = local.LocalRun([runner]).run(timeout=120)
    assert statuses["s3-sft"]["phase"] == "Failed"
    assert statuses["s3-sft"].get("restarts") == 1
    cache = runner.checkpoint_dir / "sources"
    assert [p.name for p in cache.glob("*.complete")] and list(cache.glob("*/m/config.json"))
    first = (runner.pod_dir("s3-sft-actor-0") / "log.txt").read_text()
    assert first.count("s3://models/tiny/m: fetched") == 1
    assert first.count("s3://models/tiny/m: already fetched") == 1


def test_the_trainer_reads_the_fetched_model_and_the_job_succeeds(tmp_path, s3_endpoint):
    # The fake trainer exits 78 unless the config's model path is a folder with a config.json.
    runner = local.LocalRunner(manifest(s3_endpoint), tmp_path, trainer_command=FAKE, serve_metrics=False,
                               stop_grace=2, supervisor=localexec.Supervisor(),
                               extra_env={"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                                          "FAKE_STEP_SECONDS": "0.05"})
    statuses = local.LocalRun([runner]).run(timeout=120)
    assert statuses["s3-sft"]["phase"] == "Succeeded", statuses["s3-sft"]
    waiter = (runner.pod_dir("s3-sft-actor-1") / "log.txt").read_text()
    assert "fetched" not in waiter  # the second pod waited for the first pod's fetch


def test_a_missing_prefix_fails_the_job_with_the_initializers_message(tmp_path, s3_endpoint):
    doc = manifest(s3_endpoint)
    doc["spec"]["model"]["path"] = "s3://models/absent"
    runner = local.LocalRunner(doc, tmp_path, trainer_command=FAKE, serve_metrics=False, stop_grace=2,
                               supervisor=localexec.Supervisor(),
                               extra_env={"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"})
    statuses = local.LocalRun([runner]).run(timeout=120)
    assert statuses["s3-sft"]["phase"] == "Failed"
    assert not statuses["s3-sft"].get("restarts")  # exit 78 is permanent: no gang restart
    failed = next(c for c in statuses["s3-sft"]["conditions"] if c["type"] == "Failed")
    assert "s3://models/absent: no object under this prefix" in failed["message"]
