"""Repository-wide pytest hooks: only the shared cluster fixtures of tests/controlplane/fixtures.py
(lazy: a unit-test session starts nothing). Tier fixtures live in tests/integration and e2e."""

import pytest

pytest_plugins = ["tests.controlplane.fixtures"]

# The fixtures that stand for the session's one control plane (the e2e tier's `cluster` asks for it
# inside its body, so its tests do not list `control_plane` itself).
CLUSTER_FIXTURES = {"control_plane", "cluster"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (scripts/test.sh runs two workers, --dist loadgroup) every test of a cluster
    goes to one worker: the session then starts one control plane, not one per worker."""
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("control-plane"))
