"""One OCI layer (a tar, plain, gzip or zstd) applied onto a directory, safely, with OCI whiteout semantics.

What a layer means (OCI image-spec, layer.md):
- `.wh.NAME`, a regular file, hides NAME of the lower layers; `.wh..wh..opq` hides every lower entry of its
  directory, wherever it appears in the tar. Neither hides entries of its own layer.
- Other `.wh..wh.*` names (aufs bookkeeping such as `.wh..wh.plnk`) are skipped. `.wh.`, `.wh..` and `.wh...`
  (which would hide the directory itself or its parent), and a non-regular entry named `.wh.*`, are refused.
- A character device 0:0 is overlayfs's whiteout (archives tarred from an overlay upper directory): it is applied
  as `.wh.NAME` and no device is made.
- Other character and block devices are refused unless `allow_devices=True`; fifos are made.
- A file, link or fifo replaces whatever is at its path (a directory there is removed with its contents); a
  directory entry over an existing directory keeps its contents and takes the entry's metadata. Hard links point to
  entries of this or earlier layers. Ownership (when running as root), modes, mtimes (nanoseconds from PAX) and
  xattrs (PAX `SCHILY.xattr.*`) are applied; `trusted.overlay.*` and `user.overlay.*` xattrs are dropped, since they
  would change what the tree means when it is later used as an overlayfs layer. The mtimes of directories are set
  once the layer is done (those the layer changed without naming them get their previous mtime back).

Safety:
- Every path is resolved from a descriptor of the root with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS): a
  symlink in a member's parent path is followed as it would be inside the container (`etc -> /` followed by
  `etc/passwd` writes ROOT/passwd), never out of the root. The last component is never followed: an existing
  symlink there is replaced, not written through. Missing parent directories are made (0755), as tar does.
- Leading `/` of member names is stripped, as tar does; a `..` component in a member name or a hard link target
  is refused, as is a NUL byte.
- A PAX or GNU long-name header over `ImportLimits.max_header_bytes` is refused before it is read, a file over
  `max_entry_bytes` before it is written, and the decompressed stream is cut at `max_total_bytes` (gzip and zstd
  bombs). A tar that ends without its end-of-archive block, or with a corrupt header, is refused (truncation).
- A hard link whose target lies inside the entry it replaces, and GNU sparse files, are refused.
The compression is told by the magic bytes (a media type only has to be a layer type). The layer is read once,
front to back, in blocks of 1 MiB: a layer of many GB is never held in memory.
Any refusal raises `ImageImportError` naming the layer and the member; the root may then hold part of the layer.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import BinaryIO, Callable

from coldbrew.runtime import libc

OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_MEDIA_TYPES = frozenset({
    OCI_LAYER_TAR, OCI_LAYER_TAR + "+gzip", OCI_LAYER_TAR + "+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_XATTR_PAX = "SCHILY.xattr."
_DROPPED_XATTRS = ("trusted.overlay.", "user.overlay.")
_COPY_CHUNK = 1 << 20


class ImageImportError(Exception):
    """An image or layer could not be imported; the message names the archive, blob, layer or member at fault."""


@dataclass(frozen=True)
class ImportLimits:
    max_header_bytes: int = 1 << 20     # one PAX or GNU long-name header
    max_entry_bytes: int = 64 << 30     # one file's size
    max_total_bytes: int = 256 << 30    # the decompressed bytes of a layer (of all layers, for an image)


class MeteredReader:
    """A read-only stream that passes its source's bytes through a hash, counts them against a limit, and reports
    each read: the one place where digests, size bounds and progress of a blob are taken."""

    def __init__(self, source: BinaryIO, *, what: str, algorithm: str | None = None, limit: int | None = None,
                 on_read: Callable[[int], None] | None = None) -> None:
        self._source = source
        self._what = what
        self._hash = hashlib.new(algorithm) if algorithm else None
        self._limit = limit
        self._on_read = on_read
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.count += len(data)
        if self._limit is not None and self.count > self._limit:
            raise ImageImportError(f"{self._what}: more than {self._limit} bytes (the size limit)")
        if self._hash is not None:
            self._hash.update(data)
        if self._on_read is not None and data:
            self._on_read(len(data))
        return data

    def drain(self) -> None:
        while self.read(_COPY_CHUNK):
            pass

    def hexdigest(self) -> str:
        assert self._hash is not None, "no algorithm was given"
        return self._hash.hexdigest()


class _Prefixed:
    """`head` (bytes already read to sniff the compression) followed by the rest of `source`."""

    def __init__(self, head: bytes, source: MeteredReader) -> None:
        self._head = head
        self._source = source

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._source.read(size)
        if size < 0:
            data, self._head = self._head + self._source.read(), b""
            return data
        data, self._head = self._head[:size], self._head[size:]
        return data


class _ForwardReader:
    """The tell() and seek() that tarfile's random-access mode uses, over a stream read once: seeking ahead
    reads and discards; reads return all that was asked unless the stream ends. It reads ahead in large blocks,
    so that tarfile's 512-byte header reads do not each travel down the chain of decompressor and hashes, and
    without the copying of tarfile's own stream mode buffer (which slices its whole buffer per read)."""

    def __init__(self, source: MeteredReader) -> None:
        self._source = source
        self._buffer = b""
        self._offset = 0        # of the next unread byte in _buffer
        self._position = 0      # in the stream

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or position < self._position:
            raise io.UnsupportedOperation("a layer is read once, front to back")
        while self._position < position and self.read(min(position - self._position, _COPY_CHUNK)):
            pass
        return self._position

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            data = self._buffer[self._offset:] + self._source.read()
            self._buffer, self._offset = b"", 0
        elif self._offset + size <= len(self._buffer):
            data = self._buffer[self._offset:self._offset + size]
            self._offset += size
        else:
            parts = [self._buffer[self._offset:]]
            missing = size - len(parts[0])
            self._buffer, self._offset = b"", 0
            while missing:
                block = self._source.read(max(missing, _COPY_CHUNK))  # decompressors may return less
                if not block:
                    break
                if len(block) > missing:
                    self._buffer, self._offset = block, missing
                    block = block[:missing]
                parts.append(block)
                missing -= len(block)
            data = b"".join(parts)
        self._position += len(data)
        return data


@dataclass(frozen=True)
class LayerResult:
    size: int       # decompressed bytes (the tar's own size)
    diff_id: str    # "sha256:..." of the decompressed tar, as an image config's rootfs.diff_ids holds it


def apply_layer(layer: BinaryIO | str, dest: str, *, media_type: str = OCI_LAYER_TAR, allow_devices: bool = False,
                limits: ImportLimits = ImportLimits()) -> None:
    """Apply one layer (a path or a binary stream; tar, gzip or zstd, told apart by their magic bytes) onto the
    existing directory `dest`, with OCI whiteout semantics."""
    if media_type not in LAYER_MEDIA_TYPES:
        raise ImageImportError(f"layer media type {media_type!r} is not one this importer reads "
                               f"({', '.join(sorted(LAYER_MEDIA_TYPES))})")
    label = f"layer {layer if isinstance(layer, str) else getattr(layer, 'name', 'stream')}"
    try:
        rootfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageImportError(f"destination {dest}: {e.strerror}") from None
    try:
        if isinstance(layer, str):
            try:
                source = open(layer, "rb")
            except OSError as e:
                raise ImageImportError(f"{label}: {e.strerror}") from None
            with source:
                apply_layer_stream(source, rootfd, label=label, allow_devices=allow_devices, limits=limits,
                                   max_bytes=limits.max_total_bytes)
        else:
            apply_layer_stream(layer, rootfd, label=label, allow_devices=allow_devices, limits=limits,
                               max_bytes=limits.max_total_bytes)
    finally:
        os.close(rootfd)


def apply_layer_stream(raw: BinaryIO, rootfd: int, *, label: str, allow_devices: bool, limits: ImportLimits,
                       max_bytes: int) -> LayerResult:
    """Apply the layer read from `raw` onto the directory `rootfd`; read `raw` to its end (so that a caller
    hashing it sees every byte) and return the size and digest of the decompressed tar. Errors begin with
    `label`."""
    compressed = MeteredReader(raw, what="the compressed layer")
    try:
        head = compressed.read(6)
        tar_bytes = MeteredReader(_decompressor(head, compressed), what="the decompressed layer", algorithm="sha256",
                                  limit=max_bytes)
        _LayerApplier(rootfd, allow_devices, limits).apply(tar_bytes)
        tar_bytes.drain()  # the tar's trailing padding is part of its diff_id
        compressed.drain()
    except ImageImportError as e:
        raise ImageImportError(f"{label}: {e}") from None
    except (OSError, EOFError, tarfile.TarError) as e:
        raise ImageImportError(f"{label}: {_reason(e)}") from None
    return LayerResult(size=tar_bytes.count, diff_id="sha256:" + tar_bytes.hexdigest())


class _Decompressing:
    """A decompressor's stream whose library-specific errors become ImageImportError."""

    def __init__(self, stream: BinaryIO, errors: tuple[type[Exception], ...]) -> None:
        self._stream = stream
        self._errors = errors

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except self._errors as e:
            raise ImageImportError(f"corrupt compressed data: {e}") from None


def _decompressor(head: bytes, compressed: MeteredReader) -> BinaryIO:
    stream = _Prefixed(head, compressed)
    if head[:2] == b"\x1f\x8b":
        import gzip
        import zlib

        return _Decompressing(gzip.GzipFile(fileobj=stream, mode="rb"),  # type: ignore[arg-type, return-value]
                              (zlib.error, EOFError, gzip.BadGzipFile))
    # A zstd frame, or a skippable frame (magic 0x184D2A50..5F) such as zstd:chunked writes.
    if head[:4] == b"\x28\xb5\x2f\xfd" or (len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18"):
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True, closefd=False)
        return _Decompressing(reader, (zstandard.ZstdError,))  # type: ignore[return-value]
    if head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        raise ImageImportError("bzip2 and xz layers are not OCI layers (tar, gzip or zstd only)")
    return stream  # type: ignore[return-value]


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}" + (f" ({error.filename})" if error.filename else "")
    return str(error) or type(error).__name__


def bounded_tarinfo(max_header_bytes: int) -> type[tarfile.TarInfo]:
    class BoundedTarInfo(tarfile.TarInfo):
        """Refuses extended headers over the limit before tarfile reads them into memory, and tells a truncated
        or corrupt header apart from the end-of-archive block (tarfile ends the archive quietly on either)."""

        @classmethod
        def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
            try:
                return super().frombuf(buf, encoding, errors)
            except tarfile.EOFHeaderError:
                raise
            except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
                raise ImageImportError("the tar ends without its end-of-archive block (truncated)") from None
            except tarfile.HeaderError as e:
                raise ImageImportError(f"corrupt tar header: {e}") from None

        def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
            extended = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                        tarfile.GNUTYPE_LONGLINK)
            if self.type in extended and self.size > max_header_bytes:
                raise ImageImportError(f"an extended tar header of {self.size} bytes (the limit is "
                                       f"{max_header_bytes})")
            return super()._proc_member(tar)

    return BoundedTarInfo


def _member_path(name: str) -> str:
    """The normalised relative path of a tar member name ("" is the root): `/` and `.` components dropped, `..`
    and NUL refused."""
    if "\x00" in name:
        raise ImageImportError("a NUL byte in the name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageImportError("a '..' component (refused: it could climb out of the root)")
    return "/".join(parts)


def _mtime_ns(member: tarfile.TarInfo) -> int:
    exact = member.pax_headers.get("mtime")
    if exact is not None:
        try:
            return int(Decimal(exact) * 1_000_000_000)
        except InvalidOperation:
            pass
    return int(member.mtime) * 1_000_000_000


class _LayerApplier:
    def __init__(self, rootfd: int, allow_devices: bool, limits: ImportLimits) -> None:
        self.rootfd = rootfd
        self.allow_devices = allow_devices
        self.limits = limits
        self.set_owner = os.geteuid() == 0  # without root, files stay the caller's
        self.touched: set[str] = set()      # paths this layer wrote: its own whiteouts never hide them
        self.ancestors: set[str] = set()    # directories holding something this layer wrote
        self.dir_mtimes: dict[str, tuple[int, int]] = {}  # (atime, mtime) in ns, set once the layer is done

    def apply(self, stream: MeteredReader) -> None:
        reader = _ForwardReader(stream)
        tar = None
        previous = None
        while True:
            try:
                if tar is None:  # opening reads the first header
                    tar = tarfile.TarFile(fileobj=reader, mode="r",  # type: ignore[arg-type]
                                          tarinfo=bounded_tarinfo(self.limits.max_header_bytes))
                member = tar.next()
            except (ImageImportError, tarfile.TarError, EOFError, OSError) as e:
                where = "in the first header" if previous is None else f"after member {previous!r}"
                raise ImageImportError(f"{where}: {_reason(e)}") from None
            if member is None:
                break
            tar.members.clear()  # stream mode would keep every header of the layer in memory
            previous = member.name
            try:
                self._apply_member(member, reader)
            except ImageImportError as e:
                raise ImageImportError(f"member {member.name!r}: {e}") from None
            except (OSError, ValueError, tarfile.TarError, EOFError) as e:
                raise ImageImportError(f"member {member.name!r}: {_reason(e)}") from None
        self._set_directory_mtimes()

    # -- path resolution ------------------------------------------------------------------------------------

    def _resolve_dir(self, path: str, access: int = libc.O_PATH) -> int:
        """A descriptor (O_PATH unless `access` says otherwise) of the directory `path`, resolved inside the root."""
        flags = os.O_DIRECTORY | os.O_CLOEXEC | access
        for _ in range(16):
            try:
                return libc.openat2(self.rootfd, path or ".", flags, libc.RESOLVE_IN_ROOT | libc.RESOLVE_NO_MAGICLINKS)
            except OSError as e:
                if e.errno != errno.EAGAIN:  # EAGAIN: a concurrent rename; the kernel asks for a retry
                    raise
        raise ImageImportError(f"{path!r} keeps changing while it is resolved")

    def _open_parent(self, parent: str) -> int:
        """The parent directory of a member, made (with its missing ancestors, 0755) when absent, as tar does."""
        try:
            return self._resolve_dir(parent)
        except OSError as e:
            if e.errno == errno.ENOTDIR:
                raise ImageImportError(f"the parent {parent!r} is not a directory") from None
            if e.errno != errno.ENOENT:
                raise
        parts = parent.split("/")
        fd = os.dup(self.rootfd)
        try:
            for depth in range(1, len(parts) + 1):
                prefix = "/".join(parts[:depth])
                try:
                    child = self._resolve_dir(prefix)
                except OSError as e:
                    if e.errno == errno.ENOTDIR:
                        raise ImageImportError(f"the parent {prefix!r} is not a directory") from None
                    if e.errno != errno.ENOENT:
                        raise
                    self._note_dir_change("/".join(parts[:depth - 1]), fd)
                    try:
                        os.mkdir(parts[depth - 1], 0o755, dir_fd=fd)
                    except FileExistsError:
                        raise ImageImportError(f"the parent {prefix!r} is a symlink to nothing") from None
                    child = self._resolve_dir(prefix)
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _note_dir_change(self, path: str, fd: int) -> None:
        """Remember a directory's times before this layer first changes its entries, to put them back after."""
        if path not in self.dir_mtimes:
            st = os.fstat(fd)
            self.dir_mtimes[path] = (st.st_atime_ns, st.st_mtime_ns)

    def _mark_touched(self, path: str) -> None:
        self.touched.add(path)
        parent = path.rpartition("/")[0]
        while parent not in self.ancestors:
            self.ancestors.add(parent)
            if not parent:
                break
            parent = parent.rpartition("/")[0]

    # -- members --------------------------------------------------------------------------------------------

    def _apply_member(self, member: tarfile.TarInfo, reader: _ForwardReader) -> None:
        path = _member_path(member.name)
        parent, _, name = path.rpartition("/")
        if name.startswith(_WHITEOUT):
            if not member.isreg():
                raise ImageImportError("a non-regular entry with a whiteout name")
            if name == _OPAQUE:
                self._opaque(parent)
            elif not name.startswith(_WHITEOUT + _WHITEOUT):  # `.wh..wh.*` other than opq: aufs bookkeeping
                hidden = name[len(_WHITEOUT):]
                if hidden in ("", ".", ".."):
                    raise ImageImportError("a whiteout of the directory itself or its parent")
                self._whiteout(parent, hidden)
            return
        if member.ischr() and member.devmajor == 0 and member.devminor == 0 and path:
            self._whiteout(parent, name)
            return
        if not path:
            if not member.isdir():
                raise ImageImportError("the root of the layer is not a directory")
            self._set_metadata(member, self.rootfd, None, self.rootfd)
            self.dir_mtimes[""] = (_mtime_ns(member), _mtime_ns(member))
            return
        if member.issparse():
            raise ImageImportError("GNU sparse files are not supported in layers")
        if (member.ischr() or member.isblk()) and not self.allow_devices:
            raise ImageImportError("a device node (refused; allow_devices=True permits them)")
        if member.isreg() and member.size > self.limits.max_entry_bytes:
            raise ImageImportError(f"a file of {member.size} bytes (the limit is {self.limits.max_entry_bytes})")
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk() or member.isfifo()
                or member.ischr() or member.isblk()):
            raise ImageImportError(f"unsupported tar entry type {member.type!r}")

        parent_fd = self._open_parent(parent)
        try:
            self._mark_touched(path)
            self._note_dir_change(parent, parent_fd)
            if member.isdir():
                self._make_dir(member, parent_fd, name, path)
            elif member.islnk():
                self._make_hardlink(member, parent_fd, name, path)
            else:
                self._make_leaf(member, reader, parent_fd, name)
        finally:
            os.close(parent_fd)

    def _clear_slot(self, parent_fd: int, name: str, keep_directory: bool = False) -> bool:
        """Remove what is at `name` unless it is a directory and `keep_directory`; return whether one is kept."""
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_directory:
                return True
            shutil.rmtree(name, dir_fd=parent_fd)  # fd-based, never follows a symlink
        else:
            os.unlink(name, dir_fd=parent_fd)
        return False

    def _make_dir(self, member: tarfile.TarInfo, parent_fd: int, name: str, path: str) -> None:
        if not self._clear_slot(parent_fd, name, keep_directory=True):
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            self._set_metadata(member, parent_fd, name, fd)
        finally:
            os.close(fd)
        self.dir_mtimes[path] = (_mtime_ns(member), _mtime_ns(member))

    def _make_hardlink(self, member: tarfile.TarInfo, parent_fd: int, name: str, path: str) -> None:
        try:
            target = _member_path(member.linkname)
        except ImageImportError as e:
            raise ImageImportError(f"hard link target {member.linkname!r}: {e}") from None
        if target == path:
            return  # a link to itself (some archivers write them): nothing to do
        if not target:
            raise ImageImportError("a hard link to the root")
        if target.startswith(path + "/"):
            raise ImageImportError(f"hard link target {member.linkname!r} is inside the entry the link replaces")
        target_parent, _, target_name = target.rpartition("/")
        try:
            target_fd = self._resolve_dir(target_parent)
        except OSError:
            raise ImageImportError(f"hard link target {member.linkname!r} does not exist") from None
        try:
            try:
                target_st = os.stat(target_name, dir_fd=target_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise ImageImportError(f"hard link target {member.linkname!r} does not exist") from None
            if stat.S_ISDIR(target_st.st_mode):
                raise ImageImportError(f"hard link target {member.linkname!r} is a directory")
            self._clear_slot(parent_fd, name)
            os.link(target_name, name, src_dir_fd=target_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
        finally:
            os.close(target_fd)

    def _make_leaf(self, member: tarfile.TarInfo, reader: _ForwardReader, parent_fd: int, name: str) -> None:
        self._clear_slot(parent_fd, name)
        if member.issym():
            os.symlink(member.linkname, name, dir_fd=parent_fd)
            self._set_metadata(member, parent_fd, name, None)
            return
        if member.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent_fd)
            try:
                _copy_member(reader, member, fd)
                self._set_metadata(member, parent_fd, name, fd)
            finally:
                os.close(fd)
            return
        if member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=parent_fd)
        else:
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=parent_fd)
        # An O_PATH descriptor pins the new node: its mode is set through /proc/self/fd, never through a name.
        fd = os.open(name, libc.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            self._set_metadata(member, parent_fd, name, fd, by_proc=True)
        finally:
            os.close(fd)

    def _set_metadata(self, member: tarfile.TarInfo, parent_fd: int, name: str | None, fd: int | None,
                      by_proc: bool = False) -> None:
        """Owner, then mode (chown clears setuid bits), then xattrs (chown clears security.capability), then
        times. `fd` is the entry's own descriptor (an O_PATH one when `by_proc`: used through /proc/self/fd); a
        symlink has none, and is reached by `name` in `parent_fd` with calls that do not follow it."""
        xattrs = [(key[len(_XATTR_PAX):], value) for key, value in member.pax_headers.items()
                  if key.startswith(_XATTR_PAX) and not key[len(_XATTR_PAX):].startswith(_DROPPED_XATTRS)]
        mtime = _mtime_ns(member)
        if fd is None:
            if self.set_owner:
                os.chown(name, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
            for attribute, value in xattrs:
                _set_xattr(f"/proc/self/fd/{parent_fd}/{name}", attribute, value, follow=False)
            os.utime(name, ns=(mtime, mtime), dir_fd=parent_fd, follow_symlinks=False)
            return
        entry: int | str = f"/proc/self/fd/{fd}" if by_proc else fd
        if self.set_owner:
            os.chown(entry, member.uid, member.gid)
        os.chmod(entry, member.mode & 0o7777)
        for attribute, value in xattrs:
            _set_xattr(entry, attribute, value, follow=True)
        if not member.isdir():  # directories get theirs once the layer is done
            os.utime(entry, ns=(mtime, mtime))

    # -- whiteouts ------------------------------------------------------------------------------------------

    def _whiteout(self, parent: str, name: str) -> None:
        path = f"{parent}/{name}" if parent else name
        try:
            parent_fd = self._resolve_dir(parent)
        except OSError:
            return  # nothing below a missing directory to hide
        try:
            self._hide_lower(parent_fd, parent, name, path)
        finally:
            os.close(parent_fd)

    def _opaque(self, directory: str) -> None:
        try:
            fd = self._resolve_dir(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            self._hide_lower_children(fd, directory)
        finally:
            os.close(fd)

    def _hide_lower(self, parent_fd: int, parent: str, name: str, path: str) -> None:
        """Remove the lower layers' entry `name` of `parent`; what this layer wrote there (or below) stays."""
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if path not in self.touched and path not in self.ancestors:
            self._note_dir_change(parent, parent_fd)
            self._clear_slot(parent_fd, name)
        elif stat.S_ISDIR(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            try:
                self._hide_lower_children(fd, path)
            finally:
                os.close(fd)

    def _hide_lower_children(self, dir_fd: int, directory: str) -> None:
        with os.scandir(dir_fd) as entries:
            names = [entry.name for entry in entries]
        for child in names:
            self._hide_lower(dir_fd, directory, child, f"{directory}/{child}" if directory else child)

    def _set_directory_mtimes(self) -> None:
        for path, times in self.dir_mtimes.items():
            parent, _, name = path.rpartition("/")
            if not path:
                os.utime(self.rootfd, ns=times)
                continue
            try:
                parent_fd = self._resolve_dir(parent)
            except OSError:
                continue  # removed later in the layer
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    os.utime(name, ns=times, dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            finally:
                os.close(parent_fd)


def _set_xattr(entry: int | str, attribute: str, value: str, follow: bool) -> None:
    try:
        os.setxattr(entry, attribute, value.encode("utf-8", "surrogateescape"), follow_symlinks=follow)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:  # EOPNOTSUPP: the filesystem cannot hold this attribute; skipped
            raise ImageImportError(f"xattr {attribute}: {e.strerror}") from None


def _copy_member(reader: _ForwardReader, member: tarfile.TarInfo, fd: int) -> None:
    reader.seek(member.offset_data)
    left = member.size
    while left:
        chunk = reader.read(min(left, _COPY_CHUNK))
        if not chunk:
            raise ImageImportError("the tar ends inside the file's data (truncated)")
        left -= len(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]
