"""Import of container images into a directory: an OCI image layout (a directory, or an oci-archive tarball) or a
docker-archive tarball (what `skopeo copy ... docker-archive:`, `podman save` and `docker save` write).

`import_oci(source, dest)` picks one image (by the `PATH:NAME` suffix, else the only one, else the one for this
host's platform), checks every blob it reads against its digest (manifest and config blobs before use, layers
while they stream: a corrupt layer is found at its end, and the destination is emptied again), applies the
layers in order with `layers.apply_layer_stream` and returns what the image config carries into a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import posixpath
import re
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from .layers import (LAYER_MEDIA_TYPES, OCI_LAYER_TAR, ImageImportError, ImportLimits, MeteredReader,
                     apply_layer, apply_layer_stream, bounded_tarinfo)

__all__ = ["ImageConfig", "ImageConfigError", "ImageImportError", "ImportLimits", "apply_layer", "import_oci"]

INDEX_MEDIA_TYPES = frozenset({"application/vnd.oci.image.index.v1+json",
                               "application/vnd.docker.distribution.manifest.list.v2+json"})
MANIFEST_MEDIA_TYPES = frozenset({"application/vnd.oci.image.manifest.v1+json",
                                  "application/vnd.docker.distribution.manifest.v2+json"})
CONFIG_MEDIA_TYPES = frozenset({"application/vnd.oci.image.config.v1+json",
                                "application/vnd.docker.container.image.v1+json"})
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"  # what `ctr images export` names its images by
_MAX_JSON_BYTES = 4 << 20  # the spec's advice for manifests; configs and indexes stay far below it
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
_HEX_NAME = re.compile(r"([a-f0-9]{64})(?:\.json)?")
_NESTED_INDEX_DEPTH = 4


class ImageConfigError(ValueError):
    """A malformed ImageConfig field: `field` is its name, the message names the field and what is wrong."""

    def __init__(self, field_name: str, detail: str) -> None:
        super().__init__(f"{field_name}{detail}")
        self.field = field_name
        self.detail = detail


@dataclass(frozen=True)
class ImageConfig:
    """What an OCI image config carries into a bundle."""

    env: tuple[str, ...] = ()           # "KEY=value"
    working_dir: str = "/"
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    user: str = ""                      # as in the image config: "uid", "uid:gid", "name", "name:group"
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("env", "entrypoint", "cmd"):
            object.__setattr__(self, name, _strings(getattr(self, name), name))
        for i, entry in enumerate(self.env):
            if "=" not in entry or entry.startswith("="):
                raise ImageConfigError("env", f"[{i}]: {entry!r} is not KEY=value")
        if not isinstance(self.working_dir, str) or not self.working_dir.startswith("/"):
            raise ImageConfigError("working_dir", f": {self.working_dir!r} is not an absolute path")
        if not isinstance(self.user, str):
            raise ImageConfigError("user", f": {self.user!r} is not a string")
        if not isinstance(self.labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.labels.items()):
            raise ImageConfigError("labels", ": not a mapping of strings to strings")
        object.__setattr__(self, "labels", dict(self.labels))  # a copy: the caller's dict may change later

    def to_json(self) -> dict:
        return {"env": list(self.env), "working_dir": self.working_dir, "entrypoint": list(self.entrypoint),
                "cmd": list(self.cmd), "user": self.user, "labels": dict(self.labels)}

    @classmethod
    def from_json(cls, data: dict) -> ImageConfig:
        """The inverse of `to_json`; a missing key takes its default, anything else malformed raises
        ImageConfigError (a ValueError) naming the field."""
        if not isinstance(data, dict):
            raise ImageConfigError("", f"an image config is a JSON object, not {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ImageConfigError("", f"unknown image config fields: {', '.join(map(str, unknown))}")
        for name in ("env", "entrypoint", "cmd"):
            if name in data and not isinstance(data[name], list):
                raise ImageConfigError(name, f": a list of strings, not {type(data[name]).__name__}")
        return cls(**data)


# The image config's names for ImageConfig's fields, for messages about an image's config blob.
_IMAGE_CONFIG_FIELDS = {"env": "Env", "working_dir": "WorkingDir", "entrypoint": "Entrypoint", "cmd": "Cmd",
                        "user": "User", "labels": "Labels"}


def _strings(value: object, name: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ImageConfigError(name, f": a list of strings, not {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ImageConfigError(name, f"[{i}]: {item!r} is not a string")
    return tuple(value)


def import_oci(source: str, dest: str, *, progress: Callable[[int, int], None] | None = None,
               allow_devices: bool = False, limits: ImportLimits = ImportLimits()) -> ImageConfig:
    """Import the image `source` into `dest` (a new or empty directory) and return its config.

    `source` is an OCI image layout directory, an oci-archive or a docker-archive tarball, optionally followed by
    `:NAME` (a layout's `org.opencontainers.image.ref.name`, or a docker-archive's RepoTags entry, whole or its
    `name:tag` / `tag` end). `progress(done, total)` is called as layer blobs are read, in bytes of the blobs.
    On failure `dest` is left as it was found (empty, or absent) and ImageImportError says what is wrong.
    """
    path, name = _split_source(source)
    archive = _open_archive(path, limits)
    try:
        plan = _plan_docker(archive, name) if archive.size("manifest.json") is not None else \
            _plan_oci(archive, name)
        created = _prepare_dest(dest)
        try:
            _apply_layers(archive, plan.layers, dest, progress, allow_devices, limits)
        except BaseException:
            _empty(dest, created)
            raise
        return plan.config
    finally:
        archive.close()


# -- sources --------------------------------------------------------------------------------------------------


def _split_source(source: str) -> tuple[str, str | None]:
    """`PATH` or `PATH:NAME`, where PATH is the shortest prefix that exists (a path may hold colons)."""
    if os.path.exists(source):
        return source, None
    for i, char in enumerate(source):
        if char == ":" and os.path.exists(source[:i]):
            if i + 1 == len(source):
                raise ImageImportError(f"{source}: an empty image name after ':'")
            return source[:i], source[i + 1:]
    raise ImageImportError(f"{source}: no such file or directory")


def _archive_name(name: str) -> str | None:
    """A path inside an archive, normalised; None for one that climbs out of it."""
    normal = posixpath.normpath(name).lstrip("/")
    return None if normal == ".." or normal.startswith("../") or "\x00" in normal else normal


class _DirArchive:
    def __init__(self, root: str) -> None:
        self.root = root
        self.label = root

    def size(self, name: str) -> int | None:
        try:
            st = os.stat(os.path.join(self.root, name))
        except OSError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def open(self, name: str) -> BinaryIO:
        return open(os.path.join(self.root, name), "rb")

    def close(self) -> None:
        pass


class _TarArchive:
    """A tarball read in place: its members are found once and their data read where it lies."""

    def __init__(self, path: str, limits: ImportLimits) -> None:
        self.label = path
        self.tar = tarfile.open(path, "r:", tarinfo=bounded_tarinfo(limits.max_header_bytes))
        try:
            self.members = {}
            for member in self.tar:
                normal = _archive_name(member.name)
                # GNU tar stores a file named twice as a hard link to itself: the first one holds the data
                if normal and not (member.islnk() and _archive_name(member.linkname) == normal):
                    self.members[normal] = member
        except BaseException:
            self.tar.close()
            raise

    def _resolve(self, name: str) -> tarfile.TarInfo | None:
        for _ in range(8):  # links between members (docker's legacy format shares layers so)
            member = self.members.get(name)
            if member is None or member.isreg():
                return member
            if member.issym():
                target = _archive_name(posixpath.join(posixpath.dirname(name), member.linkname))
            elif member.islnk():
                target = _archive_name(member.linkname)
            else:
                return None
            if target is None:
                return None
            name = target
        return None

    def size(self, name: str) -> int | None:
        member = self._resolve(name)
        return None if member is None else member.size

    def open(self, name: str) -> BinaryIO:
        """The member's data, read straight from the tarball (tarfile's own reader adds a copy per read)."""
        member = self._resolve(name)
        if member is None:
            raise FileNotFoundError(name)
        tarball = open(self.label, "rb")
        tarball.seek(member.offset_data)
        return _Slice(tarball, member.size)  # type: ignore[return-value]

    def close(self) -> None:
        self.tar.close()


class _Slice:
    """The first `size` bytes of an open file, from where it stands; closes it."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file = file
        self._left = size

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(self._left if size < 0 else min(size, self._left))
        self._left -= len(data)
        return data

    def __enter__(self) -> _Slice:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _open_archive(path: str, limits: ImportLimits) -> _DirArchive | _TarArchive:
    if os.path.isdir(path):
        return _DirArchive(path)
    try:
        return _TarArchive(path, limits)
    except (ImageImportError, tarfile.TarError, OSError, EOFError) as e:
        raise ImageImportError(f"{path}: not an image layout directory or an image tarball ({e})") from None


# -- manifests ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict
    platform: dict

    @property
    def blob(self) -> str:
        algorithm, _, hex_digest = self.digest.partition(":")
        return f"blobs/{algorithm}/{hex_digest}"


@dataclass(frozen=True)
class _LayerBlob:
    name: str               # the path inside the archive
    what: str               # how messages name it
    size: int
    media_type: str
    digest: str | None      # of the blob as stored, where the manifest gives one
    diff_id: str            # of the uncompressed tar, from the config's rootfs.diff_ids


@dataclass(frozen=True)
class _ImagePlan:
    config: ImageConfig
    layers: list[_LayerBlob]


def _descriptor(value: object, where: str) -> _Descriptor:
    if not isinstance(value, dict):
        raise ImageImportError(f"{where}: a descriptor is a JSON object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str):
        raise ImageImportError(f"{where}.mediaType: missing or not a string")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ImageImportError(f"{where}.digest: {digest!r} is not a sha256 or sha512 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageImportError(f"{where}.size: {size!r} is not a size")
    annotations = value.get("annotations") or {}
    platform_ = value.get("platform") or {}
    if not isinstance(annotations, dict) or not isinstance(platform_, dict):
        raise ImageImportError(f"{where}: annotations and platform are JSON objects")
    return _Descriptor(media_type, digest, size, annotations, platform_)


def _read_json(archive: _DirArchive | _TarArchive, name: str, what: str, digest: str | None = None,
               size: int | None = None) -> object:
    actual = archive.size(name)
    if actual is None:
        raise ImageImportError(f"{archive.label}: {what} is missing ({name})")
    if size is not None and actual != size:
        raise ImageImportError(f"{archive.label}: {what}: {actual} bytes, its descriptor says {size}")
    if actual > _MAX_JSON_BYTES:
        raise ImageImportError(f"{archive.label}: {what}: {actual} bytes (over {_MAX_JSON_BYTES})")
    try:
        with archive.open(name) as f:
            data = f.read(_MAX_JSON_BYTES + 1)
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ImageImportError(f"{archive.label}: {what}: {e}") from None
    if digest is not None:
        algorithm, _, expected = digest.partition(":")
        if hashlib.new(algorithm, data).hexdigest() != expected:
            raise ImageImportError(f"{archive.label}: {what}: the blob does not match its digest {digest}")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageImportError(f"{archive.label}: {what} is not valid JSON: {e}") from None


def _read_blob_json(archive: _DirArchive | _TarArchive, descriptor: _Descriptor, what: str) -> dict:
    value = _read_json(archive, descriptor.blob, f"{what} {descriptor.digest}", descriptor.digest, descriptor.size)
    if not isinstance(value, dict):
        raise ImageImportError(f"{archive.label}: {what} {descriptor.digest} is not a JSON object")
    return value


def _host_platform() -> tuple[str, str]:
    machine = platform.machine()
    return "linux", {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _names(descriptor: _Descriptor) -> list[str]:
    return [str(descriptor.annotations[key]) for key in (REF_NAME, CONTAINERD_NAME) if key in descriptor.annotations]


def _choose(descriptors: list[_Descriptor], name: str | None, where: str) -> _Descriptor:
    if name is not None:
        named = [d for d in descriptors if name in _names(d)]
        if not named:
            known = sorted({n for d in descriptors for n in _names(d)})
            raise ImageImportError(f"{where}: no image named {name!r} (names: {', '.join(known) or 'none'})")
        descriptors = named
    if len(descriptors) == 1:
        return descriptors[0]
    if not descriptors:
        raise ImageImportError(f"{where}: lists no images")
    host_os, host_arch = _host_platform()
    for_host = [d for d in descriptors
                if d.platform.get("os") == host_os and d.platform.get("architecture") == host_arch]
    if len(for_host) == 1:
        return for_host[0]
    known = sorted({n for d in descriptors for n in _names(d)})
    raise ImageImportError(f"{where}: holds {len(descriptors)} images; name one as PATH:NAME "
                           f"(names: {', '.join(known) or 'none'})")


def _diff_ids(config: dict, what: str) -> list[str]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ImageImportError(f"{what}: rootfs.diff_ids is missing or not a list")
    for i, diff_id in enumerate(diff_ids):
        if not isinstance(diff_id, str) or not re.fullmatch(r"sha256:[a-f0-9]{64}", diff_id):
            raise ImageImportError(f"{what}: rootfs.diff_ids[{i}]: {diff_id!r} is not a sha256 digest")
    return diff_ids


def _image_config(config: dict, what: str) -> ImageConfig:
    """The runtime part of an image config (`config.config`: Env, WorkingDir, Entrypoint, Cmd, User, Labels)."""
    runtime = config.get("config") or {}
    if not isinstance(runtime, dict):
        raise ImageImportError(f"{what}: config is not a JSON object")
    working_dir = runtime.get("WorkingDir") or "/"
    if isinstance(working_dir, str) and not working_dir.startswith("/"):
        working_dir = "/" + working_dir  # relative to the root, as docker reads it
    try:
        return ImageConfig(env=runtime.get("Env") or (), working_dir=working_dir,
                           entrypoint=runtime.get("Entrypoint") or (), cmd=runtime.get("Cmd") or (),
                           user=runtime.get("User") or "", labels=runtime.get("Labels") or {})
    except ImageConfigError as e:
        raise ImageImportError(f"{what}: config.{_IMAGE_CONFIG_FIELDS[e.field]}{e.detail}") from None


def _plan_oci(archive: _DirArchive | _TarArchive, name: str | None) -> _ImagePlan:
    if archive.size("index.json") is None:
        raise ImageImportError(f"{archive.label}: neither an OCI image layout (index.json) nor a docker-archive "
                               "(manifest.json)")
    if archive.size("oci-layout") is not None:
        layout = _read_json(archive, "oci-layout", "oci-layout")
        if not isinstance(layout, dict) or not isinstance(layout.get("imageLayoutVersion"), str):
            raise ImageImportError(f"{archive.label}: oci-layout: imageLayoutVersion is missing")
    index = _read_json(archive, "index.json", "index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list):
        raise ImageImportError(f"{archive.label}: index.json: manifests is missing or not a list")
    descriptors = [_descriptor(m, f"index.json manifests[{i}]") for i, m in enumerate(manifests)]
    chosen = _choose(descriptors, name, f"{archive.label}: index.json")
    for _ in range(_NESTED_INDEX_DEPTH):
        if chosen.media_type not in INDEX_MEDIA_TYPES:
            break
        nested = _read_blob_json(archive, chosen, "image index")
        entries = nested.get("manifests")
        if not isinstance(entries, list):
            raise ImageImportError(f"{archive.label}: image index {chosen.digest}: manifests is not a list")
        where = f"image index {chosen.digest}"
        chosen = _choose([_descriptor(m, f"{where} manifests[{i}]") for i, m in enumerate(entries)], None,
                         f"{archive.label}: {where}")
    if chosen.media_type not in MANIFEST_MEDIA_TYPES:
        raise ImageImportError(f"{archive.label}: {chosen.digest}: media type {chosen.media_type!r} is not an "
                               "image manifest")
    manifest = _read_blob_json(archive, chosen, "manifest")
    where = f"manifest {chosen.digest}"
    config_descriptor = _descriptor(manifest.get("config"), f"{where} config")
    if config_descriptor.media_type not in CONFIG_MEDIA_TYPES:
        raise ImageImportError(f"{archive.label}: {where}: config media type {config_descriptor.media_type!r} is "
                               "not an image config")
    layer_list = manifest.get("layers")
    if not isinstance(layer_list, list):
        raise ImageImportError(f"{archive.label}: {where}: layers is missing or not a list")
    layers = [_descriptor(d, f"{where} layers[{i}]") for i, d in enumerate(layer_list)]
    config = _read_blob_json(archive, config_descriptor, "config")
    what = f"{archive.label}: config {config_descriptor.digest}"
    diff_ids = _diff_ids(config, what)
    if len(diff_ids) != len(layers):
        raise ImageImportError(f"{what}: {len(diff_ids)} diff_ids for the manifest's {len(layers)} layers")
    blobs = []
    for i, (layer, diff_id) in enumerate(zip(layers, diff_ids)):
        label = f"{archive.label}: layer {i} ({layer.digest})"
        if layer.media_type not in LAYER_MEDIA_TYPES:
            raise ImageImportError(f"{label}: media type {layer.media_type!r} is not a layer this importer reads")
        size = archive.size(layer.blob)
        if size is None:
            raise ImageImportError(f"{label}: the blob is missing ({layer.blob})")
        if size != layer.size:
            raise ImageImportError(f"{label}: the blob has {size} bytes, the manifest says {layer.size}")
        blobs.append(_LayerBlob(layer.blob, label, size, layer.media_type, layer.digest, diff_id))
    return _ImagePlan(_image_config(config, what), blobs)


def _repo_tag_matches(name: str, repo_tag: str) -> bool:
    """`name` is the whole RepoTags entry, its `name:tag` end after the registry and path, or its tag."""
    return name in (repo_tag, repo_tag.rpartition("/")[2], repo_tag.rpartition(":")[2])


def _plan_docker(archive: _DirArchive | _TarArchive, name: str | None) -> _ImagePlan:
    entries = _read_json(archive, "manifest.json", "manifest.json")
    if not isinstance(entries, list) or not entries:
        raise ImageImportError(f"{archive.label}: manifest.json is not a non-empty list of images")
    images = []
    for i, entry in enumerate(entries):
        where = f"{archive.label}: manifest.json[{i}]"
        if not isinstance(entry, dict):
            raise ImageImportError(f"{where}: not a JSON object")
        config_name, layer_names, repo_tags = entry.get("Config"), entry.get("Layers"), entry.get("RepoTags") or []
        if not isinstance(config_name, str):
            raise ImageImportError(f"{where}.Config: missing or not a string")
        if not isinstance(layer_names, list) or not all(isinstance(n, str) for n in layer_names):
            raise ImageImportError(f"{where}.Layers: missing or not a list of strings")
        if not isinstance(repo_tags, list) or not all(isinstance(t, str) for t in repo_tags):
            raise ImageImportError(f"{where}.RepoTags: not a list of strings")
        images.append((where, config_name, layer_names, repo_tags))
    if name is not None:
        images = [image for image in images if any(_repo_tag_matches(name, tag) for tag in image[3])]
    known = ", ".join(tag for entry in entries for tag in (entry.get("RepoTags") or [])) or "none"
    if not images:
        raise ImageImportError(f"{archive.label}: no image named {name!r} (names: {known})")
    if len(images) > 1:
        raise ImageImportError(f"{archive.label}: holds {len(images)} images"
                               f"{' of that name' if name else ''}; name one as PATH:NAME (names: {known})")
    where, config_name, layer_names, _ = images[0]
    config_path = _archive_name(config_name)
    if config_path is None:
        raise ImageImportError(f"{where}.Config: {config_name!r} points out of the archive")
    hex_name = _HEX_NAME.fullmatch(posixpath.basename(config_path))  # docker and podman name it by its digest
    config = _read_json(archive, config_path, f"config {config_name}",
                        digest=f"sha256:{hex_name.group(1)}" if hex_name else None)
    what = f"{archive.label}: config {config_name}"
    if not isinstance(config, dict):
        raise ImageImportError(f"{what}: not a JSON object")
    diff_ids = _diff_ids(config, what)
    if len(diff_ids) != len(layer_names):
        raise ImageImportError(f"{what}: {len(diff_ids)} diff_ids for the {len(layer_names)} layers of "
                               "manifest.json")
    blobs = []
    for i, (layer_name, diff_id) in enumerate(zip(layer_names, diff_ids)):
        label = f"{archive.label}: layer {i} ({layer_name})"
        layer_path = _archive_name(layer_name)
        if layer_path is None:
            raise ImageImportError(f"{label}: points out of the archive")
        size = archive.size(layer_path)
        if size is None:
            raise ImageImportError(f"{label}: the layer is missing")
        blobs.append(_LayerBlob(layer_path, label, size, OCI_LAYER_TAR, None, diff_id))
    return _ImagePlan(_image_config(config, what), blobs)


# -- applying -------------------------------------------------------------------------------------------------


def _prepare_dest(dest: str) -> bool:
    """Make `dest`, or check that it is an empty directory; return whether it was made."""
    try:
        os.mkdir(dest, 0o755)
        return True
    except FileExistsError:
        pass
    except OSError as e:
        raise ImageImportError(f"destination {dest}: {e.strerror}") from None
    if not os.path.isdir(dest) or os.listdir(dest):
        raise ImageImportError(f"destination {dest}: not an empty directory")
    return False


def _empty(dest: str, remove: bool) -> None:
    """Take back what an import put in `dest` (through a descriptor: links in the tree are never followed)."""
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for entry in os.listdir(fd):
            if stat.S_ISDIR(os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode):
                shutil.rmtree(entry, dir_fd=fd)
            else:
                os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    if remove:
        os.rmdir(dest)


def _apply_layers(archive: _DirArchive | _TarArchive, layers: list[_LayerBlob], dest: str,
                  progress: Callable[[int, int], None] | None, allow_devices: bool, limits: ImportLimits) -> None:
    total = sum(layer.size for layer in layers)
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total)

    budget = limits.max_total_bytes  # decompressed bytes left for all the layers together
    rootfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for layer in layers:
            algorithm = layer.digest.partition(":")[0] if layer.digest else None
            try:
                with archive.open(layer.name) as blob:
                    raw = MeteredReader(blob, what=layer.what, algorithm=algorithm, limit=layer.size,
                                        on_read=advance)
                    result = apply_layer_stream(raw, rootfd, label=layer.what, allow_devices=allow_devices,
                                                limits=limits, max_bytes=budget)
            except (OSError, tarfile.TarError, EOFError) as e:
                raise ImageImportError(f"{layer.what}: {e}") from None
            budget -= result.size
            if layer.digest is not None and f"{algorithm}:{raw.hexdigest()}" != layer.digest:
                raise ImageImportError(f"{layer.what}: the blob does not match its digest {layer.digest} "
                                       f"(it hashes to {algorithm}:{raw.hexdigest()}): corrupt or truncated")
            if result.diff_id != layer.diff_id:
                raise ImageImportError(f"{layer.what}: the uncompressed layer hashes to {result.diff_id}, the "
                                       f"config's rootfs.diff_ids says {layer.diff_id}: corrupt or truncated")
    finally:
        os.close(rootfd)
