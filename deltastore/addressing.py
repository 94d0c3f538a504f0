"""Prefix addressing: BLAKE3 chain hashes over token blocks, and the keys of snapshot segments.

The KV of a token depends on every token before it, so a block of KV is identified by its whole
prefix: ``h_0 = BLAKE3("deltastore/v1" || lp(domain) || lp(model) || lp(codec) || u32(B))`` and
``h_i = BLAKE3(h_{i-1} || tokens of block i as little-endian u32)``, as vLLM's prefix caching
does. Everything is BLAKE3 over a canonical byte encoding (never Python's ``hash()`` or pickle),
so keys are the same in every process, version and machine.

A snapshot of ``n`` tokens is cut into segments. A first turn (no parent) is every full aligned
block of ``B`` tokens (key ``h_{i+1}``, what other sessions dedup against), then the tail
``[floor(n/B)*B, n)``. A later turn reuses *all* its parent's segments and cuts only its new
tokens ``[m, n)``: a delta up to the next block boundary, full aligned blocks, then the tail. So a
turn writes exactly its new tokens and never re-encodes a parent's: bytes per turn grow with the
new tokens only, and a worker whose cache was restored with an evicting codec (its evicted tokens
are gone) can still store the next turn. The price: a block completed by deltas is not stored as
one aligned block, so another session can share it only through the first-turn blocks, which is
where shared prompts live. Tail and delta segments are keyed by their prefix identity and tokens.

The *domain* in the seed is the namespace, or ``shared:<group>`` for namespaces declared to share
a dedup group (namespace names cannot contain ``:``, so the two never collide).

Default block size: chosen by measurement (``tests/store/test_block_size.py``: 8 users sharing a
500-token system prompt, 200-token first messages, 10 turns of +50 tokens, K4V2-sized payloads
with per-segment per-channel key scales, on SmolLM2's KV shape; the test asserts the default has
the smallest worst-case excess over the best size, and prints the table with ``-s``). Small blocks
pay per-segment scales and index entries often; large ones leave more of a shared prompt in
per-session tails. Measured stored MiB for B = 16/32/64/128/256: every turn kept
37.7/34.0/33.0/34.0/37.4, latest turn kept 37.5/33.9/33.0/34.0/37.4, so B = 64 (which also matches
the codec's default 64-token per-channel key groups). Segments of any length are valid, so codecs
must not assume a minimum group.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NewType

import blake3

from deltastore.errors import InvalidArgument

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "KEY_BYTES",
    "MAX_BLOCK_SIZE",
    "Chain",
    "Key",
    "Segment",
    "check_key",
    "seed",
    "token_bytes",
    "tokens_from_bytes",
]

DEFAULT_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 1 << 16
KEY_BYTES = 32
_TAG = b"deltastore/v1"
_SEG_TAG = b"seg"
_U32 = struct.Struct("<I")
_TOKEN_MAX = (1 << 32) - 1

Key = NewType("Key", bytes)
"""A 32-byte BLAKE3 digest naming a segment (shown as hex)."""


def check_key(value: bytes | bytearray | memoryview) -> Key:
    """A segment key as every API below the text boundaries takes it: 32 raw bytes.

    Hex is for text (JSON, logs, errors, the CLI): a ``str`` here is refused, never parsed, so a
    key cannot silently change form on its way through.
    """
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidArgument(
            f"segment key must be {KEY_BYTES} raw bytes, got {type(value).__name__} {value!r:.80}"
        )
    raw = bytes(value)
    if len(raw) != KEY_BYTES:
        raise InvalidArgument(f"segment key must be {KEY_BYTES} bytes, got {len(raw)}")
    return Key(raw)


def _lp(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _U32.pack(len(raw)) + raw


def token_bytes(token_ids: Sequence[int] | Iterable[int]) -> bytes:
    """Canonical encoding of token ids: little-endian u32 each (4 bytes per token)."""
    arr = array("I")
    try:
        arr.fromlist(list(token_ids))
    except (OverflowError, TypeError) as exc:
        raise InvalidArgument(f"token ids must be integers in [0, 2**32): {exc}") from None
    if sys.byteorder == "big":
        arr.byteswap()
    return arr.tobytes()


def tokens_from_bytes(raw: bytes | memoryview) -> list[int]:
    """Inverse of :func:`token_bytes`."""
    if len(raw) % 4:
        raise InvalidArgument("token bytes must be a multiple of 4")
    arr = array("I")
    arr.frombytes(raw)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr.tolist()


def seed(domain: str, model: str, codec: str, block_size: int) -> Key:
    """``h_0``: binds every key to its dedup domain, model fingerprint, codec spec and block size."""
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise InvalidArgument(f"block size must be in [1, {MAX_BLOCK_SIZE}], got {block_size}")
    data = _TAG + _lp(domain) + _lp(model) + _lp(codec) + _U32.pack(block_size)
    return Key(blake3.blake3(data).digest())


@dataclass(frozen=True, slots=True)
class Segment:
    """Tokens ``[start, end)`` of a snapshot, encoded as one immutable payload named ``key``."""

    start: int
    end: int
    key: Key

    @property
    def n_tokens(self) -> int:
        return self.end - self.start

    @property
    def hex(self) -> str:
        return self.key.hex()


class Chain:
    """The chain hashes ``h_0 .. h_k`` of one token sequence (k = n // B full blocks).

    Args:
        seed_key: ``h_0`` from :func:`seed`.
        tokens: canonical token bytes (:func:`token_bytes`), 4 bytes per token.
        block_size: tokens per aligned block ``B``.
    """

    __slots__ = ("block_size", "hashes", "n_tokens", "tokens")

    def __init__(self, seed_key: Key, tokens: bytes, block_size: int) -> None:
        if len(tokens) % 4:
            raise InvalidArgument("token bytes must be a multiple of 4")
        self.tokens = tokens
        self.block_size = block_size
        self.n_tokens = len(tokens) // 4
        width = 4 * block_size
        hashes = [seed_key]
        for i in range(self.n_tokens // block_size):
            hashes.append(Key(blake3.blake3(hashes[-1] + tokens[i * width : (i + 1) * width]).digest()))
        self.hashes = hashes

    def prefix_id(self, p: int) -> Key:
        """Identity of the prefix ``tokens[:p]``; equals ``h_{p//B}`` when p is aligned."""
        i, r = divmod(p, self.block_size)
        if r == 0:
            return self.hashes[i]
        return Key(blake3.blake3(self.hashes[i] + self.tokens[4 * i * self.block_size : 4 * p]).digest())

    def segment_key(self, start: int, end: int) -> Key:
        """Key of the segment ``[start, end)``: ``h_{i+1}`` for full block i, else a tail key."""
        if not 0 <= start < end <= self.n_tokens:
            raise InvalidArgument(f"segment [{start}, {end}) outside [0, {self.n_tokens})")
        if start % self.block_size == 0 and end - start == self.block_size:
            return self.hashes[start // self.block_size + 1]
        h = blake3.blake3(_SEG_TAG)
        h.update(self.prefix_id(start))
        h.update(_U32.pack(end - start))
        h.update(self.tokens[4 * start : 4 * end])
        return Key(h.digest())

    def segments(self, parent_segments: Sequence[tuple[int, int]] = ()) -> list[Segment]:
        """Segmentation of this sequence given the parent turn's segment bounds (if any).

        The parent's segments, which must tile ``[0, m)``, are reused as they are; the new tokens
        ``[m, n)`` become a delta up to the next block boundary, full aligned blocks, then the
        tail. The caller checks that the parent's keys match (i.e. its tokens are a prefix).
        """
        b = self.block_size
        n = self.n_tokens
        bounds = list(parent_segments)
        m = 0
        for s, e in bounds:
            if s != m or e <= s:
                raise InvalidArgument(f"parent segments are not contiguous at token {s}")
            m = e
        if m > n:
            raise InvalidArgument(f"parent has {m} tokens, more than this snapshot's {n}")
        boundary = min(-(-m // b) * b, n)
        if m < boundary:
            bounds.append((m, boundary))
        full_end = max(boundary, n // b * b)
        bounds.extend((s, s + b) for s in range(boundary, full_end, b))
        if full_end < n:
            bounds.append((full_end, n))
        return [Segment(s, e, self.segment_key(s, e)) for s, e in bounds]
