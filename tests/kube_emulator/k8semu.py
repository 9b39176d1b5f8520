"""Realism layer over kmock 0.8's KubernetesEmulator: an in-memory Kubernetes API server for tests.

kmock is pinned to 0.8 (constraints.txt) because this module patches its internals.
Run: python -W ignore k8semu.py [PORT]   -> prints KMOCK_URL=http://127.0.0.1:PORT (PORT 0 = free port)
Use it through harness.py (start_emulator / kubectl / helm / wait_for), not directly.

Adds what kopf 1.45 / kubectl 1.37 / helm 4 need and kmock 0.8 lacks (each was observed failing without it):
  * metadata stamping on create: namespace (from URL), uid, creationTimestamp, resourceVersion
    (global counter), generation, generateName;
  * resourceVersion bump on every write (kopf's JSON-patch `test` op on /metadata/resourceVersion),
    generation bump on spec changes, 409 on stale merge-patch/PUT resourceVersion, 422 on failed `test`;
  * status subresource isolation (PATCH/PUT .../status only touch .status; main endpoint ignores .status);
  * PUT (replace), ?dryRun=All, server-side apply (application/apply-patch+yaml) approximated as create-or-merge;
  * labelSelector / fieldSelector on list and watch; list kind/apiVersion/resourceVersion;
  * race-free watch (bus mark + snapshot under one lock), ?resourceVersion=N honoured, JSON content type,
    headers flushed at once, sendInitialEvents + initial-events-end BOOKMARK (client-go WatchList / kubectl wait);
  * CRD create registers the resource for discovery, sets Established/NamesAccepted, and CRs are validated
    against the CRD openAPIV3Schema (jsonschema) with 422 like the API server;
  * 404 for undeclared resources; fixes for kmock bugs: '/api/v1/namespaces[/x]' parsing, core
    discovery groupVersion '/v1', binary bodies crashing the request parser;
  * protobuf request bodies for Secret/ConfigMap (helm release storage, `kubectl create secret`), see k8spb.py;
  * mini garbage collector: direct DELETE of an owner cascades to dependents by ownerReferences uid,
    after the owner is gone (background propagation: watchers see the owner's DELETED first);
  * request cost independent of history: kmock routes by replaying every past request through each reaction's
    filters and finds objects by scanning all of them; here routing checks the one request and objects are
    indexed per resource (get/create/patch/delete: one dict lookup; list/watch: the objects of that resource).
    Still linear: the cascade on DELETE (scans all objects) and kmock's request log (memory only).
Not emulated: scheduling/kubelet/controllers, RBAC/admission, managedFields, strategic-merge list semantics, OpenAPI.
"""
import asyncio
import copy
import datetime
import itertools
import os
import re
import secrets
import signal
import sys
import uuid
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonschema
import kmock
import yaml
from kmock._internal import dicts, dsl, enums, k8s_views, parsing
from kmock._internal import rendering as _rendering

# Run as a script (harness.py starts it as a subprocess): its sibling module is importable by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import k8spb  # noqa: E402

_ACCESS_LOG = bool(os.environ.get('K8SEMU_ACCESS_LOG'))
CRD_RESOURCE = kmock.resource(group='apiextensions.k8s.io', version='v1', plural='customresourcedefinitions')


def _openapi_to_jsonschema(schema: Any) -> Any:
    """Structural OpenAPI v3 schema (CRD) -> JSON schema: drop x-kubernetes-*, handle nullable/int-or-string."""
    if isinstance(schema, list):
        return [_openapi_to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _openapi_to_jsonschema(v) for k, v in schema.items() if not k.startswith('x-kubernetes-')}
    if schema.get('x-kubernetes-int-or-string'):
        out.pop('type', None)
        out['anyOf'] = [{'type': 'integer'}, {'type': 'string'}]
    if out.pop('nullable', False) and 'type' in out:
        out['type'] = [out['type'], 'null']
    return out


# --- kmock 0.8 bug: '/api/v1/namespaces' crashes, '/api/v1/namespaces/x' is misparsed ---
_orig_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    parts = path.strip('/').split('/')
    core = len(parts) >= 2 and parts[0] == 'api'
    grp = len(parts) >= 3 and parts[0] == 'apis'
    rest = parts[2:] if core else parts[3:] if grp else None
    if rest is not None and rest and rest[0] == 'namespaces' and len(rest) in (1, 2, 3) and not (len(rest) == 3 and rest[2] not in ('status', 'finalize')):
        # the namespace object itself: /api/v1/namespaces[/name[/status]]
        group, version = ('', parts[1]) if core else (parts[1], parts[2])
        return parsing.ParsedPath(group, version, 'namespaces', None,
                                  rest[1] if len(rest) > 1 else None,
                                  rest[2] if len(rest) > 2 else None)
    return _orig_parse_path(path)


parsing.parse_path = _parse_path

# --- kmock 0.8 decodes every body as UTF-8 text: binary (protobuf) bodies crash the request parser ---
_orig_request_parse = _rendering.Request._parse.__func__


async def _request_parse(cls, raw_request, *, id: int = 0):
    if 'protobuf' in raw_request.headers.get('Content-Type', ''):
        body = await raw_request.read()

        async def _text() -> str:
            return body.decode('latin-1')
        raw_request.text = _text  # aiohttp warns (DeprecationWarning) but allows it
    return await _orig_request_parse(cls, raw_request, id=id)


_rendering.Request._parse = classmethod(_request_parse)

# --- kmock 0.8 routes a request by asking each reaction `request in view`, which replays the whole request
# history through the view's filters (cost grows with every request ever served: ~100 ms per request after a
# few hundred pod creates). For the three views on our reactions' chains, answer for the one request instead;
# identical for a request, since View.__contains__ means "the view's iteration yields this very object". ---
_orig_contains = dsl.View.__contains__


def _root_contains(self, item) -> bool:
    if type(item) is not _rendering.Request:
        return _orig_contains(self, item)
    return any(r is item for r in reversed(self._requests))  # the request being served is at the end


def _priority_contains(self, item) -> bool:
    if type(self) is not dsl.Priority or type(item) is not _rendering.Request:
        return _orig_contains(self, item)
    return item in self._source  # Priority iterates its source unchanged


def _filter_contains(self, item) -> bool:
    if type(self) is not dsl.Filter or type(item) is not _rendering.Request:
        return _orig_contains(self, item)
    return item in self._source and bool(self.criteria(item))  # Filter yields the source's matches


dsl.Root.__contains__ = _root_contains
dsl.Priority.__contains__ = _priority_contains
dsl.Filter.__contains__ = _filter_contains


@attrs.frozen(eq=False, order=False)
class IndexedObjects(k8s_views.ObjectsArray):
    """kmock's object store plus an index of keys per resource (in store order), so that a lookup, list or
    watch touches the objects of its resource only, not every stored object."""

    _keys_by_resource: dict[Any, dict[Any, None]] = attrs.field(factory=dict, init=False)

    def __setitem__(self, key, value, /) -> None:
        super().__setitem__(key, value)
        if len(key) == 3:
            resource = k8s_views._parse_resource(key[0])
            self._keys_by_resource.setdefault(resource, {})[(resource, key[1], key[2])] = None

    def __delitem__(self, key, /) -> None:
        super().__delitem__(key)
        if len(key) == 3:
            resource = k8s_views._parse_resource(key[0])
            keys = self._keys_by_resource.get(resource, {})
            keys.pop((resource, key[1], key[2]), None)
            if not keys:
                self._keys_by_resource.pop(resource, None)

    def clear(self) -> None:
        super().clear()
        self._keys_by_resource.clear()

    def resources(self) -> list[Any]:
        """Every resource with at least one stored key (deleted objects included, as kmock counts them)."""
        return list(self._keys_by_resource)

    def items_of(self, resource) -> list[tuple[Any, Any]]:
        """(key, object) of one resource, in store order (a copy: safe across awaits)."""
        return [(key, self._objects[key]) for key in self._keys_by_resource.get(resource, ())]


def _in_scope(request, namespace, name, strict: bool = False) -> bool:
    """Whether a stored object's namespace and name fall under a request's; `strict`: a cluster-wide
    request (no namespace) matches only cluster-scoped objects, as kmock's strict lookup does."""
    if strict:
        same_namespace = namespace == request.namespace
    else:
        same_namespace = request.namespace is None or namespace == request.namespace
    return same_namespace and (request.name is None or name == request.name)


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def _match_labels(labels: dict[str, str], selector: str) -> bool:
    if not selector:
        return True
    # split on commas not inside parentheses
    reqs = re.split(r',(?![^()]*\))', selector)
    for req in (r.strip() for r in reqs if r.strip()):
        m = re.fullmatch(r'(\S+)\s+(in|notin)\s+\((.*)\)', req)
        if m:
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(',')}
            if op == 'in' and labels.get(key) not in vals:
                return False
            if op == 'notin' and key in labels and labels[key] in vals:
                return False
            continue
        m = re.fullmatch(r'([^=!\s]+)\s*(==|=|!=)\s*(\S*)', req)
        if m:
            key, op, val = m.groups()
            if op in ('=', '==') and labels.get(key) != val:
                return False
            if op == '!=' and labels.get(key) == val:
                return False
            continue
        if req.startswith('!'):
            if req[1:] in labels:
                return False
            continue
        if req not in labels:
            return False
    return True


def _match_fields(obj: dict[str, Any], selector: str) -> bool:
    if not selector:
        return True
    for req in selector.split(','):
        m = re.fullmatch(r'([^=!]+)(==|=|!=)(.*)', req.strip())
        if not m:
            continue
        path, op, val = m.groups()
        cur: Any = obj
        for part in path.split('.'):
            cur = cur.get(part) if isinstance(cur, dict) else None
        cur = '' if cur is None else str(cur)
        if (op == '!=') == (cur == val):
            return False
    return True


def _schema_error(error) -> str:
    """One schema violation the way the API server words it: `spec.roles[0].name: Required value`."""
    path = ''.join(f'[{p}]' if isinstance(p, int) else f'.{p}' for p in error.path).lstrip('.')
    if error.validator == 'required' and isinstance(error.instance, dict):
        missing = [p for p in error.validator_value if p not in error.instance]
        return '; '.join(f"{path + '.' if path else ''}{p}: Required value" for p in missing)
    if error.validator == 'enum':
        allowed = ', '.join(f'"{v}"' for v in error.validator_value)
        return f'{path}: Unsupported value: {error.instance!r}: supported values: {allowed}'
    return f"{path or '<root>'}: Invalid value: {error.message}"


class RealisticEmulator(kmock.KubernetesEmulator):
    _rv = itertools.count(1)

    def __attrs_post_init__(self) -> None:
        self._objects = IndexedObjects()
        super().__attrs_post_init__()
        # Watch streams must be served as JSON (kubectl/client-go reject application/octet-stream).
        (self.fallback ** 1)[enums.action.WATCH] << kmock.headers({'Content-Type': 'application/json'}) << self._serve_watch

    # ----------------------------------------------------------------- helpers
    def _has_status_subresource(self, resource) -> bool:
        for res in self.resources:
            if res == resource:
                return 'status' in self.resources[res].subresources
        return False

    def _is_namespaced(self, resource) -> bool:
        for res in self.resources:
            if res == resource:
                return self.resources[res].namespaced is not False
        return True

    # kmock's lookup for fetch/create/update/delete/list/watch (name-mangled private method, overridden by its
    # mangled name): the same matching rules, over the index of the request's resource instead of every object.
    def _KubernetesEmulator__get_objs(self, request, strict: bool) -> list:
        if request.name is not None and (strict or request.namespace is not None):
            obj = self._objects._objects.get((request.resource, request.namespace, request.name))
            return [] if obj is None else [obj]
        return [obj for (_res, ns, name), obj in self._objects.items_of(request.resource)
                if _in_scope(request, ns, name, strict)]

    def _get_resources(self) -> list:
        # kmock adds the resource of every stored object by walking all of them; the index has that set.
        return list(set(super(kmock.KubernetesEmulator, self)._get_resources()) | set(self._objects.resources()))

    def _next_rv(self) -> str:
        return str(next(self._rv))

    def _current(self, request):
        key = (request.resource, request.namespace, request.name)
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key]
        return None

    # ------------------------------------------------------------ the handler
    async def _handle(self, request):  # type: ignore[override]
        if _ACCESS_LOG:
            print(f"{request.method} {request.url.path_qs} ct={request.headers.get('Content-Type', '')}", flush=True)
        if request.resource is None:
            return await super()._handle(request)

        # Unknown resource (e.g. a CR before its CRD is applied): 404 like a real server, do not store.
        if request.resource.plural and not any(res == request.resource for res in self.resources):
            return self._status(404, 'NotFound', f'the server could not find the requested resource ({request.resource})')

        # Protobuf bodies from client-go typed clients (helm release storage, `kubectl create secret`).
        if 'protobuf' in request.headers.get('Content-Type', '') and request.body:
            decoded = k8spb.decode(request.body)
            if decoded is None:
                return self._status(415, 'UnsupportedMediaType', 'only JSON and protobuf Secret/ConfigMap bodies are supported by the emulator')
            object.__setattr__(request, 'data', decoded)

        # Server-side apply (PATCH application/apply-patch+yaml): approximated as create-or-merge-patch
        # (no managedFields / field ownership / conflict detection; list fields are replaced).
        if (request.method == enums.method.PATCH and request.name is not None
                and 'apply-patch' in request.headers.get('Content-Type', '')):
            body = yaml.safe_load(request.text) or {}
            if request.params.get('dryRun'):
                return aiohttp.web.json_response(body)
            if self._current(request) is None:
                body.setdefault('metadata', {})['name'] = request.name
                # kmock's Request is frozen and tracked by identity: mutate it in place.
                object.__setattr__(request, 'data', body)
                object.__setattr__(request, 'action', enums.action.CREATE)
                object.__setattr__(request, 'method', enums.method.POST)
                object.__setattr__(request, 'name', None)
            else:
                body.pop('apiVersion', None)
                body.pop('kind', None)
                object.__setattr__(request, 'data', body)

        # ?dryRun=All: validate and answer, but store nothing.
        if request.params.get('dryRun'):
            return await self._dry_run(request)

        # PUT = replace (kmock 0.8 has no action for PUT at all).
        if request.method == enums.method.PUT and request.name is not None:
            return await self._replace(request)

        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            self._stamp_create(request)
            if request.resource == CRD_RESOURCE:
                self._register_crd(request.data)
            err = self._validate(request.resource, request.data)
            if err is not None:
                return err
        elif request.action == enums.action.UPDATE:
            err = self._prepare_patch(request)
            if err is not None:
                return err
        elif request.action == enums.action.DELETE and request.name is not None:
            # Background propagation, as kubectl asks by default: the owner goes first (its watchers see
            # DELETED before any dependent's), then the garbage collector takes the dependents.
            owner_uid = self._cascading_uid(request)
            response = await super()._handle(request)
            if owner_uid and response.status < 300:
                await self._cascade(owner_uid)
            return response

        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as e:  # only reached outside of the context managers
            return self._status(422, 'Invalid', str(e))

    async def _dry_run(self, request):
        data = copy.deepcopy(request.data) if isinstance(request.data, (dict, list)) else {}
        cur = self._current(request) if request.name is not None else None
        if request.action == enums.action.CREATE:
            meta = data.setdefault('metadata', {})
            if request.namespace and self._is_namespaced(request.resource):
                meta['namespace'] = request.namespace
            meta.setdefault('uid', str(uuid.uuid4()))
            meta.setdefault('creationTimestamp', _now())
            result, code = data, 201
        elif cur is None:
            return self._status(404, 'NotFound', f'{request.resource} {request.name!r} not found')
        elif request.action == enums.action.UPDATE:
            result, code = dicts.patch_dict(copy.deepcopy(cur.raw), data), 200
        elif request.action == enums.action.DELETE:
            result, code = cur.raw, 200
        else:  # PUT
            result, code = data, 200
        err = self._validate(request.resource, result) if request.action != enums.action.DELETE else None
        return err or aiohttp.web.json_response(result, status=code)

    def _status(self, code: int, reason: str, message: str) -> aiohttp.web.Response:
        return aiohttp.web.json_response({'apiVersion': 'v1', 'kind': 'Status', 'metadata': {},
                                          'status': 'Failure', 'code': code, 'reason': reason,
                                          'message': message}, status=code)

    def _stamp_create(self, request) -> None:
        data = request.data
        meta = data.setdefault('metadata', {})
        if not meta.get('name') and meta.get('generateName'):
            meta['name'] = meta['generateName'] + secrets.token_hex(3)[:5]
        if request.namespace and self._is_namespaced(request.resource):
            meta['namespace'] = request.namespace
        meta['uid'] = str(uuid.uuid4())
        meta['creationTimestamp'] = _now()
        meta['resourceVersion'] = self._next_rv()
        meta['generation'] = 1
        if self._has_status_subresource(request.resource):
            data.pop('status', None)

    def _prepare_patch(self, request):
        obj = self._current(request)
        data = request.data
        if obj is None:
            return None  # let kmock produce its 404
        if request.resource in self._schemas:
            try:
                candidate = dicts.patch_dict(copy.deepcopy(obj.raw), copy.deepcopy(data))
            except Exception:
                candidate = None
            if candidate is not None:
                err = self._validate(request.resource, candidate)
                if err is not None:
                    return err
        new_rv = self._next_rv()
        status_only = request.subresource == 'status'
        status_sub = self._has_status_subresource(request.resource)
        if isinstance(data, dict):
            meta = data.get('metadata') or {}
            want_rv = meta.get('resourceVersion')
            if want_rv is not None and want_rv != obj.get('metadata', {}).get('resourceVersion'):
                return self._status(409, 'Conflict', 'the object has been modified; please apply your changes to the latest version and try again')
            if status_only:
                for k in list(data):
                    if k != 'status':
                        del data[k]
            elif status_sub:
                data.pop('status', None)
            if 'spec' in data and not status_only:
                data.setdefault('metadata', {})['generation'] = int(obj.get('metadata', {}).get('generation', 1)) + 1
            data.setdefault('metadata', {})['resourceVersion'] = new_rv
        elif isinstance(data, list):
            if status_only:
                data[:] = [op for op in data if op.get('op') == 'test' or str(op.get('path', '')).startswith('/status')]
            elif status_sub:
                data[:] = [op for op in data if not str(op.get('path', '')).startswith('/status')]
            if any(str(op.get('path', '')).startswith('/spec') for op in data if op.get('op') != 'test'):
                data.append({'op': 'add', 'path': '/metadata/generation',
                             'value': int(obj.get('metadata', {}).get('generation', 1)) + 1})
            # validate 'test' ops first -> 422 like the real server
            try:
                jsonpatch.apply_patch(copy.deepcopy(obj.raw), [op for op in data if op.get('op') == 'test'])
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                return self._status(422, 'Invalid', f'the server rejected our request due to an error in our request: {e}')
            data.append({'op': 'add', 'path': '/metadata/resourceVersion', 'value': new_rv})
        return None

    async def _replace(self, request):
        async with self._lock:
            obj = self._current(request)
            if obj is None:
                return self._status(404, 'NotFound', f'{request.resource} {request.name!r} not found')
            new = request.data if isinstance(request.data, dict) else {}
            old = obj.raw
            want_rv = (new.get('metadata') or {}).get('resourceVersion')
            if want_rv and want_rv != old['metadata'].get('resourceVersion'):
                return self._status(409, 'Conflict', 'the object has been modified; please apply your changes to the latest version and try again')
            if request.subresource == 'status':
                merged = copy.deepcopy(old)
                merged['status'] = new.get('status')
            else:
                merged = copy.deepcopy(new)
                if self._has_status_subresource(request.resource) and 'status' in old:
                    merged['status'] = old['status']
                meta = merged.setdefault('metadata', {})
                for k in ('uid', 'creationTimestamp', 'namespace', 'generation', 'deletionTimestamp'):
                    if k in old['metadata']:
                        meta[k] = old['metadata'][k]
                if merged.get('spec') != old.get('spec'):
                    meta['generation'] = int(old['metadata'].get('generation', 1)) + 1
            err = self._validate(request.resource, merged)
            if err is not None:
                return err
            merged['metadata']['resourceVersion'] = self._next_rv()
            obj.create(merged)  # appends a new version to the object's history
            await self._buses[request.resource].put({'type': 'MODIFIED', 'object': obj.raw})
            return aiohttp.web.json_response(obj.raw)

    def _cascading_uid(self, request) -> str | None:
        """The uid whose dependents a DELETE removes: only on the real removal (no finalizers pending)."""
        obj = self._current(request)
        if obj is None or obj.get('metadata', {}).get('finalizers'):
            return None
        return obj.get('metadata', {}).get('uid') or None

    async def _cascade(self, uid: str) -> None:
        """Mini garbage-collector: delete dependents whose ownerReferences point to the deleted uid."""
        async with self._lock:
            for (res, _ns, _name), child in list(self.objects.items()):
                if child.deleted:
                    continue
                refs = child.get('metadata', {}).get('ownerReferences') or []
                if any(r.get('uid') == uid for r in refs) and not child.get('metadata', {}).get('finalizers'):
                    raw = child.raw
                    child.delete()
                    await self._buses[res].put({'type': 'DELETED', 'object': raw})

    # ------------------------------------------------------------------ CRDs
    @property
    def _schemas(self) -> dict:
        try:
            return self.__dict__['_crd_schemas']
        except KeyError:
            return self.__dict__.setdefault('_crd_schemas', {})

    def _register_crd(self, crd: dict) -> None:
        spec = crd.get('spec') or {}
        names = spec.get('names') or {}
        group, plural = spec.get('group'), names.get('plural')
        for ver in spec.get('versions') or []:
            if not ver.get('served', True):
                continue
            key = kmock.resource(group=group, version=ver['name'], plural=plural)
            self.resources[key] = kmock.ResourceInfo(
                kind=names.get('kind'), singular=names.get('singular') or plural,
                namespaced=spec.get('scope', 'Namespaced') == 'Namespaced',
                shortnames=set(names.get('shortNames') or []),
                categories=set(names.get('categories') or []),
                subresources=set((ver.get('subresources') or {}).keys()),
                verbs=VERBS)
            schema = ((ver.get('schema') or {}).get('openAPIV3Schema'))
            if schema:
                self._schemas[key] = _openapi_to_jsonschema(schema)
        crd['status'] = {
            'acceptedNames': names,
            'storedVersions': [v['name'] for v in spec.get('versions') or [] if v.get('storage')],
            'conditions': [
                {'type': 'NamesAccepted', 'status': 'True', 'reason': 'NoConflicts', 'lastTransitionTime': _now(), 'message': 'no conflicts found'},
                {'type': 'Established', 'status': 'True', 'reason': 'InitialNamesAccepted', 'lastTransitionTime': _now(), 'message': 'the initial names have been accepted'},
            ],
        }

    def _validate(self, resource, obj: dict):
        schema = self._schemas.get(resource)
        if schema is None:
            return None
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
        if not errors:
            return None
        msgs = [_schema_error(e) for e in errors]
        kind = self.resources[resource].kind if resource in self.resources else str(resource)
        name = (obj.get('metadata') or {}).get('name')
        return self._status(422, 'Invalid', f'{kind}.{resource.group} "{name}" is invalid: ' + '; '.join(msgs))

    # ------------------------------------------------------------ discovery
    async def _serve_server_version(self, request):  # type: ignore[override]
        # kmock says v1.26; the CRD's CEL fieldPath needs 1.29 and the chart declares kubeVersion >= 1.29.
        return {**await super()._serve_server_version(request), 'minor': '30', 'gitVersion': 'v1.30.0+kmock'}

    async def _serve_version(self, request):  # type: ignore[override]
        result = await super()._serve_version(request)
        result['groupVersion'] = result['groupVersion'].lstrip('/')  # kmock 0.8 says '/v1' for core
        for r in result['resources']:
            if '/' in r['name']:  # subresources carry no short names/categories in real discovery
                r['shortNames'] = []
                r['categories'] = []
        return result

    # --------------------------------------------------- list/watch filtering
    def _filter(self, request, raw: dict[str, Any]) -> bool:
        labels = (raw.get('metadata') or {}).get('labels') or {}
        return (_match_labels(labels, request.params.get('labelSelector', ''))
                and _match_fields(raw, request.params.get('fieldSelector', '')))

    def _kind_gv(self, resource):
        kind = None
        for res in self.resources:
            if res == resource:
                kind = self.resources[res].kind
        return kind or 'Unknown', f'{resource.group}/{resource.version}'.lstrip('/')

    async def _serve_list(self, request):  # type: ignore[override]
        result = await super()._serve_list(request)
        result['items'] = [i for i in result['items'] if self._filter(request, i)]
        result['metadata']['resourceVersion'] = str(next(self._rv))
        if request.resource is not None:
            kind = None
            for res in self.resources:
                if res == request.resource:
                    kind = self.resources[res].kind
            result['kind'] = f'{kind}List' if kind else 'List'
            gv = f'{request.resource.group}/{request.resource.version}'.lstrip('/')
            result['apiVersion'] = gv
        return result

    async def _serve_watch(self, request):  # type: ignore[override]
        """Race-free watch: mark the bus and snapshot under the same lock; honour ?resourceVersion=N."""
        yield b' '  # a whitespace chunk flushes the HTTP headers at once (every JSON-lines client skips it)
        bus = self._buses[request.resource]
        async with self._lock:
            mark = await bus.mark()
            snapshot = [obj.raw for (_res, ns, name), obj in self._objects.items_of(request.resource)
                        if not obj.deleted and _in_scope(request, ns, name)]
        try:
            since = int(request.params.get('resourceVersion') or 0)
        except ValueError:
            since = 0
        initial_events = request.params.get('sendInitialEvents') == 'true'  # client-go WatchList (streaming list)
        if initial_events:
            since = 0
        try:
            for raw in snapshot:
                try:
                    rv = int((raw.get('metadata') or {}).get('resourceVersion') or 0)
                except ValueError:
                    rv = 0
                if rv > since and self._filter(request, raw):
                    yield {'type': 'ADDED', 'object': raw}
            if initial_events:
                kind, gv = self._kind_gv(request.resource)
                yield {'type': 'BOOKMARK', 'object': {
                    'kind': kind, 'apiVersion': gv,
                    'metadata': {'resourceVersion': str(next(self._rv)),
                                 'annotations': {'k8s.io/initial-events-end': 'true'}}}}
            async for event in bus.stream(since=mark):
                raw = event.get('object', {})
                meta = raw.get('metadata') or {}
                if request.namespace is not None and meta.get('namespace') != request.namespace:
                    continue
                if request.name is not None and meta.get('name') != request.name:
                    continue
                if self._filter(request, raw):
                    yield event
        finally:
            await bus.unmark(mark)


RESOURCES = {
    'v1/pods': dict(kind='Pod', namespaced=True, singular='pod', shortnames={'po'}, subresources={'status'}),
    'v1/services': dict(kind='Service', namespaced=True, singular='service', shortnames={'svc'}, subresources={'status'}),
    'v1/configmaps': dict(kind='ConfigMap', namespaced=True, singular='configmap', shortnames={'cm'}),
    'v1/persistentvolumeclaims': dict(kind='PersistentVolumeClaim', namespaced=True, singular='persistentvolumeclaim', shortnames={'pvc'}, subresources={'status'}),
    'v1/nodes': dict(kind='Node', namespaced=False, singular='node', shortnames={'no'}, subresources={'status'}),
    'coordination.k8s.io/v1/leases': dict(kind='Lease', namespaced=True, singular='lease'),
    'v1/secrets': dict(kind='Secret', namespaced=True, singular='secret'),
    'v1/serviceaccounts': dict(kind='ServiceAccount', namespaced=True, singular='serviceaccount', shortnames={'sa'}),
    'v1/events': dict(kind='Event', namespaced=True, singular='event', shortnames={'ev'}),
    'v1/namespaces': dict(kind='Namespace', namespaced=False, singular='namespace', shortnames={'ns'}, subresources={'status'}),
    'events.k8s.io/v1/events': dict(kind='Event', namespaced=True, singular='event'),
    'apps/v1/deployments': dict(kind='Deployment', namespaced=True, singular='deployment', shortnames={'deploy'}, subresources={'status', 'scale'}),
    'rbac.authorization.k8s.io/v1/roles': dict(kind='Role', namespaced=True, singular='role'),
    'rbac.authorization.k8s.io/v1/rolebindings': dict(kind='RoleBinding', namespaced=True, singular='rolebinding'),
    'rbac.authorization.k8s.io/v1/clusterroles': dict(kind='ClusterRole', namespaced=False, singular='clusterrole'),
    'rbac.authorization.k8s.io/v1/clusterrolebindings': dict(kind='ClusterRoleBinding', namespaced=False, singular='clusterrolebinding'),
    'apiextensions.k8s.io/v1/customresourcedefinitions': dict(kind='CustomResourceDefinition', namespaced=False, singular='customresourcedefinition', shortnames={'crd', 'crds'}, subresources={'status'}),
}
VERBS = {'get', 'list', 'watch', 'create', 'update', 'patch', 'delete', 'deletecollection'}


def register(emu: kmock.KubernetesEmulator, resources=RESOURCES) -> None:
    for key, info in resources.items():
        emu.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)


async def serve(port: int = 0):
    async with RealisticEmulator() as emu, kmock.Server(emu, port=port) as srv:
        register(emu)
        emu.objects['v1/namespaces', None, 'default'] = {'apiVersion': 'v1', 'kind': 'Namespace', 'metadata': {'name': 'default', 'uid': str(uuid.uuid4()), 'resourceVersion': '1'}}
        print(f"KMOCK_URL=http://127.0.0.1:{srv.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()


if __name__ == '__main__':
    asyncio.run(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
