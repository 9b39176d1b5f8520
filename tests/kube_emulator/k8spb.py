"""Minimal decoder of Kubernetes protobuf bodies (k8s\\x00 + runtime.Unknown) for Secret/ConfigMap/DeleteOptions.

Only what client-go's typed clients (helm's release storage, kubectl create secret/configmap) send.
"""
import base64
import datetime
from typing import Any

MAGIC = b'k8s\x00'


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes):
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, i = _varint(buf, i)
        elif wt == 2:
            ln, i = _varint(buf, i)
            val = buf[i:i + ln]
            i += ln
        elif wt == 1:
            val = buf[i:i + 8]
            i += 8
        elif wt == 5:
            val = buf[i:i + 4]
            i += 4
        else:
            raise ValueError(f'unsupported wire type {wt}')
        yield num, wt, val


def _map_entry(buf: bytes, bytes_value: bool = False) -> tuple[str, Any]:
    k = v = None
    for n, _, val in _fields(buf):
        if n == 1:
            k = val.decode()
        elif n == 2:
            v = base64.b64encode(val).decode() if bytes_value else val.decode()
    return k, (v if v is not None else '')


def _time(buf: bytes) -> str:
    secs = 0
    for n, _, val in _fields(buf):
        if n == 1:
            secs = val
    return datetime.datetime.fromtimestamp(secs, tz=datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def _owner_ref(buf: bytes) -> dict:
    names = {1: 'kind', 3: 'name', 4: 'uid', 5: 'apiVersion'}
    out: dict[str, Any] = {}
    for n, _wt, val in _fields(buf):
        if n in names:
            out[names[n]] = val.decode()
        elif n == 6:
            out['controller'] = bool(val)
        elif n == 7:
            out['blockOwnerDeletion'] = bool(val)
    return out


def _object_meta(buf: bytes) -> dict:
    strs = {1: 'name', 2: 'generateName', 3: 'namespace', 5: 'uid', 6: 'resourceVersion'}
    meta: dict[str, Any] = {}
    for n, _wt, val in _fields(buf):
        if n in strs and val:
            meta[strs[n]] = val.decode()
        elif n == 7:
            meta['generation'] = val
        elif n == 8:
            meta['creationTimestamp'] = _time(val)
        elif n == 11:
            k, v = _map_entry(val)
            meta.setdefault('labels', {})[k] = v
        elif n == 12:
            k, v = _map_entry(val)
            meta.setdefault('annotations', {})[k] = v
        elif n == 13:
            meta.setdefault('ownerReferences', []).append(_owner_ref(val))
        elif n == 14:
            meta.setdefault('finalizers', []).append(val.decode())
    return meta


def _secret(buf: bytes) -> dict:
    obj: dict[str, Any] = {}
    for n, _wt, val in _fields(buf):
        if n == 1:
            obj['metadata'] = _object_meta(val)
        elif n == 2:
            k, v = _map_entry(val, bytes_value=True)
            obj.setdefault('data', {})[k] = v
        elif n == 3:
            obj['type'] = val.decode()
        elif n == 4:
            k, v = _map_entry(val)
            obj.setdefault('stringData', {})[k] = v
        elif n == 5:
            obj['immutable'] = bool(val)
    return obj


def _configmap(buf: bytes) -> dict:
    obj: dict[str, Any] = {}
    for n, _wt, val in _fields(buf):
        if n == 1:
            obj['metadata'] = _object_meta(val)
        elif n == 2:
            k, v = _map_entry(val)
            obj.setdefault('data', {})[k] = v
        elif n == 3:
            k, v = _map_entry(val, bytes_value=True)
            obj.setdefault('binaryData', {})[k] = v
        elif n == 4:
            obj['immutable'] = bool(val)
    return obj


DECODERS = {'Secret': _secret, 'ConfigMap': _configmap}


def decode(body: bytes) -> dict | None:
    """Return the JSON-equivalent dict, or None if the kind is not supported."""
    if not body.startswith(MAGIC):
        return None
    api_version = kind = ''
    raw = b''
    for n, _, val in _fields(body[len(MAGIC):]):
        if n == 1:
            for m, _, v in _fields(val):
                if m == 1:
                    api_version = v.decode()
                elif m == 2:
                    kind = v.decode()
        elif n == 2:
            raw = val
    if kind == 'DeleteOptions':
        return {}
    dec = DECODERS.get(kind)
    if dec is None:
        return None
    obj = dec(raw)
    return {'apiVersion': api_version, 'kind': kind, **obj}
