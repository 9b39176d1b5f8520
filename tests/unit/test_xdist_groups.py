"""The repository conftest's xdist grouping really sends every test of a cluster to one worker.

pytest-xdist 3.8 marks a group by rewriting `item._nodeid`, which pytest 9 no longer reads; the suite
then silently spread its cluster tests over both workers (two control planes, and a module's ordered
tests on two clusters: CI failures). This runs a small session of that hook in a fresh pytest with two
workers and reads where each test ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CONFTEST = f"""
import importlib.util, os
import pytest

spec = importlib.util.spec_from_file_location("repo_conftest", {str(REPO / "conftest.py")!r})
repo_conftest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(repo_conftest)
pytest_collection_modifyitems = repo_conftest.pytest_collection_modifyitems


@pytest.fixture
def cluster():
    return "one cluster"


@pytest.fixture(autouse=True)
def where(request):
    with open(os.environ["WHERE"], "a") as f:
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "none") + " " + request.node.name + "\\n")
"""

TESTS = """
import time
import pytest


@pytest.mark.parametrize("i", range(6))
def test_with_the_cluster(cluster, i):
    time.sleep(0.05)


@pytest.mark.parametrize("i", range(6))
def test_without(i):
    time.sleep(0.05)
"""


def test_every_cluster_test_runs_on_one_worker_and_the_rest_spread(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_grouped.py").write_text(TESTS)
    where = tmp_path / "where.txt"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                          "--dist", "loadgroup", "--rootdir", str(tmp_path), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "WHERE": str(where)})
    assert run.returncode == 0, run.stdout + run.stderr
    ran = [line.split() for line in where.read_text().splitlines()]
    grouped = {worker for worker, name in ran if name.startswith("test_with_the_cluster")}
    assert len([1 for _, name in ran if name.startswith("test_with_the_cluster")]) == 6
    assert len(grouped) == 1, ran  # one worker: one control plane, module order kept
    assert {worker for worker, _ in ran} == {"gw0", "gw1"}, ran  # the other tests still use both workers
