"""The messages of CRIU's RPC (`criu swrk`, images/rpc.proto in CRIU's source), encoded and decoded by hand.

Only the fields coldbrew sends or reads are listed; proto2's wire format for them is varints and length-delimited
strings and messages, which a few lines do without a protobuf dependency or generated code. Unknown fields in a
response are skipped, so a newer CRIU that answers with more fields still decodes.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# criu_req_type
DUMP, RESTORE, CHECK, PRE_DUMP, NOTIFY, FEATURE_CHECK, VERSION = 1, 2, 3, 4, 6, 9, 10
REQUEST_NAMES = {DUMP: "dump", RESTORE: "restore", CHECK: "check", PRE_DUMP: "pre-dump", NOTIFY: "notify",
                 FEATURE_CHECK: "feature-check", VERSION: "version"}
# criu_cg_mode: the values of `--manage-cgroups-mode`
CGROUP_MODES = {"ignore": 0, "none": 1, "props": 2, "soft": 3, "full": 4, "strict": 5, "default": 6}
NETWORK_LOCK_SKIP = 3  # criu_network_lock_method: the dump records it, and the restore of that dump follows it

_VARINT, _BYTES = 0, 2

# A schema maps a field name to (number, kind); kind is "int", "bool", "str" or a nested schema. The fields named in
# REPEATED take and give lists.
Schema = dict
REPEATED = frozenset({"ext_mnt", "cg_root", "inherit_fd", "external", "join_ns"})
EXT_MOUNT_MAP: Schema = {"key": (1, "str"), "val": (2, "str")}
JOIN_NAMESPACE: Schema = {"ns": (1, "str"), "ns_file": (2, "str"), "extra_opt": (3, "str")}
INHERIT_FD: Schema = {"key": (1, "str"), "fd": (2, "int")}
CGROUP_ROOT: Schema = {"ctrl": (1, "str"), "path": (2, "str")}
OPTS: Schema = {
    "images_dir_fd": (1, "int"), "pid": (2, "int"), "leave_running": (3, "bool"), "ext_unix_sk": (4, "bool"),
    "tcp_established": (5, "bool"), "evasive_devices": (6, "bool"), "shell_job": (7, "bool"),
    "file_locks": (8, "bool"), "log_level": (9, "int"), "log_file": (10, "str"), "notify_scripts": (12, "bool"),
    "root": (13, "str"), "parent_img": (14, "str"), "track_mem": (15, "bool"), "work_dir_fd": (17, "int"),
    "ext_mnt": (23, EXT_MOUNT_MAP), "manage_cgroups": (24, "bool"), "cg_root": (25, CGROUP_ROOT),
    "rst_sibling": (26, "bool"), "inherit_fd": (27, INHERIT_FD), "manage_cgroups_mode": (34, "int"),
    "external": (37, "str"), "join_ns": (39, JOIN_NAMESPACE), "freeze_cgroup": (44, "str"),
    "orphan_pts_master": (50, "bool"), "config_file": (51, "str"), "network_lock": (64, "int"),
}
FEATURES: Schema = {"mem_track": (1, "bool"), "lazy_pages": (2, "bool"), "pidfd_store": (3, "bool")}
REQUEST: Schema = {"type": (1, "int"), "opts": (2, OPTS), "notify_success": (3, "bool"), "features": (5, FEATURES)}
VERSION_INFO: Schema = {"major_number": (1, "int"), "minor_number": (2, "int"), "gitid": (3, "str"),
                        "sublevel": (4, "int"), "extra": (5, "int"), "name": (6, "str")}
RESPONSE: Schema = {
    "type": (1, "int"), "success": (2, "bool"), "dump": (3, {"restored": (1, "bool")}),
    "restore": (4, {"pid": (1, "int")}), "notify": (5, {"script": (1, "str"), "pid": (2, "int")}),
    "cr_errno": (7, "int"), "features": (8, FEATURES), "cr_errmsg": (9, "str"), "version": (10, VERSION_INFO),
    "status": (11, "int"),
}


class DecodeError(ValueError):
    pass


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int32/int64 is sent as its 64-bit two's complement (ten bytes)
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode(schema: Schema, message: dict) -> bytes:
    out = bytearray()
    for name, value in message.items():
        if value is None:
            continue
        number, kind = schema[name]
        for item in value if name in REPEATED else (value,):
            if kind in ("int", "bool"):
                out += _varint(number << 3 | _VARINT) + _varint(int(item))
            else:
                data = item.encode() if kind == "str" else encode(kind, item)
                out += _varint(number << 3 | _BYTES) + _varint(len(data)) + data
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def decode(schema: Schema, data: bytes) -> dict[str, Any]:
    """The fields of `schema` found in `data` (the last one wins for a scalar, as in protobuf; a field that is
    not sent is absent, and so is an empty repeated one)."""
    by_number = {number: (name, kind) for name, (number, kind) in schema.items()}
    result: dict[str, Any] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _BYTES:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise DecodeError("truncated field")
            value, pos = data[pos:pos + length], pos + length
        elif wire == 1:  # fixed64 / double: none we read, skipped
            pos += 8
            continue
        elif wire == 5:  # fixed32 / float
            pos += 4
            continue
        else:
            raise DecodeError(f"unknown wire type {wire}")
        if number not in by_number:
            continue
        name, kind = by_number[number]
        if kind == "int":
            item: Any = value - (1 << 64) if value >= 1 << 63 else value
        elif kind == "bool":
            item = bool(value)
        elif kind == "str":
            item = bytes(value).decode(errors="replace")
        else:
            item = decode(kind, bytes(value))
        if name in REPEATED:
            result.setdefault(name, []).append(item)
        else:
            result[name] = item
    return result
