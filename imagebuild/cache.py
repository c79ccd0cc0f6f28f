"""The step cache and the image catalog, both kept as small named files in the chunk store.

A step's key is the blake3 hash of its parent image's reference, its definition and the digests of its inputs
(the contents of local files it adds). Chaining on the parent's *reference* rather than on the parent's key means
that a step rebuilt with `force_build` which comes out different makes every later step miss, and one that comes
out identical lets them hit. A record (`imagebuild-steps/<key>`) holds the step's image reference and its image
config, so a fully cached build reads one small file per step and nothing else.

Images built with a name are recorded under `imagebuild-images/<hex of the name>`, and the names in one catalog
(`imagebuild-images/catalog`) for `coldbrew image ls`: stores have no listing (an HTTP store is a static server).
The catalog is rewritten under a host-wide lock; two hosts naming images in one store at once may lose a name
from the catalog, never an image or its record.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import blake3

from .image import ImageBuildError

STEPS = "imagebuild-steps"
IMAGES = "imagebuild-images"
CATALOG = f"{IMAGES}/catalog"
_REFERENCE = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_LOCK = "/run/coldbrew/imagebuild-catalog.lock"
_READ_SIZE = 1 << 20


def step_key(parent_reference: str | None, definition: dict, inputs: dict[str, str]) -> str:
    """The cache key of a step (hex): what it builds on, what it does, what it reads from the host."""
    canonical = json.dumps({"parent": parent_reference, "step": definition, "inputs": inputs},
                           sort_keys=True, separators=(",", ":"))
    return blake3.blake3(canonical.encode()).hexdigest()


def file_digest(path: str) -> str:
    """blake3 of a file's contents."""
    hasher = blake3.blake3()
    with open(path, "rb") as file:
        while block := file.read(_READ_SIZE):
            hasher.update(block)
    return hasher.hexdigest()


def tree_digest(path: str, *, owners: bool = False) -> str:
    """blake3 over a local file or directory tree as a build step copies it: relative paths, types, permission bits,
    symlink targets and file contents; with `owners`, uids and gids too (a copy makes them root's, an image made
    from a directory keeps them). Times are not part of it."""
    hasher = blake3.blake3()
    root = os.path.abspath(path)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        _hash_entry(hasher, b"", root, st, owners)
        return hasher.hexdigest()
    pending = [b""]
    while pending:
        relative = pending.pop()
        directory = os.path.join(os.fsencode(root), relative)
        with os.scandir(directory) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
        for entry in entries:
            child = relative + b"/" + entry.name if relative else entry.name
            st = entry.stat(follow_symlinks=False)
            _hash_entry(hasher, child, entry.path, st, owners)
            if stat.S_ISDIR(st.st_mode):
                pending.append(child)
    return hasher.hexdigest()


def _hash_entry(hasher: Any, relative: bytes, path: str | bytes, st: os.stat_result, owners: bool) -> None:
    kind = stat.S_IFMT(st.st_mode)
    hasher.update(b"%s\0%o\0" % (relative, st.st_mode))
    if owners:
        hasher.update(b"%d:%d\0" % (st.st_uid, st.st_gid))
    if kind == stat.S_IFREG:
        hasher.update(bytes.fromhex(file_digest(path)))
    elif kind == stat.S_IFLNK:
        hasher.update(os.fsencode(os.readlink(path)))
    elif kind != stat.S_IFDIR:
        raise ImageBuildError(f"{os.fsdecode(path)}: only files, directories and symlinks can be added to an image")
    hasher.update(b"\n")


@dataclass
class StepRecord:
    """What a built step left: its image, the image config after it, and how it went."""

    reference: str
    config: dict  # ImageConfig.to_json()
    step: str  # the step as a line of text
    parent: str | None  # the parent image's reference
    entries: int = 0
    file_bytes: int = 0  # data bytes in the step's tree
    uploaded_bytes: int = 0  # stored bytes the step added to the store
    seconds: float = 0.0
    push_seconds: float = 0.0  # of `seconds`, storing the step's image
    built_at: float = field(default_factory=time.time)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "StepRecord":
        record = _record_from_json(cls, data, f"step record {where}")
        _check_fields(record, where)
        if not (isinstance(record.parent, str) and _REFERENCE.fullmatch(record.parent) or record.parent is None):
            raise ImageBuildError(f"step record {where}: parent is malformed")
        return record


@dataclass
class ImageRecord:
    """A named image: its reference, when it was built and what from."""

    name: str
    reference: str
    steps: list[str]
    built_at: float
    file_bytes: int = 0
    config: dict = field(default_factory=dict)


def _record_from_json(cls: type, data: bytes, what: str) -> Any:
    """`cls(**object)` from the JSON object in `data`; ImageBuildError "`what` is malformed (...)" otherwise."""
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        return cls(**raw)
    except (ValueError, TypeError) as error:
        raise ImageBuildError(f"{what} is malformed ({error})") from None


def _check_fields(record: Any, where: str) -> None:
    """Every field of a record read from a store has its declared type (numbers are numbers, the reference is 64
    hex digits): a damaged or hostile record is refused, never half-used."""
    kinds = {"int": int, "float": (int, float), "str": str, "dict": dict, "list[str]": list}
    for name, declared in record.__dataclass_fields__.items():
        value = getattr(record, name)
        kind = kinds.get(str(declared.type))  # "str | None" (the parent) is checked by the caller
        if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ImageBuildError(f"{where}: field {name} is malformed ({value!r})")
    if not _REFERENCE.fullmatch(record.reference):
        raise ImageBuildError(f"{where}: reference {record.reference!r} is not 64 hex digits")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ImageBuildError(f"image name {name!r}: use 1 to 128 letters, digits, '.', '_' or '-', starting with a "
                              "letter or digit")
    return name


class StepCache:
    """Step records and named images in a store (a `coldbrew.fs` ChunkStore)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def lookup(self, key: str) -> StepRecord | None:
        data = self.store.get_named(f"{STEPS}/{key}")
        if data is None:
            return None
        record = StepRecord.from_bytes(data, f"{STEPS}/{key}")
        if not self.store.has(bytes.fromhex(record.reference)):
            return None  # the image was removed from the store: build the step again
        return record

    def record(self, key: str, record: StepRecord) -> None:
        self.store.put_named(f"{STEPS}/{key}", record.to_bytes())

    def name_image(self, record: ImageRecord) -> None:
        check_name(record.name)
        self.store.put_named(f"{IMAGES}/{record.name.encode().hex()}", json.dumps(asdict(record)).encode())
        os.makedirs(os.path.dirname(_LOCK), exist_ok=True)
        with open(_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            names = set(self._catalog())
            if record.name not in names:
                self.store.put_named(CATALOG, json.dumps(sorted(names | {record.name})).encode())

    def _catalog(self) -> list[str]:
        data = self.store.get_named(CATALOG)
        if data is None:
            return []
        try:
            names = json.loads(data)
        except ValueError:
            raise ImageBuildError(f"the image catalog {CATALOG} in {self.store.describe()} is not JSON") from None
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ImageBuildError(f"the image catalog {CATALOG} in {self.store.describe()} is not a list of names")
        return names

    def image(self, name: str) -> ImageRecord | None:
        check_name(name)
        data = self.store.get_named(f"{IMAGES}/{name.encode().hex()}")
        if data is None:
            return None
        record = _record_from_json(ImageRecord, data, f"the record of image {name!r}")
        _check_fields(record, f"the record of image {name!r}")
        if not all(isinstance(step, str) for step in record.steps):
            raise ImageBuildError(f"the record of image {name!r}: steps are not strings")
        return record

    def images(self) -> list[ImageRecord]:
        found = []
        for name in self._catalog():
            record = self.image(name)
            if record is not None:
                found.append(record)
        return found
