"""kopf registration (kube/handlers.py): what the operator's kopf settings rely on."""

import kopf
from rlhf_operator.kube import handlers


def test_no_registered_handler_needs_kopfs_diffbase():
    # NoDiffBase skips kopf's "last handled state": only safe while nothing reacts to changes
    # through it (on.create/update/delete/resume/field handlers, daemons, timers).
    registry = kopf.get_default_registry()
    assert list(registry._indexing.get_all_handlers()) and list(registry._watching.get_all_handlers())
    assert not list(registry._changing.get_all_handlers())
    assert not list(registry._spawning.get_all_handlers())


def test_no_diffbase_builds_and_stores_nothing():
    storage = handlers.NoDiffBase()
    body = kopf.Body({"metadata": {"name": "a", "annotations": {"kopf.zalando.org/last-handled-configuration": "{}"}},
                      "spec": {"x": 1}})
    patch = kopf.Patch()
    assert storage.build(body=body) is None and storage.fetch(body=body) is None
    storage.store(body=body, patch=patch, essence={"spec": {"x": 2}})
    assert not patch
