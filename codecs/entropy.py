"""Optional zstd stage over whole sections (packed codes, scales, byte planes).

A section is stored compressed only when that makes it smaller, so the stage never costs more
than its flag. Decompression is bounded by the section's raw size, which the header fixes: a
hostile payload cannot make us allocate more than the block's dims imply.
"""

from __future__ import annotations

import zstandard

from deltastore.errors import FormatError

__all__ = ["ZSTD_LEVEL", "compress", "decompress"]

ZSTD_LEVEL = 1
"""zstd level 1: on KV bytes higher levels gain ~1% for 2-4x the time."""

_MIN_SIZE = 64  # smaller sections are not worth a frame header


def compress(raw: bytes | memoryview) -> bytes | None:
    """zstd frame of ``raw``, or None when it would not be smaller."""
    if len(raw) < _MIN_SIZE:
        return None
    out = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1).compress(raw)
    return out if len(out) < len(raw) else None


def decompress(data: bytes | memoryview, raw_size: int) -> bytes:
    """Inverse of :func:`compress`; raises FormatError unless it yields exactly ``raw_size`` bytes."""
    try:
        # decompress() trusts the frame's content size over max_output_size: check it first.
        claimed = zstandard.frame_content_size(data)
        if claimed != raw_size:
            raise FormatError(f"zstd section claims {claimed} bytes, the header implies {raw_size}")
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_size)
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd section: {exc}") from None
    if len(out) != raw_size:
        raise FormatError(f"zstd section holds {len(out)} bytes, the header implies {raw_size}")
    return out
