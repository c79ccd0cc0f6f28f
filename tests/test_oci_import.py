"""OCI image import (coldbrew.imagebuild.oci): images made by real tools (umoci, skopeo, buildah, podman) import to
the tree `umoci unpack` makes of them; hand-made layers pin down whiteouts, opaque directories, hard links and
compression; hostile archives are refused or neutralised with the host untouched; a property test checks random
layer sequences against a model of what they mean."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import uuid
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coldbrew.bench.bundles import make_rootfs
from coldbrew.fs.mounts import mounts_below
from coldbrew.imagebuild.oci import ImageConfig, ImageImportError, ImportLimits, apply_layer, import_oci
from conftest import HostPaths

TOOLS = ("umoci", "skopeo", "buildah", "podman")
needs_tools = pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS),
                                 reason=f"needs {', '.join(TOOLS)} (scripts/setup installs them)")
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"

# ---- helpers: trees ----------------------------------------------------------------------------------------


def snapshot(root: Path, *, xattrs: bool = True, dir_mtimes: bool = True) -> tuple[dict, list]:
    """Everything an image tree means, per path: type, mode, owner, content hash, symlink target, mtime,
    xattrs; and the groups of hard-linked paths."""
    entries: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st_ = os.lstat(path)
            entry: list = [stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid]
            if stat.S_ISREG(st_.st_mode):
                entry += [st_.st_size, hashlib.sha256(Path(path).read_bytes()).hexdigest()]
                inodes.setdefault(st_.st_ino, []).append(rel)
            elif stat.S_ISLNK(st_.st_mode):
                entry.append(os.readlink(path))
            elif stat.S_ISCHR(st_.st_mode) or stat.S_ISBLK(st_.st_mode):
                entry.append(st_.st_rdev)
            if dir_mtimes or not stat.S_ISDIR(st_.st_mode):
                entry.append(st_.st_mtime_ns)
            if xattrs:
                entry.append(sorted((a, os.getxattr(path, a, follow_symlinks=False))
                                    for a in os.listxattr(path, follow_symlinks=False)))
            entries[rel] = tuple(entry)
    return entries, sorted(sorted(group) for group in inodes.values() if len(group) > 1)


def assert_same_tree(got: Path, expected: Path, **options: bool) -> None:
    got_entries, got_links = snapshot(got, **options)
    expected_entries, expected_links = snapshot(expected, **options)
    differences = {path: (got_entries.get(path), expected_entries.get(path))
                   for path in set(got_entries) | set(expected_entries)
                   if got_entries.get(path) != expected_entries.get(path)}
    assert not differences, differences
    assert got_links == expected_links
    assert len(got_entries) > 0


def listing(root: Path) -> dict[str, tuple]:
    """What the host side of a hostile test must keep: names, modes, link counts, mtimes, contents."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            content = Path(path).read_bytes() if stat.S_ISREG(st_.st_mode) else None
            result[os.path.relpath(path, root)] = (st_.st_mode, st_.st_nlink, st_.st_mtime_ns, content)
    return result


# ---- helpers: hand-made layers and images ------------------------------------------------------------------


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644, **fields) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mtime = fields.pop("mtime", 1_700_000_000)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def file(name: str, data: bytes = b"", mode: int = 0o644, **fields) -> tuple:
    return entry(name, tarfile.REGTYPE, data, mode, **fields)


def directory(name: str, mode: int = 0o755, **fields) -> tuple:
    return entry(name, tarfile.DIRTYPE, mode=mode, **fields)


def symlink(name: str, target: str) -> tuple:
    return entry(name, tarfile.SYMTYPE, mode=0o777, linkname=target)


def hardlink(name: str, target: str) -> tuple:
    return entry(name, tarfile.LNKTYPE, linkname=target)


def whiteout(path: str) -> tuple:
    parent, _, name = path.rpartition("/")
    return file(f"{parent}/.wh.{name}" if parent else f".wh.{name}")


def opaque(directory_: str) -> tuple:
    return file(f"{directory_}/.wh..wh..opq" if directory_ else ".wh..wh..opq")


def device(name: str, kind: bytes, major: int, minor: int) -> tuple:
    return entry(name, kind, mode=0o600, devmajor=major, devminor=minor)


def layer(*entries: tuple, compression: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    raw = buffer.getvalue()
    if compression == "gzip":
        return gzip.compress(raw)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _decompressed(blob: bytes) -> bytes:
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return blob


def image_config(diff_ids: list[str], runtime: dict | None = None) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": runtime or {},
                       "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()


def write_layout(root: Path, layers: list[bytes], *, runtime: dict | None = None, names: tuple[str, ...] = ("t",),
                 media_types: list[str] | None = None) -> dict:
    """A hand-made OCI image layout with one manifest per name (all of the same image); returns its manifest."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict:
        (blobs / sha256(data).split(":")[1]).write_bytes(data)
        return {"digest": sha256(data), "size": len(data)}

    config = image_config([sha256(_decompressed(b)) for b in layers], runtime)
    media_types = media_types or [OCI_TAR + {b"\x1f\x8b": "+gzip", b"\x28\xb5": "+zstd"}.get(b[:2], "")
                                  for b in layers]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
                "layers": [{"mediaType": m, **put(b)} for m, b in zip(media_types, layers)]}
    manifest_descriptor = {"mediaType": manifest["mediaType"], **put(json.dumps(manifest).encode())}
    index = {"schemaVersion": 2, "manifests": [
        {**manifest_descriptor, "annotations": {"org.opencontainers.image.ref.name": n}} for n in names]}
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return manifest


def write_docker_archive(path: Path, layers: list[bytes], *, runtime: dict | None = None,
                         repo_tags: list[str] | None = None) -> None:
    config = image_config([sha256(b) for b in layers], runtime)
    members = {f"{hashlib.sha256(config).hexdigest()}.json": config}
    for i, data in enumerate(layers):
        members[f"layer{i}/layer.tar"] = data
    members["manifest.json"] = json.dumps([{"Config": next(iter(members)), "RepoTags": repo_tags or ["x/y:1"],
                                            "Layers": [f"layer{i}/layer.tar" for i in range(len(layers))]}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def manifest_of(layout: Path) -> dict:
    """The manifest of a layout's first image."""
    index = json.loads((layout / "index.json").read_text())
    return json.loads(blob_path(layout, index["manifests"][0]["digest"]).read_text())


# ---- images made by real tools -----------------------------------------------------------------------------


def _run(*args: str | Path) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(map(str, args))}: {result.stderr}"
    return result.stdout


def _unmount_below(base: Path) -> None:
    for point in mounts_below(os.path.realpath(base)):
        subprocess.run(["umount", "-l", point], check=False)


class RealImages:
    """A umoci image of three layers (files, hard links, a setuid file, xattrs, a fifo, a non-UTF-8 name, a
    large file; then deletions, a directory replaced by a file and back, a hard link to a lower file; then a
    config), its copies by skopeo, a buildah overlay commit with an opaque directory, and a podman save."""

    def __init__(self, base: Path, short: Path) -> None:
        self.base = base
        self.layout = base / "layout"      # lower case: buildah takes the path as an image name
        self.bundle = base / "bundle"
        rootfs = self.bundle / "rootfs"
        _run("umoci", "init", "--layout", self.layout)
        _run("umoci", "new", "--image", f"{self.layout}:t")
        _run("umoci", "unpack", "--image", f"{self.layout}:t", self.bundle)
        make_rootfs(rootfs)
        (rootfs / "data/sub").mkdir(parents=True)
        (rootfs / "opt/app").mkdir(parents=True)
        (rootfs / "data/a").write_text("hello\n")
        (rootfs / "data/turn").write_text("a file, then a directory\n")
        (rootfs / "data/sub/b").write_text("two\n")
        (rootfs / "data/sub/kept").write_text("hidden by buildah's opaque directory\n")
        (rootfs / "opt/app/x").write_text("x\n")
        (rootfs / "data/big").write_bytes(os.urandom(3 << 20))
        (rootfs / ("d" * 120)).write_text("a long name\n")
        os.link(rootfs / "data/a", rootfs / "data/a-link")
        os.chown(rootfs / "data/sub/b", 1000, 1001)
        os.chmod(rootfs / "opt/app/x", 0o4755)
        os.chmod(rootfs / "data/sub", 0o700)
        os.setxattr(rootfs / "bin/busybox", "user.note", b"\x00binary\xff")
        os.mkfifo(rootfs / "data/fifo")
        (rootfs / os.fsdecode(b"data/caf\xe9")).write_text("latin-1 name\n")
        os.symlink("../data/a", rootfs / "etc/alink")
        _run("umoci", "repack", "--refresh-bundle", "--image", f"{self.layout}:t", self.bundle)
        (rootfs / "data/sub/b").unlink()
        shutil.rmtree(rootfs / "opt/app")
        (rootfs / "opt/app").write_text("now a file\n")
        (rootfs / "data/turn").unlink()
        (rootfs / "data/turn").mkdir()
        (rootfs / "data/turn/inside").write_text("in\n")
        os.link(rootfs / "data/a", rootfs / "etc/a-hard")
        (rootfs / "etc/alink").unlink()
        os.symlink("/data/big", rootfs / "etc/alink")
        _run("umoci", "repack", "--refresh-bundle", "--image", f"{self.layout}:t", self.bundle)
        _run("umoci", "config", "--image", f"{self.layout}:t", "--config.env", "FOO=bar", "--config.env", "A=b=c",
             "--config.entrypoint", "/bin/sh", "--config.cmd", "-c", "--config.cmd", "echo hi",
             "--config.workingdir", "/data", "--config.user", "1000:1000", "--config.label", "k=v")
        _run("umoci", "tag", "--image", f"{self.layout}:t", "t2")
        self.oracle = base / "oracle"
        _run("umoci", "unpack", "--image", f"{self.layout}:t", self.oracle)

        self.docker_archive = base / "docker.tar"
        self.oci_archive = base / "oci.tar"
        self.zstd_layout = base / "zstd"
        _run("skopeo", "copy", "-q", f"oci:{self.layout}:t", f"docker-archive:{self.docker_archive}:localhost/demo:v1")
        _run("skopeo", "copy", "-q", f"oci:{self.layout}:t", f"oci-archive:{self.oci_archive}:t")
        _run("skopeo", "copy", "-q", "--dest-compress-format", "zstd", f"oci:{self.layout}:t",
             f"oci:{self.zstd_layout}:t")

        # buildah's overlay driver: a directory removed and made again is opaque in the upper directory, and the
        # committed layer carries `.wh..wh..opq`
        buildah = ["buildah", "--root", base / "buildah", "--runroot", base / "buildah-run", "--storage-driver",
                   "overlay"]
        container = _run(*buildah, "from", "-q", "--name", "w", f"oci:{self.layout}:t").strip()
        mount = Path(_run(*buildah, "mount", container).strip())
        shutil.rmtree(mount / "data/sub")
        (mount / "data/sub").mkdir()
        (mount / "data/sub/c").write_text("fresh\n")
        (mount / "etc/group").unlink()
        _run(*buildah, "umount", container)
        self.buildah_layout = base / "buildah-out"
        _run(*buildah, "commit", "-q", container, f"oci:{self.buildah_layout}:t")
        _run(*buildah, "rm", container)
        self.buildah_oracle = base / "buildah-oracle"
        _run("umoci", "unpack", "--image", f"{self.buildah_layout}:t", self.buildah_oracle)

        self.podman_tree = self.oracle / "rootfs"
        tarball = base / "tree.tar"
        _run("tar", "-C", self.podman_tree, "--xattrs", "--xattrs-include=*", "-cf", tarball, ".")
        # podman refuses a run root of more than 50 characters: `short` is a directory of its own in /tmp
        podman = ["podman", "--root", short / "root", "--runroot", short / "run", "--tmpdir", short / "tmp",
                  "--network-backend", "cni", "--network-config-dir", short / "net", "--storage-driver", "vfs",
                  "--events-backend", "none", "--cgroup-manager", "cgroupfs"]
        _run(*podman, "import", "-q", "--change", "ENV=P=1", "--change", "WORKDIR=/data", "--change",
             'ENTRYPOINT=["/bin/sh"]', tarball, "localhost/pm:1")
        self.podman_archive = base / "podman.tar"
        _run(*podman, "save", "-q", "--format", "docker-archive", "-o", self.podman_archive, "localhost/pm:1")


@pytest.fixture(scope="session")
def real_images(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("real-images")
    short = Path(tempfile.mkdtemp(prefix="cb-oci-"))
    # what skopeo, buildah and podman make outside their private directories (blob info cache, netavark, libpod)
    host = HostPaths(["/var/lib/containers", "/run/containers", "/etc/containers/networks", "/run/libpod"])
    try:
        yield RealImages(base, short)
    finally:
        for directory_ in (base, short):
            _unmount_below(directory_)
            shutil.rmtree(directory_, ignore_errors=True)
        host.remove()


EXPECTED_CONFIG = ImageConfig(env=("FOO=bar", "A=b=c"), working_dir="/data", entrypoint=("/bin/sh",),
                              cmd=("-c", "echo hi"), user="1000:1000", labels={"k": "v"})


@needs_tools
def test_umoci_layout_imports_as_umoci_unpacks_it(real_images: RealImages, tmp_path: Path):
    layers = manifest_of(real_images.layout)["layers"]
    assert len(layers) == 2 and all(lay["mediaType"].endswith("+gzip") for lay in layers)
    config = import_oci(f"{real_images.layout}:t", str(tmp_path / "root"))
    assert config == EXPECTED_CONFIG
    assert_same_tree(tmp_path / "root", real_images.oracle / "rootfs")
    root = tmp_path / "root"
    assert not (root / "data/sub/b").exists() and (root / "opt/app").is_file() and (root / "data/turn/inside").is_file()
    assert os.stat(root / "etc/a-hard").st_ino == os.stat(root / "data/a").st_ino
    assert os.stat(root / "opt/app").st_mode & 0o7777 == 0o644
    assert os.getxattr(root / "bin/busybox", "user.note") == b"\x00binary\xff"


@needs_tools
@pytest.mark.parametrize("source", ["docker_archive", "docker_archive:v1", "docker_archive:localhost/demo:v1",
                                    "oci_archive", "oci_archive:t", "zstd_layout:t"])
def test_skopeo_copies_import_the_same_tree(real_images: RealImages, tmp_path: Path, source: str):
    attribute, _, name = source.partition(":")
    path = getattr(real_images, attribute)
    if attribute == "zstd_layout":
        assert all(lay["mediaType"].endswith("+zstd") for lay in manifest_of(path)["layers"])
    config = import_oci(f"{path}:{name}" if name else str(path), str(tmp_path / "root"))
    assert config == EXPECTED_CONFIG
    assert_same_tree(tmp_path / "root", real_images.oracle / "rootfs")


@needs_tools
def test_buildah_overlay_commit_with_opaque_directory(real_images: RealImages, tmp_path: Path):
    top_digest = manifest_of(real_images.buildah_layout)["layers"][-1]["digest"]
    with tarfile.open(blob_path(real_images.buildah_layout, top_digest)) as top:
        assert "data/sub/.wh..wh..opq" in top.getnames()  # the layer really is an opaque one
    import_oci(str(real_images.buildah_layout), str(tmp_path / "root"))
    assert_same_tree(tmp_path / "root", real_images.buildah_oracle / "rootfs")
    assert sorted(os.listdir(tmp_path / "root/data/sub")) == ["c"]
    assert not (tmp_path / "root/etc/group").exists()


@needs_tools
def test_podman_save_docker_archive(real_images: RealImages, tmp_path: Path):
    config = import_oci(str(real_images.podman_archive), str(tmp_path / "root"))
    assert (config.env[-1], config.working_dir, config.entrypoint) == ("P=1", "/data", ("/bin/sh",))
    # podman import keeps names, types, modes, owners, contents and links; not xattrs nor directory mtimes
    assert_same_tree(tmp_path / "root", real_images.podman_tree, xattrs=False, dir_mtimes=False)


@needs_tools
def test_several_images_need_a_name(real_images: RealImages, tmp_path: Path):
    with pytest.raises(ImageImportError, match=r"holds 2 images; name one as PATH:NAME \(names: t, t2\)"):
        import_oci(str(real_images.layout), str(tmp_path / "a"))
    with pytest.raises(ImageImportError, match=r"no image named 'nope' \(names: t, t2\)"):
        import_oci(f"{real_images.layout}:nope", str(tmp_path / "a"))
    with pytest.raises(ImageImportError, match=r"no image named 'v2' \(names: localhost/demo:v1\)"):
        import_oci(f"{real_images.docker_archive}:v2", str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    assert import_oci(f"{real_images.layout}:t2", str(tmp_path / "b")) == EXPECTED_CONFIG


@needs_tools
def test_progress_reports_blob_bytes(real_images: RealImages, tmp_path: Path):
    calls: list[tuple[int, int]] = []
    import_oci(str(real_images.oci_archive), str(tmp_path / "root"), progress=lambda d, t: calls.append((d, t)))
    total = calls[-1][1]
    assert calls[-1] == (total, total) and total > 3 << 20  # the random 3 MiB file does not compress
    assert all(a[0] < b[0] and a[1] == total for a, b in zip(calls, calls[1:]))


# ---- hand-made layers: what they mean ----------------------------------------------------------------------


LOWER = layer(directory("etc"), file("etc/keep", b"k"), file("etc/gone", b"g"), directory("var"),
              directory("var/cache"), file("var/cache/x", b"x"), directory("var/cache/deep"),
              file("var/cache/deep/y", b"y"), directory("usr"), file("usr/lib.so", b"lib", mode=0o755),
              directory("opq"), file("opq/old", b"old"), directory("opq/olddir"), file("opq/olddir/f", b"f"),
              directory("opq/kept"), file("opq/kept/lower", b"lower"), file("ovl", b"overlay whiteout target"))


def test_whiteouts_opaque_directories_and_links_across_layers(tmp_path: Path):
    upper = layer(
        whiteout("etc/gone"), whiteout("var/cache"),  # a file and a whole directory of the lower layer
        directory("opq"), directory("opq/kept"), file("opq/kept/new", b"new"), file("opq/new", b"n"),
        opaque("opq"),  # after this layer's own entries: they stay, the lower ones go, wherever it stands
        hardlink("etc/lib-link", "usr/lib.so"),  # to a file of the lower layer
        device("ovl", tarfile.CHRTYPE, 0, 0),  # overlayfs's whiteout form
        file(".wh..wh.plnk"),  # aufs bookkeeping: skipped
        file("etc/keep", b"replaced", mode=0o600),
        compression="gzip")
    root = tmp_path / "root"
    root.mkdir()
    apply_layer(io.BytesIO(LOWER), str(root))
    apply_layer(io.BytesIO(upper), str(root), media_type=OCI_TAR + "+gzip")
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "etc", "etc/keep", "etc/lib-link", "opq", "opq/kept", "opq/kept/new", "opq/new", "usr", "usr/lib.so", "var"]
    assert os.stat(root / "etc/lib-link").st_ino == os.stat(root / "usr/lib.so").st_ino
    assert (root / "etc/keep").read_bytes() == b"replaced"
    assert os.stat(root / "etc/keep").st_mode & 0o777 == 0o600


def test_whiteout_does_not_hide_its_own_layer(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    apply_layer(io.BytesIO(layer(directory("d"), file("d/lower", b"1"), file("f", b"lower"))), str(root))
    # a directory and a file written, then whited out in the same layer: only the lower versions go
    apply_layer(io.BytesIO(layer(directory("d"), file("d/upper", b"2"), whiteout("d"), file("f", b"upper"),
                                 whiteout("f"))), str(root))
    assert sorted(os.listdir(root / "d")) == ["upper"]
    assert (root / "f").read_bytes() == b"upper"


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_compressions_are_told_by_magic_bytes(tmp_path: Path, compression: str | None):
    data = layer(directory("a"), file("a/b", os.urandom(200_000)), compression=compression)
    path = tmp_path / "layer"
    path.write_bytes(data)
    root = tmp_path / "root"
    root.mkdir()
    apply_layer(str(path), str(root))  # the media type says plain tar; the bytes say otherwise
    assert (root / "a/b").stat().st_size == 200_000


def test_metadata_from_pax_headers(tmp_path: Path):
    info, _ = file("f", b"data", mode=0o4750, uid=1234, gid=5678)
    info.pax_headers = {"mtime": "1700000000.123456789", "SCHILY.xattr.user.k": "v\udcff",
                        "SCHILY.xattr.trusted.overlay.opaque": "y"}
    link_info, _ = symlink("s", "f")
    link_info.uid, link_info.gid = 42, 43
    root = tmp_path / "root"
    root.mkdir()
    apply_layer(io.BytesIO(layer((info, b"data"), (link_info, b""), entry("p", tarfile.FIFOTYPE, mode=0o640),
                                 directory("d", mode=0o1777, mtime=1_600_000_000), file("d/x"))), str(root))
    st_ = os.stat(root / "f")
    assert (stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid) == (0o4750, 1234, 5678)
    assert st_.st_mtime_ns == 1_700_000_000_123_456_789
    assert os.getxattr(root / "f", "user.k") == b"v\xff"
    assert os.listxattr(root / "f") == ["user.k"]  # overlayfs's own attributes are dropped
    assert (os.lstat(root / "s").st_uid, os.readlink(root / "s")) == (42, "f")
    assert stat.S_ISFIFO(os.lstat(root / "p").st_mode) and os.lstat(root / "p").st_mode & 0o777 == 0o640
    assert os.lstat(root / "d").st_mode & 0o7777 == 0o1777
    assert os.lstat(root / "d").st_mtime_ns == 1_600_000_000 * 10**9  # set after its child was written


def test_devices_refused_unless_allowed(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    for kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        with pytest.raises(ImageImportError, match=r"member 'dev/x': a device node \(refused"):
            apply_layer(io.BytesIO(layer(directory("dev"), device("dev/x", kind, 1, 3))), str(root))
    assert not (root / "dev/x").exists()
    apply_layer(io.BytesIO(layer(device("null", tarfile.CHRTYPE, 1, 3), device("blk", tarfile.BLKTYPE, 7, 0))),
                str(root), allow_devices=True)
    assert os.lstat(root / "null").st_rdev == os.makedev(1, 3) and stat.S_ISBLK(os.lstat(root / "blk").st_mode)


# ---- hostile layers ----------------------------------------------------------------------------------------


@pytest.fixture
def arena(tmp_path: Path):
    """`root` to import into, next to a canary directory with a secret file: both inside tmp_path, whose whole
    listing must not change except inside root."""
    outer = tmp_path / "outer"
    canary = outer / "canary"
    canary.mkdir(parents=True)
    (canary / "secret").write_text("secret")
    root = outer / "root"
    root.mkdir()
    host_marker = Path(f"/coldbrew-canary-{uuid.uuid4().hex[:8]}")
    before = {k: v for k, v in listing(tmp_path).items() if not k.startswith("outer/root")}
    yield root, canary, host_marker
    after = {k: v for k, v in listing(tmp_path).items() if not k.startswith("outer/root")}
    escaped = host_marker.exists()
    if escaped:
        host_marker.unlink()
    assert not escaped, f"{host_marker} was written on the host"
    assert after == before


def hostile_cases(canary: Path, host_marker: Path) -> list[tuple[str, list[bytes], str | None]]:
    """(what, layers, the error expected or None where the layer is neutralised instead)."""
    return [
        ("symlink to / then a write through it", [layer(symlink("etc", "/"), file(f"etc/{host_marker.name}"))],
         None),
        ("symlink to a host directory then a write", [layer(symlink("e", str(canary)), file("e/pwned"))],
         "is a symlink to nothing"),
        ("symlink to a host file then the same name", [layer(symlink("x", str(canary / "secret")),
                                                            file("x", b"overwritten?"))], None),
        ("relative symlink climbing out then a write", [layer(symlink("up", "../../.."), file("up/outer/pwned"))],
         None),
        ("symlink in a lower layer", [layer(symlink("d", str(canary))), layer(directory("d"), file("d/secret"))],
         None),
        ("dot-dot member", [layer(file("../escape"))], r"a '\.\.' component"),
        ("dot-dot inside a member", [layer(directory("a"), file("a/../../escape"))], r"a '\.\.' component"),
        ("absolute member", [layer(file(f"/{canary}/secret", b"abs"))], None),
        ("hard link out by dot-dot", [layer(hardlink("h", "../canary/secret"))], r"a '\.\.' component"),
        ("hard link to an absolute host path", [layer(hardlink("h", f"{canary}/secret"))], "does not exist"),
        ("hard link through a symlink", [layer(symlink("s", str(canary)), hardlink("h", "s/secret"))],
         "does not exist"),
        ("whiteout through a symlink", [layer(symlink("w", str(canary.parent))), layer(whiteout("w/canary"))],
         None),
        ("opaque through a symlink", [layer(symlink("o", str(canary))), layer(opaque("o"))], None),
        ("whiteout of the parent", [layer(directory("a"), file("a/.wh.."))], "a whiteout of the directory"),
        ("whiteout of itself", [layer(file(".wh."))], "a whiteout of the directory"),
        ("whiteout name on a directory", [layer(directory(".wh.x"))], "a non-regular entry with a whiteout name"),
        ("symlink loop as a parent", [layer(symlink("l1", "l2"), symlink("l2", "l1"), file("l1/x"))],
         "Too many levels of symbolic links"),
        ("file over a directory's name", [layer(file("f"), file("f/x"))], "is not a directory"),
        ("hard link replacing the directory of its target", [layer(directory("d"), file("d/f"), hardlink("d", "d/f"))],
         "hard link target 'd/f' is inside the entry the link replaces"),
    ]


CASE_NAMES = [case[0] for case in hostile_cases(Path("/c"), Path("/m"))]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_hostile_layers_leave_the_host_untouched(arena, case: str):
    root, canary, host_marker = arena
    _, layers, error = next(c for c in hostile_cases(canary, host_marker) if c[0] == case)
    if error is None:
        for data in layers:
            apply_layer(io.BytesIO(data), str(root))
    else:
        with pytest.raises(ImageImportError, match=error):
            for data in layers:
                apply_layer(io.BytesIO(data), str(root))
    if case == "symlink to / then a write through it":
        assert (root / host_marker.name).is_file()  # resolved as inside the container: ROOT/NAME
    if case == "symlink to a host file then the same name":
        assert (root / "x").read_bytes() == b"overwritten?" and not (root / "x").is_symlink()
    if case == "relative symlink climbing out then a write":
        assert (root / "outer/pwned").is_file()  # `..` stops at the root, as inside the container
    if case == "absolute member":
        assert (root / str(canary).lstrip("/") / "secret").read_bytes() == b"abs"


def test_oversized_headers_and_entries_are_refused(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    big_pax, _ = file("f")
    big_pax.pax_headers = {"comment": "x" * (2 << 20)}
    with pytest.raises(ImageImportError, match=r"layer stream: in the first header: an extended tar header of"):
        apply_layer(io.BytesIO(layer((big_pax, b""))), str(root))
    long_name = layer(file("/".join(["n" * 150] * 20)))  # a PAX path record of about 3 KiB
    apply_layer(io.BytesIO(long_name), str(root), limits=ImportLimits(max_header_bytes=4096))
    with pytest.raises(ImageImportError, match="an extended tar header"):
        apply_layer(io.BytesIO(long_name), str(root), limits=ImportLimits(max_header_bytes=2048))
    # a header that claims 8 GiB of PAX records and has none: refused before anything is read
    claim = tarfile.TarInfo("././@PaxHeader")
    claim.type, claim.size = tarfile.XHDTYPE, 8 << 30
    with pytest.raises(ImageImportError, match=f"an extended tar header of {8 << 30} bytes"):
        apply_layer(io.BytesIO(claim.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024), str(root))
    with pytest.raises(ImageImportError, match=r"member 'big': a file of 5000 bytes \(the limit is 4096\)"):
        apply_layer(io.BytesIO(layer(file("big", b"b" * 5000))), str(root),
                    limits=ImportLimits(max_entry_bytes=4096))
    assert not (root / "big").exists()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_decompression_bombs_are_cut_at_the_limit(tmp_path: Path, compression: str):
    bomb = layer(file("zeros", bytes(64 << 20)), compression=compression)
    assert len(bomb) < 1 << 20
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ImageImportError, match=f"more than {8 << 20} bytes"):
        apply_layer(io.BytesIO(bomb), str(root), limits=ImportLimits(max_total_bytes=8 << 20))


def test_truncated_and_corrupt_layers(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    whole = layer(file("a", b"A" * 3000), file("b", b"B" * 3000))
    with pytest.raises(ImageImportError, match=r"member 'a': the tar ends inside the file's data \(truncated\)"):
        apply_layer(io.BytesIO(whole[:2048]), str(root))  # inside a's data
    with pytest.raises(ImageImportError, match=r"after member 'a': the tar ends without its end-of-archive block"):
        apply_layer(io.BytesIO(whole[:512 + 3072]), str(root))  # exactly after a: a header boundary
    corrupt = bytearray(whole)
    corrupt[512 + 3072 + 148] ^= 0x55  # b's header checksum
    with pytest.raises(ImageImportError, match="after member 'a': corrupt tar header"):
        apply_layer(io.BytesIO(bytes(corrupt)), str(root))
    with pytest.raises(ImageImportError, match="corrupt compressed data: Compressed file ended"):
        apply_layer(io.BytesIO(gzip.compress(whole)[:-100]), str(root))
    with pytest.raises(ImageImportError, match="bzip2 and xz layers are not OCI layers"):
        apply_layer(io.BytesIO(b"BZh91AY&SY" + bytes(100)), str(root))
    with pytest.raises(ImageImportError, match=r"media type 'application/x-foo' is not one"):
        apply_layer(io.BytesIO(whole), str(root), media_type="application/x-foo")


# ---- images: digests, structure, destination ---------------------------------------------------------------


BASE = layer(directory("bin"), file("bin/tool", b"#!/bin/sh\n", mode=0o755))
TOP = layer(directory("etc"), file("etc/conf", b"c"), compression="gzip")
RUNTIME = {"Env": ["PATH=/bin"], "Entrypoint": ["/bin/tool"], "WorkingDir": "srv", "User": "nobody",
           "Labels": {"a": "1"}}


def test_hand_made_layout_and_docker_archive(tmp_path: Path):
    write_layout(tmp_path / "layout", [BASE, TOP], runtime=RUNTIME)
    config = import_oci(str(tmp_path / "layout"), str(tmp_path / "r1"))
    assert config == ImageConfig(env=("PATH=/bin",), working_dir="/srv", entrypoint=("/bin/tool",),
                                 user="nobody", labels={"a": "1"})
    write_docker_archive(tmp_path / "d.tar", [BASE, _decompressed(TOP)], runtime=RUNTIME)
    assert import_oci(f"{tmp_path / 'd.tar'}:y:1", str(tmp_path / "r2")) == config
    assert_same_tree(tmp_path / "r2", tmp_path / "r1")


def test_nested_index_picks_this_hosts_platform(tmp_path: Path):
    layout = tmp_path / "layout"
    ours = write_layout(layout, [layer(file("mine", b"amd64"))])
    theirs = layer(file("mine", b"arm64"))
    (blob_path(layout, sha256(theirs))).write_bytes(theirs)
    index = json.loads((layout / "index.json").read_text())
    our_descriptor = index["manifests"][0]
    del our_descriptor["annotations"]
    their_manifest = json.dumps({**ours, "layers": [{"mediaType": OCI_TAR, "digest": sha256(theirs),
                                                      "size": len(theirs)}]}).encode()
    (blob_path(layout, sha256(their_manifest))).write_bytes(their_manifest)
    host_arch = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
    other_arch = "arm64" if host_arch == "amd64" else "amd64"
    nested = json.dumps({"schemaVersion": 2, "manifests": [  # the other platform first: order does not decide
        {"mediaType": our_descriptor["mediaType"], "digest": sha256(their_manifest), "size": len(their_manifest),
         "platform": {"os": "linux", "architecture": other_arch}},
        {**our_descriptor, "platform": {"os": "linux", "architecture": host_arch}}]}).encode()
    (blob_path(layout, sha256(nested))).write_bytes(nested)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha256(nested), "size": len(nested),
         "annotations": {"io.containerd.image.name": "docker.io/library/multi:1"}}]}))
    import_oci(f"{layout}:docker.io/library/multi:1", str(tmp_path / "root"))
    assert (tmp_path / "root/mine").read_bytes() == b"amd64"


def test_docker_archive_with_several_images(tmp_path: Path):
    write_docker_archive(tmp_path / "d.tar", [BASE])
    with tarfile.open(tmp_path / "d.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    entry_ = json.loads(members["manifest.json"])[0]
    members["manifest.json"] = json.dumps([{**entry_, "RepoTags": ["reg.example/a:1"]},
                                           {**entry_, "RepoTags": ["reg.example/b:2"]}]).encode()
    with tarfile.open(tmp_path / "d.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageImportError, match=r"holds 2 images; name one as PATH:NAME \(names: reg.example/a:1, "
                                               r"reg.example/b:2\)"):
        import_oci(str(tmp_path / "d.tar"), str(tmp_path / "root"))
    import_oci(f"{tmp_path / 'd.tar'}:b:2", str(tmp_path / "root"))
    assert (tmp_path / "root/bin/tool").read_bytes() == b"#!/bin/sh\n"


def test_corrupt_missing_and_truncated_blobs(tmp_path: Path):
    manifest = write_layout(tmp_path / "layout", [BASE, TOP])
    top = manifest["layers"][1]["digest"]
    top_path = blob_path(tmp_path / "layout", top)
    data = bytearray(top_path.read_bytes())
    data[4] ^= 0xFF  # the gzip header's mtime: the same tar decompresses, only the digest tells
    top_path.write_bytes(bytes(data))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageImportError, match=f"layer 1 \\({top}\\): the blob does not match its digest {top}"):
        import_oci(str(tmp_path / "layout"), str(tmp_path / "empty"))
    assert os.listdir(tmp_path / "empty") == []  # the layers applied before the fault are taken back
    top_path.write_bytes(bytes(data[:-40]))
    with pytest.raises(ImageImportError, match=f"layer 1 \\({top}\\): the blob has {len(data) - 40} bytes, the "
                                               f"manifest says {len(data)}"):
        import_oci(str(tmp_path / "layout"), str(tmp_path / "new"))
    top_path.unlink()
    with pytest.raises(ImageImportError, match=f"layer 1 \\({top}\\): the blob is missing"):
        import_oci(str(tmp_path / "layout"), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_docker_archive_layer_checked_against_diff_id(tmp_path: Path):
    write_docker_archive(tmp_path / "d.tar", [BASE])
    raw = bytearray((tmp_path / "d.tar").read_bytes())
    spot = raw.find(b"#!/bin/sh")
    raw[spot] = ord("X")
    (tmp_path / "d.tar").write_bytes(bytes(raw))
    with pytest.raises(ImageImportError, match=r"layer 0 \(layer0/layer.tar\): the uncompressed layer hashes to "
                                               r"sha256:[0-9a-f]{64}, the config's rootfs.diff_ids says"):
        import_oci(str(tmp_path / "d.tar"), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("index, error", [
    ("{not json", "index.json is not valid JSON"),
    ('{"manifests": {}}', "index.json: manifests is missing or not a list"),
    ('{"manifests": []}', "index.json: lists no images"),
    ('{"manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:../../etc", '
     '"size": 1}]}', r"index.json manifests\[0\].digest: 'sha256:../../etc' is not a sha256 or sha512 digest"),
    ('{"manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:' + "a" * 64
     + '", "size": -1}]}', r"manifests\[0\].size: -1 is not a size"),
    ('{"manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:' + "a" * 64
     + '", "size": 5}]}', f"manifest sha256:{'a' * 64} is missing"),
])
def test_malformed_index(tmp_path: Path, index: str, error: str):
    write_layout(tmp_path / "layout", [BASE])
    (tmp_path / "layout/index.json").write_text(index)
    with pytest.raises(ImageImportError, match=error):
        import_oci(str(tmp_path / "layout"), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("manifest, error", [
    (b"[]", "manifest.json is not a non-empty list of images"),
    (b'[{"Config": 1, "Layers": []}]', r"manifest.json\[0\].Config: missing or not a string"),
    (b'[{"Config": "c.json"}]', r"manifest.json\[0\].Layers: missing or not a list of strings"),
    (b'[{"Config": "../../etc/passwd", "Layers": []}]', "points out of the archive"),
    (b'[{"Config": "c.json", "Layers": []}]', r"config c.json is missing \(c.json\)"),
])
def test_malformed_docker_manifest(tmp_path: Path, manifest: bytes, error: str):
    with tarfile.open(tmp_path / "d.tar", "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    with pytest.raises(ImageImportError, match=error):
        import_oci(str(tmp_path / "d.tar"), str(tmp_path / "new"))


def test_sources_and_destinations_that_are_not_usable(tmp_path: Path):
    write_layout(tmp_path / "layout", [BASE])
    with pytest.raises(ImageImportError, match="no such file or directory"):
        import_oci(str(tmp_path / "absent"), str(tmp_path / "new"))
    (tmp_path / "junk").write_bytes(os.urandom(3000))
    with pytest.raises(ImageImportError, match="not an image layout directory or an image tarball"):
        import_oci(str(tmp_path / "junk"), str(tmp_path / "new"))
    with pytest.raises(ImageImportError, match=r"neither an OCI image layout \(index.json\) nor a docker-archive"):
        import_oci(str(tmp_path), str(tmp_path / "new"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full/keep").write_text("mine")
    with pytest.raises(ImageImportError, match="destination .*/full: not an empty directory"):
        import_oci(str(tmp_path / "layout"), str(tmp_path / "full"))
    assert os.listdir(tmp_path / "full") == ["keep"]
    with pytest.raises(ImageImportError, match="an empty image name after ':'"):
        import_oci(f"{tmp_path / 'layout'}:", str(tmp_path / "new"))


def test_bad_image_config_is_named(tmp_path: Path):
    write_layout(tmp_path / "layout", [BASE], runtime={"Env": ["NOEQUALS"]})
    with pytest.raises(ImageImportError, match=r"config sha256:[0-9a-f]{64}: config.Env\[0\]: 'NOEQUALS' is not "
                                               "KEY=value"):
        import_oci(str(tmp_path / "layout"), str(tmp_path / "new"))


def test_layer_over_the_total_budget_of_an_image(tmp_path: Path):
    write_layout(tmp_path / "layout", [layer(file("a", bytes(40_000))), layer(file("b", bytes(40_000)))])
    with pytest.raises(ImageImportError, match=r"layer 1 .* more than \d+ bytes"):
        import_oci(str(tmp_path / "layout"), str(tmp_path / "new"), limits=ImportLimits(max_total_bytes=70_000))
    assert not (tmp_path / "new").exists()


# ---- ImageConfig -------------------------------------------------------------------------------------------


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=150, deadline=None)
@given(env=st.lists(st.tuples(text.filter(lambda k: k and "=" not in k), text).map("=".join), max_size=4),
       working_dir=text.map(lambda s: "/" + s), entrypoint=st.lists(text, max_size=3),
       cmd=st.lists(text, max_size=3), user=text, labels=st.dictionaries(text, text, max_size=3))
def test_image_config_json_round_trip(env, working_dir, entrypoint, cmd, user, labels):
    config = ImageConfig(env=tuple(env), working_dir=working_dir, entrypoint=tuple(entrypoint), cmd=tuple(cmd),
                         user=user, labels=labels)
    data = json.loads(json.dumps(config.to_json()))
    assert ImageConfig.from_json(data) == config


json_values = st.recursive(st.none() | st.booleans() | st.integers() | text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                           max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(data=st.dictionaries(st.sampled_from(["env", "working_dir", "entrypoint", "cmd", "user", "labels", "x"]),
                            json_values, max_size=4) | json_values)
def test_image_config_from_json_rejects_garbage_with_a_value_error(data):
    try:
        config = ImageConfig.from_json(data)
    except ValueError as e:
        assert str(e)
    else:
        assert ImageConfig.from_json(config.to_json()) == config


# ---- property: random layer sequences against a model ------------------------------------------------------

NAMES = ("a", "b", "c")
PATHS = [n for n in NAMES] + [f"{p}/{n}" for p in NAMES for n in NAMES]
operation = st.one_of(
    st.tuples(st.just("file"), st.integers(0, 3), st.sampled_from([0o644, 0o600, 0o755])),
    st.tuples(st.just("dir"), st.sampled_from([0o755, 0o700])),
    st.tuples(st.just("symlink"), st.sampled_from(["a", "/a/b", "../c", "nowhere"])),
    st.tuples(st.just("hardlink"), st.sampled_from(PATHS)),
    st.tuples(st.just("whiteout")),
    st.tuples(st.just("opaque")),
)
layer_plans = st.lists(st.tuples(st.dictionaries(st.sampled_from(PATHS), operation, max_size=7),
                                 st.randoms(use_true_random=False), st.sampled_from([None, "gzip", "zstd"])),
                       min_size=1, max_size=4)


def _below(path: str, state: dict) -> list[str]:
    return [p for p in state if p.startswith(path + "/")]


def _only_directories(paths: list[str], state: dict, plan: dict) -> bool:
    """Whether each path is a directory or absent, in the lower layers and in this one."""
    return all(state.get(p, ("dir",))[0] == "dir" and plan.get(p, ("dir",))[0] in ("dir", "whiteout", "opaque")
               for p in paths)


def _model_layer(state: dict, plan: dict, rand, inode_counter: list[int]) -> list[tuple]:
    """Apply one planned layer to the model `state` (path -> node) and return the tar entries that mean it:
    markers hide lower entries first, wherever they stand in the tar; entries (sorted: parents first) that
    would need a parent the model lacks are left out of the layer. Markers below a symlink or a file are left
    out too: the model has no symlink resolution (the hostile tests cover whiteouts through symlinks)."""
    markers = []
    lower = dict(state)  # markers stand anywhere in the tar: each is judged against the lower layers alone
    for path, op in plan.items():
        parent = path.rpartition("/")[0]
        resolved = ([parent] if parent else []) + ([path] if op[0] == "opaque" else [])
        if op[0] in ("whiteout", "opaque") and not _only_directories(resolved, lower, plan):
            continue
        if op[0] == "whiteout":
            for p in [path] + _below(path, state):
                state.pop(p, None)
            markers.append(whiteout(path))
        elif op[0] == "opaque":
            for p in _below(path, state):
                state.pop(p, None)
            markers.append(opaque(path))
    entries = []
    for path in sorted(p for p, op in plan.items() if op[0] not in ("whiteout", "opaque")):
        op = plan[path]
        parent = path.rpartition("/")[0]
        if parent and state.get(parent, ("",))[0] != "dir":
            continue
        if op[0] == "hardlink":
            target = state.get(op[1])
            if target is None or target[0] != "file" or op[1] == path or op[1].startswith(path + "/"):
                continue  # (a link replacing the directory that holds its target is refused: see hostile cases)
            node, tar_entry = target, hardlink(path, op[1])
        elif op[0] == "file":
            inode_counter[0] += 1
            node, tar_entry = ("file", bytes([op[1]]) * op[1], op[2], inode_counter[0]), \
                file(path, bytes([op[1]]) * op[1], mode=op[2])
        elif op[0] == "dir":
            node, tar_entry = ("dir", op[1]), directory(path, mode=op[1])
        else:
            node, tar_entry = ("symlink", op[1]), symlink(path, op[1])
        if node[0] != "dir" or state.get(path, ("",))[0] != "dir":
            for p in _below(path, state):
                del state[p]
        state[path] = node
        entries.append(tar_entry)
    for marker in markers:  # anywhere in the tar: the meaning is the same
        entries.insert(rand.randint(0, len(entries)), marker)
    return entries


def _tree_of(root: Path) -> tuple[dict, list]:
    nodes: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st_ = os.lstat(path)
            if stat.S_ISDIR(st_.st_mode):
                nodes[rel] = ("dir", stat.S_IMODE(st_.st_mode))
            elif stat.S_ISLNK(st_.st_mode):
                nodes[rel] = ("symlink", os.readlink(path))
            else:
                nodes[rel] = ("file", Path(path).read_bytes(), stat.S_IMODE(st_.st_mode))
                inodes.setdefault(st_.st_ino, []).append(rel)
    return nodes, sorted(sorted(g) for g in inodes.values())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plans=layer_plans)
def test_random_layer_sequences_match_the_model(tmp_path: Path, plans):
    root = tmp_path / uuid.uuid4().hex
    root.mkdir()
    state: dict[str, tuple] = {}
    counter = [0]
    # a populated first layer, so that whiteouts and opaque markers find something to hide
    base = {"a": ("dir", 0o755), "a/a": ("file", 1, 0o644), "a/b": ("dir", 0o755), "b": ("dir", 0o700),
            "b/a": ("file", 2, 0o600), "b/b": ("symlink", "a"), "c": ("file", 3, 0o755)}
    try:
        for plan, rand, compression in [(base, None, None)] + plans:
            entries = _model_layer(state, plan, rand, counter)
            apply_layer(io.BytesIO(layer(*entries, compression=compression)), str(root))
        nodes, groups = _tree_of(root)
        expected = {p: (n[:3] if n[0] == "file" else n) for p, n in state.items()}
        assert nodes == expected
        by_inode: dict[int, list[str]] = {}
        for path, node in state.items():
            if node[0] == "file":
                by_inode.setdefault(node[3], []).append(path)
        assert groups == sorted(sorted(g) for g in by_inode.values())
    finally:
        shutil.rmtree(root)


# ---- property: hostile names never reach outside the root --------------------------------------------------

components = st.sampled_from(["..", ".", "", "a", "esc", "up", "/"])
hostile_entries = st.lists(st.tuples(
    st.lists(components, min_size=1, max_size=4).map("/".join),
    st.sampled_from(["file", "dir", "symlink", "hardlink", "whiteout", "opaque"]),
    st.sampled_from(["CANARY", "..", "../..", "../canary", "a", "esc/secret"])), min_size=1, max_size=6)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=hostile_entries)
def test_hostile_names_stay_inside_the_root(tmp_path: Path, members):
    outer = tmp_path / uuid.uuid4().hex
    canary = outer / "canary"
    canary.mkdir(parents=True)
    (canary / "secret").write_text("secret")
    root = outer / "root"
    root.mkdir()
    before = listing(canary)
    try:
        # the ways out, then random entries that may go through them
        entries = [symlink("esc", str(canary)), symlink("up", "../.."), directory("a")]
        for name, kind, target in members:
            target = str(canary) if target == "CANARY" else target
            entries.append({"file": lambda: file(name, b"w"), "dir": lambda: directory(name),
                            "symlink": lambda: symlink(name, target), "hardlink": lambda: hardlink(name, target),
                            "whiteout": lambda: whiteout(name.rstrip("/") or "x"),
                            "opaque": lambda: opaque(name.rstrip("/"))}[kind]())
        try:
            apply_layer(io.BytesIO(layer(*entries)), str(root))
        except ImageImportError:
            pass
        assert listing(canary) == before
        assert sorted(os.listdir(outer)) == ["canary", "root"]
    finally:
        shutil.rmtree(outer)
