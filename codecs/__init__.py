"""KV-cache codecs in torch (CPU and CUDA): quantization, rotation, eviction, entropy, lossless.

Public API (docs/ARCHITECTURE.md, "Codec contract")::

    spec = CodecSpec.parse("k4v2-pe50")
    payload = encode_block(layers, spec, start=0, scores=None)
    blk = decode_block(payload, device=None, dtype=None)
    blks = decode_blocks(payloads, device=None, dtype=None)   # a snapshot's segments, batched
    blks = decode_blocks(payloads, layers=slice(3, 4))        # layer 3 alone, from its own bytes
    dec = BlockDecoder(payloads); dec.decode(slice(i, i + 1)) # parsed once, layer after layer
    hdr = read_header(payload)          # pure Python, no torch import

``CodecSpec``, ``TIERS``, ``read_header``, ``BlockHeader`` and ``encoded_nbytes`` import without
torch, so the server parses headers cheaply; ``encode_block``, ``decode_block``,
``decode_blocks``, ``BlockDecoder`` and ``DecodedBlock`` load torch on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deltastore.codecs.format import BlockHeader, encoded_nbytes, read_header
from deltastore.codecs.spec import TIERS, CodecSpec, Tier

if TYPE_CHECKING:
    from deltastore.codecs.block import BlockDecoder, DecodedBlock, decode_block, decode_blocks, encode_block

__all__ = [
    "TIERS",
    "BlockDecoder",
    "BlockHeader",
    "CodecSpec",
    "DecodedBlock",
    "Tier",
    "decode_block",
    "decode_blocks",
    "encode_block",
    "encoded_nbytes",
    "read_header",
]

_LAZY = ("BlockDecoder", "DecodedBlock", "decode_block", "decode_blocks", "encode_block")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from deltastore.codecs import block

        return getattr(block, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
