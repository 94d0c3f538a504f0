"""The block format: a versioned, self-describing header, a section table, then the sections.

Pure Python (struct only, no torch) so the server reads headers without decoding tensors.

Layout, little-endian::

    magic     4s   b"DSKV"
    version   u8   1, or 2 for specs with what version 2 added (``nf``, 3-bit codes), or 3 for
                   specs with keys before RoPE (``pr<T>``): each block is written with the oldest
                   version that expresses its spec, so blocks of older specs stay byte-identical
                   (same digests, dedup across upgrades); all decode
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
at most the kept tokens past the sink. lo<L>'s count of 2-bit tokens is read from the LOW_MASK
section (never compressed), one bit per kept token of every layer and head (set: stored in LOW),
whose set bits, divided by n_layers * kv_heads, must be a whole number, at most
``ceil(n_tokens * L / 100)`` and at most the kept tokens past the sink and the 8-bit ones.
Everything else is derived as above.
Each section holds one part (codes, scales, ...) of every layer, layer after layer.

Why one long module: it is the block format's specification in code; header, section table
and every section's size arithmetic are read together.
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
    "block_version",
    "check_dims",
    "encoded_nbytes",
    "high_token_nbytes",
    "pack_header",
    "params_nbytes",
    "quant_part_sizes",
    "read_header",
    "section_sizes",
]

MAGIC = b"DSKV"
FORMAT_VERSION = 3
"""The newest block format version this build writes and reads (it reads every older one)."""
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
    """Section kinds. A payload holds those its spec has in this order: K_DATA, K_PARAMS, V_DATA,
    V_PARAMS, SINK, LOW, LOW_MASK, HIGH, MASK."""

    K_DATA = 1  # fp16 / lossless byte planes / fp8 codes / packed integer codes
    K_PARAMS = 2  # fp8: fp16 scale per group; quant: fp16 (scale, zero) per group, or p8 grids and codes
    V_DATA = 3
    V_PARAMS = 4
    SINK = 5  # fp16 K then V of the leading sink tokens
    MASK = 6  # eviction keep mask, (n_layers, kv_heads, n_tokens) bits, LSB first
    HIGH = 7  # hp<N>: per layer 8-bit K codes, K fp16 (scale, zero), V codes, V params of the newest tokens
    LOW = 8  # lo<L>: 2-bit K codes, K params, V codes, V params of the demoted tokens (each of every layer)
    LOW_MASK = 9  # lo<L>: (n_layers, kv_heads, kept) bits, LSB first: which kept tokens are in LOW


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
        low_tokens: kept tokens per head stored at 2 bits (lo<L>).
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
    low_tokens: int = 0
    version: int = 1

    @property
    def fp16_nbytes(self) -> int:
        return self.n_layers * 2 * self.kv_heads * self.n_tokens * self.head_dim * 2


def block_version(spec: CodecSpec) -> int:
    """The format version a block of ``spec`` is written with: the oldest that expresses it."""
    if spec.rope_theta or spec.up_layers:
        return 3
    return 2 if spec.nf or 3 in (spec.key_bits, spec.value_bits) else 1


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


def quant_part_sizes(
    spec: CodecSpec, kv_heads: int, head_dim: int, tokens: int, key_bits: int, value_bits: int
) -> list[int]:
    """Bytes of one layer's K codes, K params, V codes and V params of ``tokens`` tokens per head,
    coded with ``spec``'s integer codec at the given bits."""
    h, d, g = kv_heads, head_dim, spec.group_size
    k_groups = _groups(tokens, g) * d if spec.key_axis == "channel" else tokens * _groups(d, g)
    return [
        _groups(h * tokens * d * key_bits, 8),
        params_nbytes(h, k_groups, spec.params8),
        _groups(h * tokens * d * value_bits, 8),
        params_nbytes(h, tokens * _groups(d, g), spec.params8),
    ]


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
    low: int = 0,
) -> list[tuple[Section, int]]:
    """Raw (pre-zstd) byte size of every section, by exact arithmetic. Pure, no torch.

    ``kept`` (tokens per head after eviction) defaults to ``spec.kept_tokens(n_tokens, start)``;
    ``high``: trailing kept tokens at 8 bits (hp<N>), ``low``: kept tokens at 2 bits (lo<L>), not
    in the other sections.
    """
    h, d, g = kv_heads, head_dim, spec.group_size
    kept = spec.kept_tokens(n_tokens, start) if kept is None else kept
    sink = spec.fp16_sink_tokens(n_tokens, start)
    q = kept - sink - high - low
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
    if spec.kind == "quant":  # each layer at its bits (up<layers>), layer after layer
        kinds = (Section.K_DATA, Section.K_PARAMS, Section.V_DATA, Section.V_PARAMS)
        layers = [quant_part_sizes(spec, h, d, q, *spec.layer_bits(i)) for i in range(n_layers)]
        out = [(kind, sum(sizes)) for kind, sizes in zip(kinds, zip(*layers, strict=True), strict=True)]
    else:
        out = [(kind, n_layers * size) for kind, size in per]
    if sink:
        out.append((Section.SINK, n_layers * 2 * h * sink * d * 2))
    if spec.low:
        out.append((Section.LOW, n_layers * sum(quant_part_sizes(spec, h, d, low, 2, 2))))
        out.append((Section.LOW_MASK, _groups(n_layers * h * kept, 8)))
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
    low = spec.low_tokens(n_tokens, start, seq_end)
    sizes = section_sizes(spec, n_layers, kv_heads, head_dim, n_tokens, start, dtype, kept, high, low)
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
        block_version(spec),
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


def _count_bits(
    view: memoryview,
    entries: list[_Entry],
    index: int,
    kind: Section,
    n_bits: int,
    header_nbytes: int,
    spec: CodecSpec,
) -> int:
    """Set bits of the raw bit-mask section ``kind`` that the table must list at ``index``."""
    if not 0 <= index < len(entries):
        raise FormatError(
            f"spec {spec.canonical()} needs a {kind.name} section; the table lists {len(entries)}"
        )
    code, flags, length = entries[index]
    if code != kind or flags or length != _groups(n_bits, 8):
        raise FormatError(
            f"spec {spec.canonical()} needs a raw {kind.name} section of {_groups(n_bits, 8)} bytes at index {index}"
        )
    offset = header_nbytes + sum(e[2] for e in entries[:index])
    if offset + length > len(view):
        raise FormatError(f"payload of {len(view)} bytes is truncated inside its {kind.name} section")
    return (int.from_bytes(view[offset : offset + length], "little") & ((1 << n_bits) - 1)).bit_count()


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
    n_bits = n_layers * kv_heads * n_tokens
    bits = _count_bits(view, entries, len(entries) - 1, Section.MASK, n_bits, header_nbytes, spec)
    kept, rest = divmod(bits, n_layers * kv_heads)
    least = spec.kept_tokens(n_tokens, start, start + n_tokens + spec.recent)  # window past the block
    if rest or not least <= kept <= n_tokens:
        raise FormatError(
            f"keep mask sets {bits} bits; a block of {n_tokens} tokens with spec "
            f"{spec.canonical()} keeps between {least} and {n_tokens} tokens per head on each of "
            f"{n_layers * kv_heads} heads"
        )
    return kept


def _low_from_mask(
    view: memoryview,
    spec: CodecSpec,
    dims: tuple[int, int, int],
    kept: int,
    coded: int,
    header_nbytes: int,
    entries: list[_Entry],
) -> int:
    """Tokens per head at 2 bits (lo<L>): the raw LOW_MASK's set bits over the heads.

    dims: (n_layers, kv_heads, n_tokens); coded: kept tokens past the fp16 sink and the 8-bit ones.
    """
    if not spec.low:
        return 0
    n_layers, kv_heads, n_tokens = dims
    index = len(entries) - 2 - (1 if spec.high else 0)  # before HIGH (if any) and the keep mask
    bits = _count_bits(
        view, entries, index, Section.LOW_MASK, n_layers * kv_heads * kept, header_nbytes, spec
    )
    low, rest = divmod(bits, n_layers * kv_heads)
    most = min(-(-n_tokens * spec.low // 100), coded)
    if rest or low > most:
        raise FormatError(
            f"LOW_MASK sets {bits} bits; spec {spec.canonical()} stores at most {most} of the {kept} kept "
            f"tokens at 2 bits on each of {n_layers * kv_heads} heads"
        )
    return low


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
    if not 1 <= version <= FORMAT_VERSION:
        raise FormatError(
            f"block format version {version} is not supported (this build reads 1..{FORMAT_VERSION})",
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
    if version != block_version(spec):
        raise FormatError(
            f"block spec {spec_text} is written as format version {block_version(spec)}, the header says {version}"
        )
    if spec.kind == "quant" and spec.rotate and head_dim & (head_dim - 1):
        raise FormatError(
            f"spec {spec_text} rotates keys, which needs a power-of-two head_dim, not {head_dim}"
        )
    if spec.rope_theta and head_dim % 2:
        raise FormatError(
            f"spec {spec_text} takes keys before RoPE, which needs an even head_dim, not {head_dim}"
        )
    if spec.up_layers and spec.up_layers[-1] >= n_layers:
        raise FormatError(f"spec {spec_text} names layer {spec.up_layers[-1]} of a {n_layers}-layer block")
    entry_at = _FIXED.size + spec_len
    entries = [_ENTRY.unpack_from(view, entry_at + i * _ENTRY.size) for i in range(n_sect)]
    high = _high_from_table(spec, n_layers, kv_heads, head_dim, entries)
    kept = _kept_from_mask(view, spec, n_layers, kv_heads, n_tokens, start, header_nbytes, entries)
    coded = kept - spec.fp16_sink_tokens(n_tokens, start)
    if high > coded:
        raise FormatError(f"{high} tokens at 8 bits, more than the {kept} kept tokens past the fp16 sink")
    low = _low_from_mask(
        view, spec, (n_layers, kv_heads, n_tokens), kept, coded - high, header_nbytes, entries
    )
    expected = section_sizes(spec, n_layers, kv_heads, head_dim, n_tokens, start, dtype, kept, high, low)
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
        spec,
        n_layers,
        kv_heads,
        head_dim,
        n_tokens,
        start,
        dtype,
        tuple(sections),
        header_nbytes,
        kept,
        high,
        low,
        version,
    )
