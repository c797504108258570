"""Request bodies for etcd's v3 JSON gateway transactions, and reading their answers."""

from __future__ import annotations

from typing import Any

from leasehold._async.backends.etcd.client import b64


def _put(key: bytes, value: bytes, lease: int = 0, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value), **extra}
    if lease:
        body["lease"] = lease
    return {"request_put": body}


def _delete(key: bytes, range_end: bytes | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "prev_kv": True}
    if range_end is not None:
        body["range_end"] = b64(range_end)
    return {"request_delete_range": body}


def _range(key: bytes, range_end: bytes | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key)}
    if range_end is not None:
        body["range_end"] = b64(range_end)
    return {"request_range": body}


def _compare(
    target: str, key: bytes, result: str, value: int | bytes, range_end: bytes | None = None
) -> dict[str, Any]:
    field = {"CREATE": "create_revision", "MOD": "mod_revision", "VALUE": "value"}[target]
    body: dict[str, Any] = {
        "target": target,
        "key": b64(key),
        "result": result,
        field: b64(value) if isinstance(value, bytes) else value,
    }
    if range_end is not None:
        body["range_end"] = b64(range_end)
    return body


def _term(response: dict[str, Any]) -> int:
    return int(response.get("header", {}).get("raft_term", 0))


def _kvs(response: dict[str, Any], index: int) -> list[dict[str, Any]]:
    responses = response.get("responses", [])
    if index >= len(responses):
        return []
    kvs: list[dict[str, Any]] = responses[index].get("response_range", {}).get("kvs", [])
    return kvs
