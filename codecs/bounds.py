"""How much a payload may make a reader allocate: bounds against decompression bombs. Pure, no torch.

Raw sections have exactly the size their header's dimensions imply (``read_header`` checks it),
so a reader allocates what it received. A zstd section states only an upper bound: its raw size
comes from the dimensions, its stored length may be anything up to that. A forged header can
therefore declare gigabytes per section behind a few kilobytes of zstd frame: every reader would
allocate them, and the store would count them as logical bytes. Real KV sections compress about
1.1-2x (lossless byte planes, entropy-coded codes), masks and params a little more; so the raw
bytes of a payload's zstd sections may exceed ``max_expansion`` x their stored length only by a
small ``EXPANSION_SLACK``. The server checks this at put (a bomb is never stored), the client
before it decompresses anything (a bomb from a compromised server is never inflated).
"""

from __future__ import annotations

from deltastore.codecs.format import FLAG_ZSTD, BlockHeader, section_sizes
from deltastore.errors import FormatError

__all__ = ["EXPANSION_SLACK", "MAX_EXPANSION", "check_expansion", "decoded_nbytes"]

MAX_EXPANSION = 64
"""Raw bytes per stored byte of a payload's zstd sections, at most (beyond the slack)."""
EXPANSION_SLACK = 1 << 20
"""Raw bytes of zstd sections allowed beyond ``MAX_EXPANSION`` x their length (small blocks)."""


def _raw_sizes(h: BlockHeader) -> list[int]:
    sizes = section_sizes(
        h.spec, h.n_layers, h.kv_heads, h.head_dim, h.n_tokens, h.start, h.dtype,
        h.kept_tokens, h.high_tokens, h.low_tokens,
    )  # fmt: skip
    return [raw for _, raw in sizes]


def decoded_nbytes(header: BlockHeader) -> int:
    """Bytes the sections of a payload take once decompressed (before tensors are decoded)."""
    return sum(_raw_sizes(header))


def check_expansion(header: BlockHeader, *, max_expansion: int = MAX_EXPANSION) -> int:
    """Raise FormatError when the zstd sections declare more than the bound; returns decoded bytes."""
    sizes = _raw_sizes(header)
    zstd_raw = zstd_stored = 0
    for (_kind, flags, _offset, length), raw in zip(header.sections, sizes, strict=True):
        if flags & FLAG_ZSTD:
            zstd_raw += raw
            zstd_stored += length
    if zstd_raw > max_expansion * zstd_stored + EXPANSION_SLACK:
        raise FormatError(
            f"compressed sections of {zstd_stored} bytes declare {zstd_raw} raw bytes, more than "
            f"{max_expansion}x (a decompression bomb, or dimensions that do not match the data)"
        )
    return sum(sizes)
