"""kopf registration (kube/handlers.py): what the operator's kopf settings rely on."""

import kopf
import pytest
from rlhf_operator import api
from rlhf_operator.kube import handlers, observe


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


def _job_body(generation: int, phase: str = "", uid: str = "u1", **spec) -> dict:
    return {"metadata": {"name": "j", "namespace": "ns", "generation": generation, "uid": uid},
            "spec": spec, "status": {"phase": phase} if phase else {}}


def test_a_spec_is_parsed_once_per_generation_of_a_job(monkeypatch):
    parsed = []
    monkeypatch.setattr(observe.api, "parse_spec", lambda spec: parsed.append(spec) or len(parsed))
    specs = observe.SpecCache()
    # status writes keep the generation; a spec edit bumps it; a job deleted and created again under
    # the same name has a new uid and starts at generation 1 again
    for generation, uid in ((1, "u1"), (1, "u1"), (1, "u1"), (2, "u1"), (2, "u1"), (1, "u2")):
        specs.spec_of(_job_body(generation, uid=uid, algorithm="sft"))
    assert len(parsed) == 3
    assert specs.spec_of(_job_body(1, uid="u2")) == 3  # the cached parse is returned
    observe.SpecCache().spec_of(_job_body(1, uid="u2"))  # a job forgotten and seen again starts over
    assert len(parsed) == 4


def test_a_bad_spec_is_a_permanent_error_on_every_event_until_failed():
    specs = observe.SpecCache()
    for _ in range(2):
        with pytest.raises(kopf.PermanentError, match="algorithm"):
            handlers.check_spec(specs, _job_body(1, algorithm="nope"))
    handlers.check_spec(specs, _job_body(1, "Failed", algorithm="nope"))  # the pass reported it
    with pytest.raises(api.SpecError):  # a bad spec is never cached as good
        specs.spec_of(_job_body(1, algorithm="nope"))
