"""Bit packing: exact inverse for every width and length (property tests)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltastore.codecs.packing import pack_bits, packed_nbytes, unpack_bits
from deltastore.errors import CodecError


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_pack_unpack_inverse(bits: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=300))
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(len(values), bits)
    assert torch.equal(unpack_bits(packed, bits, len(values)), codes)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=64))
def test_pack4_layout_low_nibble_first(values: list[int]) -> None:
    packed = pack_bits(torch.tensor(values, dtype=torch.uint8), 4).tolist()
    padded = [*values, 0] if len(values) % 2 else values
    assert packed == [padded[i] | (padded[i + 1] << 4) for i in range(0, len(padded), 2)]


def test_bad_width_and_size() -> None:
    with pytest.raises(CodecError):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 5)
    with pytest.raises(CodecError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 8)
