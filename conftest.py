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
    goes to one worker, in collection order: the session then starts one control plane, not one per
    worker, and a module's tests that build on each other (install, then uninstall) meet one cluster."""
    grouping = getattr(config.option, "loadgroup", False)  # set on xdist's workers under --dist loadgroup
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("control-plane"))
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if grouping and groups:
            add_group_suffix(item, "_".join(groups))


def add_group_suffix(item, group: str) -> None:
    """What pytest-xdist's loadgroup does to a grouped test's node id (`<id>@<group>`, the scheduler's
    unit of work), done where this pytest keeps the id. xdist 3.8 writes `item._nodeid`, which pytest 9
    no longer reads (`Node.nodeid` is `str(item._id)`), so without this every group was silently
    spread over the workers: two control planes, and a module's tests split across them."""
    if hasattr(item, "_id"):  # pytest >= 9
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(f"{item.nodeid}@{group}")
    else:
        item._nodeid = f"{item.nodeid}@{group}"
