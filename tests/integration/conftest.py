"""Integration fixtures: one API emulator per session (CRDs installed with the real kubectl), one
`rlhf-operator operator` subprocess per test module. Cluster fixtures live here only, never in
tests/conftest.py or tests/unit.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.kube_emulator` is imported from the repository root
    sys.path.insert(0, str(REPO))

# The kubernetes client reads $KUBECONFIG when first imported; point it at the emulator's file
# (written by the session fixture) before anything imports it.
_KUBE_DIR = Path(tempfile.mkdtemp(prefix="rlhf-integration-"))
os.environ.setdefault("KUBECONFIG", str(_KUBE_DIR / "kubeconfig"))

from tests.kube_emulator import harness  # noqa: E402

RLHFJOB_CRD = REPO / "crds" / "rlhfjobs.yaml"


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """The API emulator with the RLHFJob CRD and both PodGroup CRDs installed."""
    emu = harness.start_emulator(tmp_path_factory.mktemp("emulator"))
    try:
        harness.install_crds(emu, [harness.VOLCANO_CRD, harness.COSCHEDULING_CRD, RLHFJOB_CRD])
        yield emu
    finally:
        harness.stop_emulator(emu)


@pytest.fixture(scope="module")
def operator(emulator, tmp_path_factory, request):
    """`rlhf-operator operator` for the whole module; its log is printed when the module fails."""
    extra = getattr(request.module, "OPERATOR_ARGS", ())
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = harness.start_operator(emulator, log, *extra)
    failed_before = request.session.testsfailed
    yield op
    op.stop()
    if request.session.testsfailed > failed_before:
        print(f"\n--- operator log tail ({log}) ---\n{op.log_tail(6000)}")
