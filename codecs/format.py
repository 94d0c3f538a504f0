"""The block format: a versioned, self-describing header, a section table, then the sections.

Pure Python (struct only, no torch) so the server reads headers without decoding tensors.

Layout, little-endian::

    magic     4s   b"DSKV"
    version   u8   FORMAT_VERSION
    dtype     u8   original dtype code (1 float16, 2 bfloat16, 3 float32)
    spec_len  u16  length of the canonical spec string
    n_layers  u32
    kv_heads  u32
    head_dim  u32
    n_tokens  u32  tokens before eviction
    start     u64  absolute position of the first token
    n_sect    u16
    spec      spec_len bytes, ASCII canonical CodecSpec
    table     n_sect x (kind u8, flags u8, length u64)   flags bit 0: section is zstd-compressed
    sections  concatenated, in table order

Every size is derived from the header and checked before use: section kinds and order, and the
length of each raw section, must equal what the spec and dimensions imply; a compressed section
must be no longer than its raw size; the payload must end exactly after the last section.
For keep<P> specs the kept count depends on where the sequence ended when the block was sealed, so
it is read from the keep mask (the last section, never compressed for keep<P>): its set bits over
the (n_layers, kv_heads, n_tokens) mask, divided by n_layers * kv_heads, checked against the spec's
budget. Likewise hp<N>'s count of 8-bit tokens is read from the length of the HIGH section (never
compressed), a whole multiple of one token's 8-bit bytes in every layer and head, at most N and
at most the kept tokens past the sink. Everything else is derived as above.
Each section holds one part (codes, scales, ...) of every layer, layer after layer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from deltastore.codecs.spec import CodecSpec
from deltastore.errors import CodecError, FormatError, InvalidArgument

__all__ = [
    "DTYPE_CODES",
    "FORMAT_VERSION",
    "GRID_HEADER_NBYTES",
    "MAGIC",
    "BlockHeader",
    "Section",
    "check_dims",
    "encoded_nbytes",
    "high_token_nbytes",
    "pack_header",
    "params_nbytes",
    "read_header",
    "section_sizes",
]

MAGIC = b"DSKV"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sBBHIIIIQH")
_ENTRY = struct.Struct("<BBQ")
FLAG_ZSTD = 1
GRID_HEADER_NBYTES = 16
"""Bytes of one head's p8 grid header (four float32, ``params.py``)."""

DTYPE_CODES: dict[str, int] = {"float16": 1, "bfloat16": 2, "float32": 3}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
_DTYPE_NAMES = {v: k for k, v in DTYPE_CODES.items()}

# Bounds on what a header may claim: a hostile payload must not make us allocate terabytes.
MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_TOKENS = 1 << 24
MAX_START = 1 << 40
MAX_FP16_NBYTES = 1 << 36  # 64 GiB of FP16 KV in one block


class Section(IntEnum):
    """Section kinds. A payload holds them in this order, except that HIGH comes before MASK."""

    K_DATA = 1  # fp16 / lossless byte planes / fp8 codes / packed integer codes
    K_PARAMS = 2  # fp8: fp16 scale per group; quant: fp16 (scale, zero) per group, or p8 grids and codes
    V_DATA = 3
    V_PARAMS = 4
    SINK = 5  # fp16 K then V of the leading sink tokens
    MASK = 6  # eviction keep mask, (n_layers, kv_heads, n_tokens) bits, LSB first
    HIGH = 7  # hp<N>: per layer 8-bit K codes, K fp16 (scale, zero), V codes, V params of the newest tokens


@dataclass(frozen=True)
class BlockHeader:
    """What a payload says about itself. ``fp16_nbytes`` is the FP16 size of the uncompressed KV.

    Attributes:
        spec: the codec.
        n_layers, kv_heads, head_dim: cache shape.
        n_tokens: tokens before eviction; start: absolute position of the first.
        dtype: original dtype name ("float16", "bfloat16", "float32").
        sections: (kind, flags, offset, length) of each section, offsets into the payload.
        header_nbytes: bytes before the first section.
        kept_tokens: tokens per head after eviction.
        high_tokens: trailing kept tokens per head stored at 8 bits (hp<N>).
    """

    spec: CodecSpec
    n_layers: int
    kv_heads: int
    head_dim: int
    n_tokens: int
    start: int
    dtype: str
    sections: tuple[tuple[Section, int, int, int], ...]
    header_nbytes: int
    kept_tokens: int
    high_tokens: int = 0

    @property
    def fp16_nbytes(self) -> int:
        return self.n_layers * 2 * self.kv_heads * self.n_tokens * self.head_dim * 2

    @property
    def version(self) -> int:
        return FORMAT_VERSION


def check_dims(
    n_layers: int, kv_heads: int, head_dim: int, n_tokens: int, start: int, error: type[InvalidArgument]
) -> None:
    """Raise ``error`` unless every dimension is within the format's bounds."""
    for name, value, low, high in (
        ("n_layers", n_layers, 1, MAX_LAYERS),
        ("kv_heads", kv_heads, 1, MAX_KV_HEADS),
        ("head_dim", head_dim, 1, MAX_HEAD_DIM),
        ("n_tokens", n_tokens, 1, MAX_TOKENS),
        ("start", start, 0, MAX_START),
    ):
        if not low <= value <= high:
            raise error(f"{name}={value} is outside [{low}, {high}]")
    if n_layers * 2 * kv_heads * n_tokens * head_dim * 2 > MAX_FP16_NBYTES:
        raise error(
            f"block of {n_layers}x{kv_heads}x{n_tokens}x{head_dim} exceeds {MAX_FP16_NBYTES} FP16 bytes"
        )


def _groups(n: int, group: int) -> int:
    return -(-n // group)


def params_nbytes(heads: int, groups_per_head: int, params8: bool) -> int:
    """Stored bytes of the quantization parameters of ``heads`` heads of ``groups_per_head`` groups
    each: fp16 (scale, zero) pairs, or with p8 a grid header per head and two codes per group
    (``params.py``)."""
    if params8:
        return heads * (GRID_HEADER_NBYTES + 2 * groups_per_head) if groups_per_head else 0
    return heads * groups_per_head * 4


def high_token_nbytes(spec: CodecSpec, head_dim: int) -> int:
    """HIGH section bytes of one token of one head of one layer: 8-bit K and V codes, each with
    fp16 (scale, zero) per group along head_dim."""
    return 2 * (head_dim + 4 * _groups(head_dim, spec.group_size))


def section_sizes(
    spec: CodecSpec,
    n_layers: int,
    kv_heads: int,
    head_dim: int,
    n_tokens: int,
    start: int,
    dtype: str,
    kept: int | None = None,
    high: int = 0,
) -> list[tuple[Section, int]]:
    """Raw (pre-zstd) byte size of every section, by exact arithmetic. Pure, no torch.

    ``kept`` (tokens per head after eviction) defaults to ``spec.kept_tokens(n_tokens, start)``;
    ``high``: trailing kept tokens at 8 bits (hp<N>), not in the other sections.
    """
    h, d, g = kv_heads, head_dim, spec.group_size
    kept = spec.kept_tokens(n_tokens, start) if kept is None else kept
    sink = spec.fp16_sink_tokens(n_tokens, start)
    q = kept - sink - high
    if spec.kind == "fp16":
        per = [(Section.K_DATA, h * kept * d * 2), (Section.V_DATA, h * kept * d * 2)]
    elif spec.kind == "lossless":
        item = _ITEMSIZE[dtype]
        per = [(Section.K_DATA, h * kept * d * item), (Section.V_DATA, h * kept * d * item)]
    elif spec.kind == "fp8":
        scales = h * q * _groups(d, g) * 2
        per = [
            (Section.K_DATA, h * q * d),
            (Section.K_PARAMS, scales),
            (Section.V_DATA, h * q * d),
            (Section.V_PARAMS, scales),
        ]
    else:
        k_groups = _groups(q, g) * d if spec.key_axis == "channel" else q * _groups(d, g)
        per = [
            (Section.K_DATA, _groups(h * q * d * spec.key_bits, 8)),
            (Section.K_PARAMS, params_nbytes(h, k_groups, spec.params8)),
            (Section.V_DATA, _groups(h * q * d * spec.value_bits, 8)),
            (Section.V_PARAMS, params_nbytes(h, q * _groups(d, g), spec.params8)),
        ]
    out = [(kind, n_layers * size) for kind, size in per]
    if sink:
        out.append((Section.SINK, n_layers * 2 * h * sink * d * 2))
    if spec.high:
        out.append((Section.HIGH, n_layers * h * high * high_token_nbytes(spec, d)))
    if spec.evicts:
        out.append((Section.MASK, _groups(n_layers * h * n_tokens, 8)))
    return out


def _header_nbytes(spec_text: str, n_sections: int) -> int:
    return _FIXED.size + len(spec_text) + n_sections * _ENTRY.size


def encoded_nbytes(
    spec: CodecSpec | str,
    *,
    n_layers: int,
    kv_heads: int,
    head_dim: int,
    n_tokens: int,
    start: int = 0,
    dtype: str = "float16",
    seq_end: int | None = None,
) -> int:
    """Exact payload size in bytes for specs without an entropy stage; an upper bound with one.

    (The zstd stage keeps a section raw when compressing does not make it smaller.) ``seq_end``:
    as in ``encode_block`` (keep<P> and hp<N> only).
    """
    spec = CodecSpec.parse(spec) if isinstance(spec, str) else spec
    if dtype not in DTYPE_CODES:
        raise InvalidArgument(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPE_CODES)}")
    check_dims(n_layers, kv_heads, head_dim, n_tokens, start, InvalidArgument)
    kept = spec.kept_tokens(n_tokens, start, seq_end)
    high = spec.high_tokens(n_tokens, start, seq_end)
    sizes = section_sizes(spec, n_layers, kv_heads, head_dim, n_tokens, start, dtype, kept, high)
    return _header_nbytes(spec.canonical(), len(sizes)) + sum(size for _, size in sizes)


def pack_header(
    spec: CodecSpec,
    n_layers: int,
    kv_heads: int,
    head_dim: int,
    n_tokens: int,
    start: int,
    dtype: str,
    table: list[tuple[Section, int, int]],
) -> bytes:
    """Header bytes for ``table`` = [(kind, flags, stored length)] in section order."""
    check_dims(n_layers, kv_heads, head_dim, n_tokens, start, CodecError)
    spec_text = spec.canonical().encode("ascii")
    fixed = _FIXED.pack(
        MAGIC,
        FORMAT_VERSION,
        DTYPE_CODES[dtype],
        len(spec_text),
        n_layers,
        kv_heads,
        head_dim,
        n_tokens,
        start,
        len(table),
    )
    return fixed + spec_text + b"".join(_ENTRY.pack(int(k), f, n) for k, f, n in table)


_Entry = tuple[int, int, int]  # (kind, flags, stored length) of one section table entry


def _kept_from_mask(
    view: memoryview,
    spec: CodecSpec,
    n_layers: int,
    kv_heads: int,
    n_tokens: int,
    start: int,
    header_nbytes: int,
    entries: list[_Entry],
) -> int:
    """Tokens per head after eviction: for keep<P> counted in the raw keep mask (the last section)."""
    if spec.eviction != "keep":
        return spec.kept_tokens(n_tokens, start)
    if not entries:
        raise FormatError(f"spec {spec.canonical()} needs a keep mask section; the table lists none")
    code, flags, length = entries[-1]
    n_bits = n_layers * kv_heads * n_tokens
    if code != Section.MASK or flags or length != _groups(n_bits, 8):
        raise FormatError(f"spec {spec.canonical()} needs a raw keep mask of {_groups(n_bits, 8)} bytes last")
    offset = header_nbytes + sum(e[2] for e in entries[:-1])
    if offset + length > len(view):
        raise FormatError(f"payload of {len(view)} bytes is truncated inside its keep mask")
    bits = int.from_bytes(view[offset : offset + length], "little") & ((1 << n_bits) - 1)
    kept, rest = divmod(bits.bit_count(), n_layers * kv_heads)
    low = spec.kept_tokens(n_tokens, start, start + n_tokens + spec.recent)  # recent window past the block
    if rest or not low <= kept <= n_tokens:
        raise FormatError(
            f"keep mask sets {bits.bit_count()} bits; a block of {n_tokens} tokens with spec "
            f"{spec.canonical()} keeps between {low} and {n_tokens} tokens per head on each of "
            f"{n_layers * kv_heads} heads"
        )
    return kept


def _high_from_table(
    spec: CodecSpec,
    n_layers: int,
    kv_heads: int,
    head_dim: int,
    entries: list[_Entry],
) -> int:
    """Tokens per head at 8 bits (hp<N>): the raw HIGH section's length over one token's bytes."""
    if not spec.high:
        return 0
    index = len(entries) - (2 if spec.evicts else 1)  # HIGH is last, or just before the keep mask
    if index < 0:
        raise FormatError(
            f"spec {spec.canonical()} needs a HIGH section; the table lists {len(entries)} sections"
        )
    code, flags, length = entries[index]
    per_token = n_layers * kv_heads * high_token_nbytes(spec, head_dim)
    high, rest = divmod(length, per_token)
    if code != Section.HIGH or flags or rest or high > spec.high:
        raise FormatError(
            f"spec {spec.canonical()} needs a raw HIGH section of a whole number (at most {spec.high}) of "
            f"{per_token}-byte tokens at index {index}; the table lists kind {code}, flags {flags:#x}, "
            f"{length} bytes"
        )
    return high


def read_header(payload: bytes | bytearray | memoryview) -> BlockHeader:
    """Parse and bounds-check a payload's header and section table; decodes no tensor.

    Raises:
        FormatError: truncated payload, bad magic, other version, unknown spec or dtype, dims out
            of bounds, or a section table that does not match the spec and dims or the payload.
    """
    view = memoryview(payload)
    total = len(view)
    if total < _FIXED.size:
        raise FormatError(f"payload of {total} bytes is shorter than the {_FIXED.size}-byte block header")
    magic, version, dtype_code, spec_len, n_layers, kv_heads, head_dim, n_tokens, start, n_sect = (
        _FIXED.unpack_from(view, 0)
    )
    if magic != MAGIC:
        raise FormatError(f"not a DeltaStore KV block (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"block format version {version} is not supported (this build reads {FORMAT_VERSION})",
            hint="upgrade deltastore to read blocks written by a newer version",
        )
    dtype = _DTYPE_NAMES.get(dtype_code)
    if dtype is None:
        raise FormatError(f"unknown dtype code {dtype_code}")
    check_dims(n_layers, kv_heads, head_dim, n_tokens, start, FormatError)
    if n_sect > len(Section):
        raise FormatError(f"{n_sect} sections claimed; a block has at most {len(Section)}")
    header_nbytes = _header_nbytes("x" * spec_len, n_sect)
    if total < header_nbytes:
        raise FormatError(f"payload of {total} bytes is truncated inside its {header_nbytes}-byte header")
    try:
        spec_text = bytes(view[_FIXED.size : _FIXED.size + spec_len]).decode("ascii")
        spec = CodecSpec.parse(spec_text)
    except (UnicodeDecodeError, InvalidArgument) as exc:
        raise FormatError(f"block names an unknown codec spec: {exc}") from None
    if spec.canonical() != spec_text:
        raise FormatError(f"block spec {spec_text!r} is not canonical ({spec.canonical()!r})")
    if spec.kind == "quant" and spec.rotate and head_dim & (head_dim - 1):
        raise FormatError(
            f"spec {spec_text} rotates keys, which needs a power-of-two head_dim, not {head_dim}"
        )
    entry_at = _FIXED.size + spec_len
    entries = [_ENTRY.unpack_from(view, entry_at + i * _ENTRY.size) for i in range(n_sect)]
    high = _high_from_table(spec, n_layers, kv_heads, head_dim, entries)
    kept = _kept_from_mask(view, spec, n_layers, kv_heads, n_tokens, start, header_nbytes, entries)
    if high > kept - spec.fp16_sink_tokens(n_tokens, start):
        raise FormatError(f"{high} tokens at 8 bits, more than the {kept} kept tokens past the fp16 sink")
    expected = section_sizes(spec, n_layers, kv_heads, head_dim, n_tokens, start, dtype, kept, high)
    if n_sect != len(expected):
        raise FormatError(f"spec {spec_text} has {len(expected)} sections, the table lists {n_sect}")
    sections = []
    offset = header_nbytes
    for i, (kind, raw_size) in enumerate(expected):
        code, flags, length = entries[i]
        if code != kind:
            raise FormatError(f"section {i} is of kind {code}, expected {int(kind)} ({kind.name})")
        if flags & ~FLAG_ZSTD:
            raise FormatError(f"section {kind.name} has unknown flags {flags:#x}")
        if flags & FLAG_ZSTD and not (spec.entropy or spec.kind == "lossless"):
            raise FormatError(f"section {kind.name} is compressed but spec {spec_text} has no entropy stage")
        if (not flags & FLAG_ZSTD and length != raw_size) or length > raw_size:
            raise FormatError(
                f"section {kind.name} claims {length} bytes; spec and dims imply {raw_size}"
                + (" at most" if flags & FLAG_ZSTD else "")
            )
        sections.append((kind, flags, offset, length))
        offset += length
    if offset > total:
        raise FormatError(f"payload of {total} bytes is truncated: its sections end at byte {offset}")
    if offset != total:
        raise FormatError(f"{total - offset} trailing bytes after the last section (ends at byte {offset})")
    return BlockHeader(
        spec, n_layers, kv_heads, head_dim, n_tokens, start, dtype, tuple(sections), header_nbytes, kept, high
    )
