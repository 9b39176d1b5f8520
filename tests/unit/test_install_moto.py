"""scripts/install_moto.sh: the tests' S3 server environment (moto) outside .venv, found without installing."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "install_moto.sh"


def test_check_names_the_missing_environment_and_installs_nothing(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--check"], env={"PATH": "/usr/bin:/bin", "MOTO_CACHE": str(tmp_path)},
                          capture_output=True, text=True)
    assert done.returncode == 1 and not done.stdout
    version = re.search(r"^MOTO_VERSION=(\S+)", SCRIPT.read_text(), re.M).group(1)
    assert re.fullmatch(rf"no moto server environment at {tmp_path}/{re.escape(version)}-[0-9a-f]{{12}}\n", done.stderr)
    assert list(tmp_path.iterdir()) == []


def test_install_sh_creates_it_and_moto_stays_out_of_the_project_pins():
    assert "bash scripts/install_moto.sh" in (REPO / "scripts" / "install.sh").read_text()
    pinned = {line.split("==")[0].lower() for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    assert not pinned & {"moto", "boto3", "botocore"}  # their python-dateutil<3 conflicts with kubernetes'
