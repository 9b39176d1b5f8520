"""The API emulator's shortcuts (tests/kube_emulator/k8semu.py) answer exactly as kmock's full scans do.

kmock 0.8 routes each request by replaying the request history through every reaction's filters, and
finds objects by scanning all of them; k8semu answers both for the one request, over a per-resource index.
These tests compare the two answers on the same emulator, in process, and check list/get/watch over HTTP.
"""

from __future__ import annotations

import json

import kmock
import pytest
from kmock._internal import rendering

from tests.kube_emulator import k8semu

PODS = kmock.resource("", "v1", "pods")
SERVICES = kmock.resource("", "v1", "services")
NAMESPACES = kmock.resource("", "v1", "namespaces")


@pytest.fixture
async def emu():
    async with k8semu.RealisticEmulator() as emu, kmock.Server(emu):
        k8semu.register(emu)
        yield emu


def pod(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "x"}]}}


async def call(emu, method: str, path: str, body=None, content_type="application/json") -> tuple[int, dict]:
    data = json.dumps(body) if body is not None else None
    async with emu.request(method, path, data=data, headers={"Content-Type": content_type}) as response:
        return response.status, await response.json(content_type=None)


async def test_routing_matches_kmocks_history_replay(emu):
    await call(emu, "GET", "/api/v1")
    await call(emu, "GET", "/version")
    for ns, name in [("a", "p1"), ("a", "p2"), ("b", "p1")]:
        await call(emu, "POST", f"/api/v1/namespaces/{ns}/pods", pod(name, app=ns))
    await call(emu, "POST", "/api/v1/namespaces/a/pods", pod("p1"))  # 409
    await call(emu, "GET", "/api/v1/namespaces/a/pods/p1")
    await call(emu, "GET", "/api/v1/namespaces/a/pods/missing")
    await call(emu, "GET", "/api/v1/pods?labelSelector=app%3Db")
    await call(emu, "PATCH", "/api/v1/namespaces/a/pods/p2/status", {"status": {"phase": "Running"}},
               "application/merge-patch+json")
    await call(emu, "DELETE", "/api/v1/namespaces/b/pods/p1")
    await call(emu, "GET", "/apis/example.com/v1/namespaces/a/widgets")  # undeclared: 404
    sources = [payload._source for payload in emu._payloads]
    answers = [(request in source, k8semu._orig_contains(source, request))
               for request in emu._requests for source in sources]
    assert [fast for fast, _ in answers] == [slow for _, slow in answers]
    assert any(fast for fast, _ in answers) and not all(fast for fast, _ in answers)


def store(emu) -> None:
    emu.objects[PODS, "a", "p1"] = pod("p1")
    emu.objects[SERVICES, "a", "p1"] = {"metadata": {"name": "p1"}}
    emu.objects[PODS, "b", "p1"] = pod("p1")
    emu.objects[PODS, "a", "p2"] = pod("p2")
    emu.objects[PODS, "a", "gone"] = pod("gone")
    emu.objects[PODS, "a", "gone"].delete()  # soft-deleted: kept, marked deleted
    emu.objects[NAMESPACES, None, "a"] = {"metadata": {"name": "a"}}
    del emu.objects[PODS, "a", "p1"]  # hard-deleted and stored again: moves to the end
    emu.objects[PODS, "a", "p1"] = pod("p1")


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    ("resource", "namespace", "name"),
    [(PODS, "a", "p1"), (PODS, "a", None), (PODS, None, None), (PODS, None, "p1"), (PODS, "a", "gone"),
     (PODS, "c", "p1"), (SERVICES, "a", "p1"), (NAMESPACES, None, "a"), (NAMESPACES, None, None),
     (kmock.resource("apps", "v1", "deployments"), "a", None), (None, "a", "p1")],
)
def test_object_lookup_matches_kmocks_scan(resource, namespace, name, strict):
    emu = k8semu.RealisticEmulator()
    store(emu)
    request = rendering.Request(resource=resource, namespace=namespace, name=name)
    fast = emu._KubernetesEmulator__get_objs(request, strict)
    slow = kmock.KubernetesEmulator._KubernetesEmulator__get_objs(emu, request, strict)
    assert [id(o) for o in fast] == [id(o) for o in slow]


def test_known_resources_match_kmocks_scan():
    emu = k8semu.RealisticEmulator()
    store(emu)
    emu.objects["example.com/v1/widgets", "a", "w"] = {"metadata": {"name": "w"}}
    assert set(emu._get_resources()) == set(kmock.KubernetesEmulator._get_resources(emu))
    assert kmock.resource("example.com", "v1", "widgets") in emu._get_resources()


async def test_list_get_and_watch_see_their_namespace_in_creation_order(emu):
    for ns, name in [("a", "p1"), ("b", "p1"), ("a", "p2"), ("a", "p3")]:
        assert (await call(emu, "POST", f"/api/v1/namespaces/{ns}/pods", pod(name)))[0] == 200  # kmock: 200
    await call(emu, "POST", "/api/v1/namespaces/a/services", {"apiVersion": "v1", "kind": "Service",
                                                             "metadata": {"name": "p1"}})
    await call(emu, "DELETE", "/api/v1/namespaces/a/pods/p2")

    _, listed = await call(emu, "GET", "/api/v1/namespaces/a/pods")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["p1", "p3"]
    _, everywhere = await call(emu, "GET", "/api/v1/pods")
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in everywhere["items"]] == [
        ("a", "p1"), ("b", "p1"), ("a", "p3")]
    assert (await call(emu, "GET", "/api/v1/namespaces/b/pods/p3"))[0] == 404
    assert (await call(emu, "GET", "/api/v1/namespaces/a/pods/p2"))[0] == 404
    assert (await call(emu, "POST", "/api/v1/namespaces/a/pods", pod("p1")))[0] == 409
    assert (await call(emu, "POST", "/api/v1/namespaces/a/pods", pod("p2")))[0] == 200  # re-created

    async with emu.get("/api/v1/namespaces/a/pods?watch=true") as response:
        added = []
        while len(added) < 3:
            line = (await response.content.readline()).strip()
            if line:
                added.append(json.loads(line)["object"]["metadata"]["name"])
    assert added == ["p1", "p2", "p3"]  # the snapshot: namespace a only, soft-deleted p2 back in place


async def test_deleting_an_owner_removes_it_before_its_dependents(emu):
    _, owner = await call(emu, "POST", "/api/v1/namespaces/a/pods", pod("owner"))
    child = pod("child")
    child["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": "owner",
                                             "uid": owner["metadata"]["uid"]}]
    await call(emu, "POST", "/api/v1/namespaces/a/pods", child)
    await call(emu, "POST", "/api/v1/namespaces/a/pods", pod("bystander"))
    async with emu.get("/api/v1/namespaces/a/pods?watch=true") as response:
        seen = []
        while len(seen) < 3:  # the three ADDED of the snapshot
            if (await response.content.readline()).strip():
                seen.append(1)
        await call(emu, "DELETE", "/api/v1/namespaces/a/pods/owner")
        deleted = []
        while len(deleted) < 2:
            line = (await response.content.readline()).strip()
            if line:
                event = json.loads(line)
                deleted.append((event["type"], event["object"]["metadata"]["name"]))
    assert deleted == [("DELETED", "owner"), ("DELETED", "child")]  # background propagation order
    assert (await call(emu, "GET", "/api/v1/namespaces/a/pods/bystander"))[0] == 200
