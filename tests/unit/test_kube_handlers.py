"""kopf registration (kube/handlers.py): what the operator's kopf settings rely on."""

import kopf
import pytest
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


def _job_body(generation: int, phase: str = "", **spec):
    return kopf.Body({"metadata": {"name": "j", "namespace": "ns", "generation": generation},
                      "spec": spec, "status": {"phase": phase} if phase else {}})


def test_a_spec_is_checked_once_per_generation(monkeypatch):
    parsed = []
    monkeypatch.setattr(handlers.api, "parse_spec", parsed.append)
    seen: dict = {}
    for generation in (1, 1, 1, 2, 2):  # status writes keep the generation; a spec edit bumps it
        handlers.check_spec_once(seen, ("ns", "j"), _job_body(generation, algorithm="sft"))
    assert len(parsed) == 2 and seen == {("ns", "j"): 2}


def test_a_bad_spec_is_a_permanent_error_on_every_event_until_failed():
    seen: dict = {}
    for _ in range(2):
        with pytest.raises(kopf.PermanentError, match="algorithm"):
            handlers.check_spec_once(seen, ("ns", "j"), _job_body(1, algorithm="nope"))
    assert seen == {}
    handlers.check_spec_once(seen, ("ns", "j"), _job_body(1, "Failed", algorithm="nope"))  # the pass reported it
