"""Typed readers for JSON documents (config.json, process.json, resources): each names the JSON path it rejects.

Shared by the spec and by the concerns that parse their own sections (cgroups, seccomp).
"""

from __future__ import annotations

from .errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def obj(value: Any, path: str, *, optional: bool = False) -> dict:
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise SpecError(path, f"must be an object, got {kind(value)}")
    return value


def array(value: Any, path: str, *, optional: bool = True) -> list:
    if value is None and optional:
        return []
    if not isinstance(value, list):
        raise SpecError(path, f"must be an array, got {kind(value)}")
    return value


def string(value: Any, path: str, *, optional: bool = False, default: str = "") -> str:
    if value is None and optional:
        return default
    if not isinstance(value, str):
        raise SpecError(path, f"must be a string, got {kind(value)}")
    if "\0" in value:
        raise SpecError(path, "must not contain a NUL byte")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise SpecError(path, "is not valid UTF-8 (a lone surrogate)") from None
    return value


def boolean(value: Any, path: str, default: bool = False) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(path, f"must be a boolean, got {kind(value)}")
    return value


def integer(value: Any, path: str, *, optional: bool = False, default: int | None = None,
         lo: int | None = None, hi: int | None = None) -> int | None:
    if value is None and optional:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(path, f"must be an integer, got {kind(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise SpecError(path, f"{value} is out of range [{lo}, {hi}]")
    return value


def strings(value: Any, path: str) -> list[str]:
    return [string(item, f"{path}[{i}]") for i, item in enumerate(array(value, path))]


def env_entries(value: Any, path: str) -> list[str]:
    """An environment list: strings of the form NAME=value (NAME not empty)."""
    entries = strings(value, path)
    for i, entry in enumerate(entries):
        if entry.find("=") <= 0:
            raise SpecError(f"{path}[{i}]", f"{entry!r} is not of the form NAME=value")
    return entries


def abs_path(value: Any, path: str) -> str:
    text = string(value, path)
    if not text.startswith("/"):
        raise SpecError(path, f"{text!r} must be an absolute path")
    return text


def kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
