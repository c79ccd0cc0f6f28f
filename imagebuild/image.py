"""The image definition language: immutable `Image` objects, each method returning a new Image with one more step.

    image = (Image.debian_slim(python="3.11")
             .apt_install("git", "curl")
             .pip_install("numpy==2.1.*")
             .env({"HF_HOME": "/cache"})
             .add_local_dir("./src", "/app")
             .workdir("/app"))
    result = image.build(store="/var/lib/coldbrew/store", progress=True)

Defining an image runs nothing and reads nothing: arguments are checked here (a bad one raises
ImageDefinitionError naming it), local files are read when the image is built. A step's `definition()` is what
its cache key hashes; local paths are not part of it, their contents are (see cache.step_key).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    from .build import BuildResult

# Debian suites by the Python version they ship as python3.
DEBIAN_PYTHON = {"3.11": "bookworm", "3.13": "trixie"}
DEBIAN_SLIM_PACKAGES = ("python3", "python3-pip", "python3-venv", "python-is-python3", "ca-certificates")
# Left out of debian_slim as Debian's own slim images leave them out (also from packages installed later).
DEBIAN_SLIM_DPKG_OPTIONS = ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
                            "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
                            "path-exclude=/usr/share/locale/*", "path-include=/usr/share/locale/locale.alias")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_APT_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.\-]*(:[a-z0-9-]+)?([=/][A-Za-z0-9.+~:\-]+)?")


class ImageBuildError(Exception):
    """Base class: anything coldbrew.imagebuild reports instead of a traceback."""


class ImageDefinitionError(ImageBuildError):
    """An image definition that cannot be built; the message names the method and the argument."""


@dataclass(frozen=True)
class Step:
    """One step of an image: `kind` (the Image method), its parameters (JSON values), and what it reads locally."""

    kind: str
    params: tuple[tuple[str, Any], ...]
    local_path: str | None = None  # a file or directory read at build time (its content digest is an input)
    force_build: bool = False

    def param(self, name: str) -> Any:
        return dict(self.params)[name]

    def definition(self) -> dict:
        """What identifies the step for the cache (force_build and the local path are not part of it)."""
        return {"kind": self.kind, **{key: _jsonable(value) for key, value in self.params}}

    @property
    def is_base(self) -> bool:
        return self.kind in BASE_KINDS

    @property
    def changes_config_only(self) -> bool:
        return self.kind in ("env", "entrypoint", "cmd")

    def describe(self) -> str:
        """The step as one line, for logs and errors."""
        params = dict(self.params)
        if self.kind == "debian_slim":
            return f"debian_slim(python={params['python']!r}) [{params['suite']}]"
        if self.kind in ("from_oci", "from_dir", "pip_install_from_requirements"):
            return f"{self.kind}({self.local_path!r})"
        if self.kind in ("apt_install", "pip_install"):
            return f"{self.kind} {' '.join(params['packages'])}"
        if self.kind == "run_commands":
            return "run_commands " + " && ".join(params["commands"])
        if self.kind == "env":
            return "env " + " ".join(f"{key}={value}" for key, value in params["vars"])
        if self.kind in ("add_local_file", "add_local_dir"):
            return f"{self.kind} {self.local_path} -> {params['remote']}"
        if self.kind == "workdir":
            return f"workdir {params['path']}"
        return f"{self.kind} {json.dumps(list(params['args']))}"


BASE_KINDS = ("debian_slim", "from_oci", "from_dir")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    return value


def _strings(method: str, argument: str, values: Iterable[Any], *, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)):
        values = (values,)
    result = tuple(values)
    if not result and not allow_empty:
        raise ImageDefinitionError(f"{method}: {argument} is empty")
    for value in result:
        if not isinstance(value, str) or not value or "\0" in value:
            raise ImageDefinitionError(f"{method}: {argument} must be non-empty strings without NUL, got {value!r}")
    return result


def _absolute(method: str, argument: str, path: Any) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ImageDefinitionError(f"{method}: {argument} must be an absolute path in the image, got {path!r}")
    normal = posixpath.normpath(path)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    return normal


def _packages(method: str, packages: tuple[Any, ...], pattern: re.Pattern | None) -> tuple[str, ...]:
    names = _strings(method, "packages", packages)
    for name in names:
        if name.startswith("-") or any(c.isspace() for c in name):
            raise ImageDefinitionError(f"{method}: {name!r} is not a package (no options, no whitespace)")
        if pattern is not None and not pattern.fullmatch(name):
            raise ImageDefinitionError(f"{method}: {name!r} is not a Debian package name (name[:arch][=version])")
    return names


class Image:
    """An image definition: a base, then steps. Immutable; every method returns a new Image."""

    __slots__ = ("_steps",)

    def __init__(self, steps: tuple[Step, ...]) -> None:
        if not steps or not steps[0].is_base or any(step.is_base for step in steps[1:]):
            raise ImageDefinitionError("an image starts with exactly one base: Image.debian_slim(), "
                                       "Image.from_oci() or Image.from_dir()")
        self._steps = steps

    @property
    def steps(self) -> tuple[Step, ...]:
        return self._steps

    def __repr__(self) -> str:
        return "Image(" + " | ".join(step.describe() for step in self._steps) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Image) and other._steps == self._steps

    def __hash__(self) -> int:
        return hash(self._steps)

    def _with(self, step: Step) -> "Image":
        return Image(self._steps + (step,))

    # -- bases ---------------------------------------------------------------------------------------------------

    @staticmethod
    def debian_slim(python: str = "3.11", *, force_build: bool = False) -> "Image":
        """A minimal Debian (mmdebstrap's minbase) with the suite's python3 (also as `python`), pip and venv, and CA
        certificates; documentation and translations left out. The suite is the Debian release whose python3 is
        `python`."""
        suite = DEBIAN_PYTHON.get(python)
        if suite is None:
            raise ImageDefinitionError(f"debian_slim: python {python!r} is not a Debian release's python3; "
                                       f"choose one of {', '.join(DEBIAN_PYTHON)}")
        params = (("python", python), ("suite", suite), ("variant", "minbase"), ("packages", DEBIAN_SLIM_PACKAGES),
                  ("dpkg_options", DEBIAN_SLIM_DPKG_OPTIONS))
        return Image((Step("debian_slim", params, None, force_build),))

    @staticmethod
    def from_oci(path: str, *, name: str | None = None, force_build: bool = False) -> "Image":
        """An image from an OCI image layout directory, an oci-archive or a docker-archive tarball (`docker save`,
        `podman save`); `name` picks one of several images in it (a ref name, or a repo:tag)."""
        if name is not None and (not isinstance(name, str) or not name or "\0" in name):
            raise ImageDefinitionError(f"from_oci: name must be a non-empty string, got {name!r}")
        return Image((Step("from_oci", (("name", name),), _local("from_oci", path), force_build),))

    @staticmethod
    def from_dir(path: str, *, force_build: bool = False) -> "Image":
        """An image whose tree is a local directory, taken as it is (owners, modes, times)."""
        return Image((Step("from_dir", (), _local("from_dir", path), force_build),))

    # -- steps ---------------------------------------------------------------------------------------------------

    def apt_install(self, *packages: str, force_build: bool = False) -> "Image":
        """apt-get install (no recommends) in a container; the package lists are not kept in the image."""
        names = _packages("apt_install", packages, _APT_PACKAGE)
        return self._with(Step("apt_install", (("packages", names),), None, force_build))

    def pip_install(self, *packages: str, force_build: bool = False) -> "Image":
        """pip install into the image's python3, in a container (requirement specifiers: "numpy==2.1.*")."""
        names = _packages("pip_install", packages, None)
        return self._with(Step("pip_install", (("packages", names),), None, force_build))

    def pip_install_from_requirements(self, path: str, *, force_build: bool = False) -> "Image":
        """pip install -r of a local requirements file (its contents are part of the step's cache key)."""
        return self._with(Step("pip_install_from_requirements", (), _local("pip_install_from_requirements", path),
                               force_build))

    def run_commands(self, *commands: str, force_build: bool = False) -> "Image":
        """Shell commands (/bin/sh -c), one after another in one step; the first to fail fails the build."""
        return self._with(Step("run_commands", (("commands", _strings("run_commands", "commands", commands)),),
                               None, force_build))

    def env(self, variables: Mapping[str, str], *, force_build: bool = False) -> "Image":
        """Set environment variables for later steps and for containers of the image."""
        if not isinstance(variables, Mapping) or not variables:
            raise ImageDefinitionError(f"env: expected a non-empty mapping of names to strings, got {variables!r}")
        items = []
        for name, value in sorted(variables.items()):
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                raise ImageDefinitionError(f"env: {name!r} is not a variable name")
            if not isinstance(value, str) or "\0" in value:
                raise ImageDefinitionError(f"env: the value of {name} must be a string without NUL, got {value!r}")
            items.append((name, value))
        return self._with(Step("env", (("vars", tuple(items)),), None, force_build))

    def workdir(self, path: str, *, force_build: bool = False) -> "Image":
        """The working directory of later steps and of containers (made if missing)."""
        return self._with(Step("workdir", (("path", _absolute("workdir", "path", path)),), None, force_build))

    def add_local_file(self, local_path: str, remote_path: str, *, force_build: bool = False) -> "Image":
        """Copy a local file to `remote_path` in the image (owned by root, its mode and time kept)."""
        return self._with(Step("add_local_file", (("remote", _absolute("add_local_file", "remote_path",
                                                                        remote_path)),),
                               _local("add_local_file", local_path), force_build))

    def add_local_dir(self, local_path: str, remote_path: str, *, force_build: bool = False) -> "Image":
        """Copy a local directory's contents into `remote_path` (merged with what is there; owned by root)."""
        return self._with(Step("add_local_dir", (("remote", _absolute("add_local_dir", "remote_path",
                                                                       remote_path)),),
                               _local("add_local_dir", local_path), force_build))

    def entrypoint(self, args: Iterable[str], *, force_build: bool = False) -> "Image":
        """The program containers of the image run (with `cmd` as its default arguments)."""
        return self._with(Step("entrypoint", (("args", _strings("entrypoint", "args", args, allow_empty=True)),),
                               None, force_build))

    def cmd(self, args: Iterable[str], *, force_build: bool = False) -> "Image":
        """The default command (or, with an entrypoint, its default arguments)."""
        return self._with(Step("cmd", (("args", _strings("cmd", "args", args, allow_empty=True)),), None,
                               force_build))

    # -- building ------------------------------------------------------------------------------------------------

    def build(self, store: str, **options: Any) -> "BuildResult":
        """Build the image into `store` (a directory or an http(s) URL); see coldbrew.imagebuild.build.build_image
        for the options (name, progress, log, access, force_build, ...)."""
        from .build import build_image

        return build_image(self, store, **options)


def _local(method: str, path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ImageDefinitionError(f"{method}: expected a local path, got {path!r}")
    return os.path.abspath(os.fspath(path))
