"""Reading spec files: JSON with ``extends`` deep-merge, ``--set`` overrides, canonical form.

Merge rules (parent ← child): objects merge key by key, except that an object whose ``kind``
differs from the parent's replaces it whole; lists of objects that all carry a ``name`` or
``kind`` merge item by item on that identity (new items are appended); any other value is
replaced.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson

from phi4_engine.errors import SpecError


def read_json(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror}") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SpecError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec must be a JSON object, not {type(data).__name__}")
    return data


def _identity(item: Any) -> str | None:
    if isinstance(item, dict):
        key = item.get("name", item.get("kind"))
        return key if isinstance(key, str) else None
    return None


def deep_merge(parent: Any, child: Any) -> Any:
    if isinstance(parent, dict) and isinstance(child, dict):
        if "kind" in child and child["kind"] != parent.get("kind", child["kind"]):
            return child  # another kind: the parent's fields belong to a different model
        out = dict(parent)
        for key, value in child.items():
            out[key] = deep_merge(parent[key], value) if key in parent else value
        return out
    if (
        isinstance(parent, list)
        and isinstance(child, list)
        and parent
        and all(_identity(i) for i in parent + child)
    ):
        out = list(parent)
        index = {_identity(item): i for i, item in enumerate(parent)}
        for item in child:
            pos = index.get(_identity(item))
            if pos is None:
                out.append(item)
            elif "kind" in item and item["kind"] != out[pos].get("kind"):
                out[pos] = item
            else:
                out[pos] = deep_merge(out[pos], item)
        return out
    return child


def load_with_extends(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise SpecError(f"{_chain[0]}: 'extends' forms a cycle: {cycle}")
    data = read_json(path)
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data
    if not isinstance(parent_ref, str):
        raise SpecError(f"{path}: extends: must be a file path string")
    parent_path = (path.parent / parent_ref).resolve()
    if not parent_path.exists():
        raise SpecError(f"{path}: extends: parent spec {parent_ref!r} not found (looked at {parent_path})")
    return deep_merge(load_with_extends(parent_path, (*_chain, path)), data)


def _parse_value(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text  # bare strings need no quotes: --set name=my-run


def apply_override(data: dict[str, Any], assignment: str, *, origin: str = "--set") -> None:
    """Apply ``a.b.c=value``; list items are addressed by index or by their name/kind."""
    key, sep, value_text = assignment.partition("=")
    if not sep or not key:
        raise SpecError(f"{origin} {assignment!r}: expected KEY=VALUE, e.g. stages.sft.lr=2e-5")
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            pos = None
            if part.isdigit() and int(part) < len(node):
                pos = int(part)
            else:
                matches = [i for i, item in enumerate(node) if _identity(item) == part]
                pos = matches[0] if matches else None
            if pos is None:
                names = ", ".join(str(_identity(i)) for i in node)
                raise SpecError(f"{origin} {key}: no item {part!r} in {'.'.join(parts[:depth]) or 'spec'} (items: {names})")
            if last:
                node[pos] = _parse_value(value_text)
            else:
                node = node[pos]
        elif isinstance(node, dict):
            if last:
                node[part] = _parse_value(value_text)
            else:
                if part not in node:
                    node[part] = {}
                node = node[part]
        else:
            raise SpecError(f"{origin} {key}: {where} is not an object or list")


def canonical_json(data: Any) -> bytes:
    """Sorted keys, no whitespace: the bytes whose sha256 identifies a resolved spec."""
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


def sha256_of(data: Any) -> str:
    return hashlib.sha256(canonical_json(data)).hexdigest()
