"""The store's layout on a backend: key encodings and the binary records behind them.

Keyspaces (see :mod:`deltastore.backend`) and keys; ``N(x)``/``S(x)``/``D(x)`` are one length
byte plus UTF-8, so prefixes never collide:

- ``blocks``    ``D(domain) + key32``            -> block record (immutable once written)
- ``manifests`` ``N(ns) + S(session) + u64be(turn)`` -> manifest record
- ``refs``      ``"g" + D(domain) + key32``      -> live snapshots referencing the block
                ``"n" + N(ns) + key32``          -> same, per namespace (shared domains only)
                ``"s" + N(ns) + S(session) + key32`` -> same, per session
- ``sessions``  ``"s" + N(ns) + S(session)``     -> session record
                ``"t" + u64be(last_access_ms) + N(ns) + S(session)`` -> "" (the LRU order)
- ``counters``  ``"g" + name`` / ``"n" + N(ns) + name`` -> accounting counters
- ``meta``      ``"store_format"``               -> :data:`STORE_FORMAT`
                ``"quarantine/" + kind + "/" + key`` -> a record set aside as damaged

Records are fixed little-endian structs with a version byte. Block records keep the BLAKE3 digest
of their payload (checked on every read); manifests end with a BLAKE3 digest of themselves.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from typing import TypeAlias

import blake3

from deltastore.addressing import KEY_BYTES, Key, Segment
from deltastore.errors import ChecksumMismatch, FormatError, InvalidArgument

__all__ = [
    "QUARANTINE_PREFIX",
    "STORE_FORMAT",
    "BlockMeta",
    "Manifest",
    "SessionRecord",
    "block_key",
    "block_payload_offset",
    "check_name",
    "decode_block",
    "encode_block",
    "manifest_key",
    "payload_digest",
    "quarantine_key",
    "seal_block",
    "session_key",
]

Buffer: TypeAlias = bytearray | memoryview | mmap.mmap
STORE_FORMAT = b"deltastore-store/1"
QUARANTINE_PREFIX = b"quarantine/"
"""``meta`` keys of records set aside as damaged, for ``deltastore verify --repair``."""
MAX_TURN = (1 << 32) - 1
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
"""Namespaces and shared-group names (the ops API's schema states it too)."""
_NAME_RE = re.compile(NAME_PATTERN)
_MAX_SESSION = 128
_MAX_LABEL = 256
_U64BE = struct.Struct(">Q")


def check_name(kind: str, value: str) -> str:
    """Validate a namespace or shared-group name: ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidArgument(f"{kind} {value!r} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}")
    return value


def check_session(value: str) -> str:
    """Validate a session id: 1..128 UTF-8 bytes, no control characters."""
    if not isinstance(value, str) or not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgument(f"session id {value!r} must be non-empty printable text")
    if len(value.encode("utf-8")) > _MAX_SESSION:
        raise InvalidArgument(f"session id longer than {_MAX_SESSION} bytes")
    return value


def check_label(kind: str, value: str) -> str:
    """Validate a model fingerprint or codec spec string: 1..256 UTF-8 bytes."""
    if not isinstance(value, str) or not value or len(value.encode("utf-8")) > _MAX_LABEL:
        raise InvalidArgument(f"{kind} must be a non-empty string of at most {_MAX_LABEL} bytes")
    return value


def check_turn(turn: int) -> int:
    if not isinstance(turn, int) or isinstance(turn, bool) or not 0 <= turn <= MAX_TURN:
        raise InvalidArgument(f"turn must be an integer in [0, {MAX_TURN}], got {turn!r}")
    return turn


def _b(text: str) -> bytes:
    raw = text.encode("utf-8")
    return bytes([len(raw)]) + raw


def ns_prefix(namespace: str) -> bytes:
    return _b(namespace)


def session_prefix(namespace: str, session: str) -> bytes:
    return _b(namespace) + _b(session)


def block_key(domain: str, key: Key) -> bytes:
    return _b(domain) + key


def manifest_key(namespace: str, session: str, turn: int) -> bytes:
    return session_prefix(namespace, session) + _U64BE.pack(turn)


def turn_of_manifest_key(key: bytes) -> int:
    return _U64BE.unpack(key[-8:])[0]


def global_ref_key(domain: str, key: Key) -> bytes:
    return b"g" + _b(domain) + key


def ns_ref_key(namespace: str, key: Key) -> bytes:
    return b"n" + _b(namespace) + key


def session_ref_key(namespace: str, session: str, key: Key) -> bytes:
    return b"s" + session_prefix(namespace, session) + key


def session_key(namespace: str, session: str) -> bytes:
    return b"s" + session_prefix(namespace, session)


def lru_key(last_access_ms: int, namespace: str, session: str) -> bytes:
    return b"t" + _U64BE.pack(last_access_ms) + session_prefix(namespace, session)


def quarantine_key(kind: bytes, key: bytes) -> bytes:
    """Where a damaged record of ``kind`` (block, manifest, session) stored under ``key`` is set aside."""
    return QUARANTINE_PREFIX + kind + b"/" + key


def split_lru_key(raw: bytes) -> tuple[int, str, str]:
    """Inverse of :func:`lru_key`: (last_access_ms, namespace, session)."""
    ns, session, _ = split_session_prefix(raw[9:])
    return _U64BE.unpack(raw[1:9])[0], ns, session


def split_session_prefix(raw: bytes) -> tuple[str, str, bytes]:
    """Inverse of :func:`session_prefix`: (namespace, session, rest of the key)."""
    n = raw[0]
    ns = raw[1 : 1 + n].decode("utf-8")
    m = raw[1 + n]
    session = raw[2 + n : 2 + n + m].decode("utf-8")
    return ns, session, raw[2 + n + m :]


def split_name(raw: bytes) -> tuple[str, bytes]:
    """Inverse of one ``N(x)``: (name, rest of the key)."""
    n = raw[0]
    return raw[1 : 1 + n].decode("utf-8"), raw[1 + n :]


# ---------------------------------------------------------------- block records

_BLOCK = struct.Struct("<BxHIQ32s")  # version, reserved, n_tokens, fp16_nbytes, payload digest
_BLOCK_VERSION = 1


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """What a block record says about its payload (sizes in bytes)."""

    n_tokens: int
    fp16_nbytes: int
    digest: bytes
    payload_nbytes: int
    record_nbytes: int


_MT_HASH_BYTES = 1 << 20  # below this, starting hash threads costs more than it saves


def payload_digest(payload: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3 of a payload, on every core for large ones (the same digest as one thread)."""
    threads = blake3.blake3.AUTO if len(payload) > _MT_HASH_BYTES else 1
    return blake3.blake3(payload, max_threads=threads).digest()


def block_payload_offset(n_tokens: int) -> int:
    """Bytes a block record holds before its payload: the header, then ``n_tokens`` token ids."""
    return _BLOCK.size + 4 * n_tokens


def seal_block(record: Buffer, tokens: bytes, fp16_nbytes: int, digest: bytes) -> None:
    """Write header and token ids into a record whose payload already lies after them.

    Lets a receiver gather a payload straight into its final record (see
    :func:`block_payload_offset`) and store it without the copy :func:`encode_block` makes.
    """
    n_tokens = len(tokens) // 4
    view = memoryview(record)
    if len(view) < block_payload_offset(n_tokens) or view.readonly:
        raise InvalidArgument(f"a record of {n_tokens} tokens needs a writable buffer with room for them")
    _BLOCK.pack_into(view, 0, _BLOCK_VERSION, 0, n_tokens, fp16_nbytes, digest)
    view[_BLOCK.size : block_payload_offset(n_tokens)] = tokens


def encode_block(
    tokens: bytes, payload: bytes | bytearray | memoryview, fp16_nbytes: int, digest: bytes | None = None
) -> bytes:
    """A block record: header, the segment's token ids (u32 LE), the payload (copied once).

    ``digest`` is the payload's BLAKE3 when the caller hashed these very bytes already (the
    server's chunk assembler does, as they arrive); None hashes them here.
    """
    n_tokens = len(tokens) // 4
    if digest is None:
        digest = payload_digest(payload)
    head = _BLOCK.pack(_BLOCK_VERSION, 0, n_tokens, fp16_nbytes, digest)
    return b"".join((head, tokens, payload))


def decode_block(
    raw: bytes | Buffer, name: str, *, check: bool = True
) -> tuple[BlockMeta, memoryview, memoryview]:
    """Parse a block record without copying: (meta, token bytes, payload).

    Args:
        raw: the stored record (may be a zero-copy buffer).
        name: how to name the block in errors (hex key).
        check: verify the payload's BLAKE3 digest (ChecksumMismatch when it differs).
    """
    view = memoryview(raw)
    if len(view) < _BLOCK.size or view[0] != _BLOCK_VERSION:
        raise ChecksumMismatch(name, "a block record", "a truncated or unknown record")
    _, reserved, n_tokens, fp16, digest = _BLOCK.unpack_from(view)
    if reserved or view[1]:  # pad and reserved lie outside the digest: a flip there must not pass either
        raise ChecksumMismatch(name, "zero reserved bytes", f"reserved bytes {bytes(view[1:4]).hex()}")
    tokens = view[_BLOCK.size : _BLOCK.size + 4 * n_tokens]
    payload = view[_BLOCK.size + 4 * n_tokens :]
    if len(tokens) != 4 * n_tokens:
        raise ChecksumMismatch(name, f"{n_tokens} token ids", "a truncated record")
    if check:
        got = payload_digest(payload)
        if got != digest:
            raise ChecksumMismatch(name, digest.hex(), got.hex())
    meta = BlockMeta(n_tokens, fp16, bytes(digest), len(payload), len(view))
    return meta, tokens, payload


# ---------------------------------------------------------------- manifests

_MANIFEST = struct.Struct("<BxxxIIQqQI")  # version, block_size, n_tokens, fp16, parent, created_ms, n_seg
_SEGMENT = struct.Struct(f"<II{KEY_BYTES}s")
_LABEL = struct.Struct("<H")
_MANIFEST_VERSION = 1


@dataclass(frozen=True, slots=True)
class Manifest:
    """One snapshot: its identity, size and ordered segments covering ``[0, n_tokens)``.

    ``fp16_nbytes`` is the KV's FP16 size as if stored alone (the snapshot's logical bytes);
    ``parent_turn`` is -1 when the snapshot extends no earlier turn; ``created_ms`` is unix ms.
    """

    model: str
    codec: str
    block_size: int
    n_tokens: int
    fp16_nbytes: int
    parent_turn: int
    created_ms: int
    segments: tuple[Segment, ...]

    def encode(self) -> bytes:
        parts = [
            _MANIFEST.pack(
                _MANIFEST_VERSION,
                self.block_size,
                self.n_tokens,
                self.fp16_nbytes,
                self.parent_turn,
                self.created_ms,
                len(self.segments),
            )
        ]
        for label in (self.model, self.codec):
            raw = label.encode("utf-8")
            parts.append(_LABEL.pack(len(raw)) + raw)
        parts.extend(_SEGMENT.pack(s.start, s.end, s.key) for s in self.segments)
        body = b"".join(parts)
        return body + blake3.blake3(body).digest()

    @classmethod
    def decode(cls, raw: bytes | memoryview, name: str) -> Manifest:
        """Parse and check a manifest record (ChecksumMismatch naming ``name`` if corrupt)."""
        data = bytes(raw)
        body, digest = data[:-KEY_BYTES], data[-KEY_BYTES:]
        got = blake3.blake3(body).digest()
        if got != digest:
            raise ChecksumMismatch(name, digest.hex(), got.hex())
        if not body or body[0] != _MANIFEST_VERSION:
            raise FormatError(f"manifest {name}: unknown record version")
        _, block_size, n_tokens, fp16, parent, created, n_seg = _MANIFEST.unpack_from(body)
        pos = _MANIFEST.size
        labels = []
        for _ in range(2):
            (n,) = _LABEL.unpack_from(body, pos)
            labels.append(body[pos + 2 : pos + 2 + n].decode("utf-8"))
            pos += 2 + n
        segments = tuple(
            Segment(s, e, Key(k))
            for s, e, k in (_SEGMENT.unpack_from(body, pos + i * _SEGMENT.size) for i in range(n_seg))
        )
        return cls(labels[0], labels[1], block_size, n_tokens, fp16, parent, created, segments)


# ---------------------------------------------------------------- sessions

_SESSION = struct.Struct("<BxxxIIQQ")  # version, block_size, n_snapshots, created_ms, last_access_ms
_SESSION_VERSION = 1


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session: dedup domain and block size (fixed at creation), snapshot count, LRU clock (unix ms).

    Fixing domain and block size per session keeps a live session's turns consistent when the
    configuration changes; new sessions pick up the new settings. The record's size never changes
    after creation, so rewriting it leaves the byte accounting as it is.
    """

    domain: str
    block_size: int
    n_snapshots: int
    created_ms: int
    last_access_ms: int

    def encode(self) -> bytes:
        raw = self.domain.encode("utf-8")
        head = _SESSION.pack(
            _SESSION_VERSION, self.block_size, self.n_snapshots, self.created_ms, self.last_access_ms
        )
        return head + _LABEL.pack(len(raw)) + raw

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> SessionRecord:
        data = bytes(raw)
        if not data or data[0] != _SESSION_VERSION:
            raise FormatError("session record: unknown version")
        _, block_size, n, created, last = _SESSION.unpack_from(data)
        (m,) = _LABEL.unpack_from(data, _SESSION.size)
        domain = data[_SESSION.size + 2 : _SESSION.size + 2 + m].decode("utf-8")
        return cls(domain, block_size, n, created, last)
