"""hp<N>: the newest tokens of the sequence at 8 bits, their count read back from the payload."""

from __future__ import annotations

import pytest
import torch
from codec_testlib import make_cache

from deltastore.codecs import (
    CodecSpec,
    decode_block,
    encode_block,
    encoded_nbytes,
    read_header,
)
from deltastore.errors import InvalidArgument


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(
    ("start", "n", "seq_end", "high"),
    [
        (0, 64, 64, 16),  # the block ends the sequence: its last 16 tokens
        (64, 64, 138, 6),  # the window starts 10 tokens past the block: only its last 6
        (0, 64, 200, 0),  # wholly before the window
        (0, 8, 8, 4),  # the window reaches into the fp16 sink: those 4 stay fp16
    ],
)
def test_newest_tokens_are_8_bit(start: int, n: int, seq_end: int, high: int) -> None:
    spec = CodecSpec.parse("k4v4-sink4-hp16-keep50-r16")
    assert spec.high_tokens(n, start, seq_end) == high
    layers = make_cache(n_layers=2, tokens=n, seed=1)
    payload = encode_block(layers, spec, start=start, seq_end=seq_end)
    hdr = read_header(payload)
    assert hdr.high_tokens == high
    assert len(payload) == encoded_nbytes(
        spec, n_layers=2, kv_heads=3, head_dim=64, n_tokens=n, start=start, seq_end=seq_end
    )
    blk = decode_block(payload, dtype=torch.float32)
    for (k, v), (k0, v0), pos in zip(blk.layers, layers, blk.positions, strict=True):
        assert (pos[:, k.shape[1] - high :] >= seq_end - 16).all()  # the newest positions, all kept
        src_k = k0.float().gather(1, (pos - start)[..., None].expand(-1, -1, 64))
        src_v = v0.float().gather(1, (pos - start)[..., None].expand(-1, -1, 64))
        cut = k.shape[1] - high
        if high:  # 8 bits: 16x finer steps than 4 bits
            assert _rel(k[:, cut:], src_k[:, cut:]) < 0.01 and _rel(v[:, cut:], src_v[:, cut:]) < 0.01
        sink = spec.fp16_sink_tokens(n, start)
        if cut > sink:
            assert _rel(v[:, sink:cut], src_v[:, sink:cut]) > 0.03  # the rest: still 4-bit


def test_a_sequence_end_before_the_block_is_refused_by_the_size_arithmetic() -> None:
    """Found by review: encode_block refused it, encoded_nbytes returned a size."""
    with pytest.raises(InvalidArgument, match="before the block's end"):
        encoded_nbytes("k4v4-hp4", n_layers=1, kv_heads=1, head_dim=64, n_tokens=64, seq_end=10)
