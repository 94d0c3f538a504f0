"""The block format: headers read without torch, malformed payloads raise FormatError."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
import torch
from codec_testlib import make_cache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltastore.codecs import CodecSpec, decode_block, encode_block, read_header
from deltastore.codecs.format import (
    _ENTRY,
    _FIXED,
    FORMAT_VERSION,
    MAX_TOKENS,
    Section,
    pack_header,
    section_sizes,
)
from deltastore.errors import FormatError

_SPECS = (
    "lossless",
    "k4v2-pe50-sink4",
    "fp8-z",
    "k4v4-p8-sink4-z-hp8-keep50-r8",
    "k4v4-p8-sink4-z-hp8-keep80-lo50-r8",
)
"""Specs whose payloads the hostile-input tests cut, patch and fuzz: every section kind."""


@pytest.fixture(scope="module")
def payloads() -> dict[str, bytes]:
    layers = make_cache(n_layers=2, tokens=20)
    specs = (
        "k4v2",
        "lossless",
        "k4v2-pe50-sink4",
        "fp8-z",
        "k4v4-p8-sink4-z-hp8-keep50-r8",
        "k4v4-p8-sink4-z-hp8-keep80-lo50-r8",
    )
    return {s: encode_block(layers, s, start=3) for s in specs}


def _patch(payload: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(payload)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


def _entry_offset(payload: bytes, i: int) -> int:
    spec_len = struct.unpack_from("<H", payload, 6)[0]
    return _FIXED.size + spec_len + i * _ENTRY.size


def test_header_fields(payloads: dict[str, bytes]) -> None:
    hdr = read_header(payloads["k4v2-pe50-sink4"])
    assert (hdr.n_layers, hdr.kv_heads, hdr.head_dim, hdr.n_tokens, hdr.start) == (2, 3, 64, 20, 3)
    assert hdr.dtype == "float16" and hdr.version == 1  # plain specs: version 1 (test_nf.py)
    assert hdr.spec.canonical() == "k4v2-g64-kc-sink4-pe50-r16"
    assert hdr.fp16_nbytes == 2 * 2 * 3 * 20 * 64 * 2
    assert [s[0] for s in hdr.sections][-2:] == [Section.SINK, Section.MASK]


def test_read_header_needs_no_torch() -> None:
    code = (
        "import sys; from deltastore.codecs import read_header, CodecSpec, encoded_nbytes, TIERS;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["k4v2", *_SPECS])
def test_every_truncation_and_extension_rejected(payloads: dict[str, bytes], name: str) -> None:
    payload = payloads[name]
    cuts = sorted({*range(0, 80), *range(80, len(payload), max(1, len(payload) // 50)), len(payload) - 1})
    for cut in cuts:
        with pytest.raises(FormatError):
            read_header(payload[:cut])
    with pytest.raises(FormatError, match="trailing"):
        read_header(payload + b"\0")


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "match"),
    [
        (0, "<4s", b"XXXX", "magic"),
        (4, "<B", FORMAT_VERSION + 1, "version"),
        (5, "<B", 9, "dtype"),
        (8, "<I", 0, "n_layers"),
        (8, "<I", 1 << 30, "n_layers"),
        (12, "<I", 5000, "kv_heads"),
        (16, "<I", 1 << 20, "head_dim"),
        (20, "<I", MAX_TOKENS + 1, "n_tokens"),
        (20, "<I", 21, "claims|sections end|truncated"),
        (24, "<Q", 1 << 62, "start"),
        (32, "<H", 60000, "sections"),
        (32, "<H", 3, "sections|table"),
    ],
)
def test_corrupt_fixed_header(
    payloads: dict[str, bytes], offset: int, fmt: str, value: object, match: str
) -> None:
    buf = bytearray(payloads["k4v2"])
    struct.pack_into(fmt, buf, offset, value)
    with pytest.raises(FormatError, match=match):
        read_header(bytes(buf))


def test_unknown_or_noncanonical_spec(payloads: dict[str, bytes]) -> None:
    payload = payloads["k4v2"]
    spec_at = _FIXED.size
    bad = payload[:spec_at] + b"k5v2-g64-kc" + payload[spec_at + 11 :]
    with pytest.raises(FormatError, match="unknown codec"):
        read_header(bad)
    swapped = payload[:spec_at] + b"k4v2-g64-kt" + payload[spec_at + 11 :]
    with pytest.raises(FormatError, match="claims"):  # kt has another params size at 20 tokens
        read_header(swapped)


def test_lying_section_sizes(payloads: dict[str, bytes]) -> None:
    payload = payloads["k4v2"]
    at = _entry_offset(payload, 0)
    _kind, _flags, length = _ENTRY.unpack_from(payload, at)
    with pytest.raises(FormatError, match="claims"):
        read_header(_patch(payload, at + 2, "<Q", length - 1))
    with pytest.raises(FormatError, match="claims"):
        read_header(_patch(payload, at + 2, "<Q", 1 << 60))
    with pytest.raises(FormatError, match="kind"):
        read_header(_patch(payload, at, "<B", int(Section.V_DATA)))
    with pytest.raises(FormatError, match="no entropy stage"):
        read_header(_patch(payload, at + 1, "<B", 1))
    with pytest.raises(FormatError, match="unknown flags"):
        read_header(_patch(payload, at + 1, "<B", 4))


def test_corrupt_zstd_section(payloads: dict[str, bytes]) -> None:
    payload = payloads["lossless"]
    hdr = read_header(payload)
    _kind, flags, offset, _length = hdr.sections[0]
    assert flags == 1
    buf = bytearray(payload)
    buf[offset : offset + 8] = b"\xff" * 8
    with pytest.raises(FormatError, match="zstd"):
        decode_block(bytes(buf))


def test_corrupt_mask_rejected(payloads: dict[str, bytes]) -> None:
    payload = payloads["k4v2-pe50-sink4"]
    kind, _flags, offset, _length = read_header(payload).sections[-1]
    assert kind == Section.MASK
    buf = bytearray(payload)
    buf[offset] ^= 0xFF
    with pytest.raises(FormatError, match="mask"):
        decode_block(bytes(buf))


def test_decode_after_header_roundtrip_types(payloads: dict[str, bytes]) -> None:
    for payload in payloads.values():
        for view in (bytearray(payload), memoryview(payload)):
            assert read_header(view) == read_header(payload)
            assert decode_block(view).layers[0][0].dtype == torch.float16


_FUZZ_PAYLOADS = {s: encode_block(make_cache(n_layers=2, tokens=20), s, start=3) for s in _SPECS}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(_FUZZ_PAYLOADS)),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_fuzzed_payloads_fail_only_with_format_error(
    name: str, edits: list[tuple[int, int]], cut: int | None
) -> None:
    """Any corruption is either decodable (it hit tensor data) or a FormatError: never a crash."""
    buf = bytearray(_FUZZ_PAYLOADS[name])
    for at, value in edits:
        buf[at % min(len(buf), 160)] = value  # aim at the header, the table and the first bytes of data
    data = bytes(buf if cut is None else buf[: cut % len(buf)])
    try:
        blk = decode_block(data)
    except FormatError:
        return
    assert blk.layers[0][0].shape[-1] == read_header(data).head_dim


def test_rotated_spec_with_odd_head_dim_rejected_by_header() -> None:
    """A forged but self-consistent header must not reach the codecs with an impossible rotation."""
    spec = CodecSpec.parse("k8v8")
    sizes = section_sizes(spec, 1, 1, 96, 4, 0, "float16")
    header = pack_header(spec, 1, 1, 96, 4, 0, "float16", [(kind, 0, size) for kind, size in sizes])
    with pytest.raises(FormatError, match="power-of-two"):
        decode_block(header + bytes(sum(size for _, size in sizes)))


def test_lying_high_section_rejected(payloads: dict[str, bytes]) -> None:
    """hp<N>'s 8-bit token count comes from the HIGH section's length: it must be raw, a whole
    number of tokens, and at most N (and the kept tokens past the sink)."""
    payload = payloads["k4v4-p8-sink4-z-hp8-keep50-r8"]
    hdr = read_header(payload)
    assert hdr.high_tokens == 8
    index = [kind for kind, *_ in hdr.sections].index(Section.HIGH)
    assert index == len(hdr.sections) - 2  # just before the keep mask
    at = _entry_offset(payload, index)
    _kind, _flags, length = _ENTRY.unpack_from(payload, at)
    per_token = length // 8
    for bad, match in ((length - 1, "whole number"), (length + per_token, "at most 8")):
        with pytest.raises(FormatError, match=match):
            read_header(_patch(payload, at + 2, "<Q", bad))
    with pytest.raises(FormatError):  # 0 tokens is well formed, but the other sections then do not add up
        read_header(_patch(payload, at + 2, "<Q", 0))
    with pytest.raises(FormatError, match="raw HIGH"):
        read_header(_patch(payload, at + 1, "<B", 1))  # compressed: its length would not count tokens
    with pytest.raises(FormatError, match="raw HIGH"):
        read_header(_patch(payload, at, "<B", int(Section.SINK)))


def test_lying_low_mask_rejected(payloads: dict[str, bytes]) -> None:
    """lo<L>'s 2-bit tokens are where LOW_MASK says: it must be raw, mark a whole number of tokens
    per head, at most what the spec demotes, only past the fp16 sink and before the 8-bit tokens."""
    payload = payloads["k4v4-p8-sink4-z-hp8-keep80-lo50-r8"]
    hdr = read_header(payload)
    kinds = [kind for kind, *_ in hdr.sections]
    assert kinds[-4:] == [Section.LOW, Section.LOW_MASK, Section.HIGH, Section.MASK]
    assert (hdr.kept_tokens, hdr.low_tokens, hdr.high_tokens) == (18, 6, 8)
    index = kinds.index(Section.LOW_MASK)
    _, _, offset, length = hdr.sections[index]
    at = _entry_offset(payload, index)
    with pytest.raises(FormatError, match="raw LOW_MASK"):
        read_header(_patch(payload, at + 1, "<B", 1))
    for bad in (length - 1, length + 1):  # its length is fixed by the kept tokens
        with pytest.raises(FormatError):
            read_header(_patch(payload, at + 2, "<Q", bad))
    bits = [(payload[offset + i // 8] >> (i % 8)) & 1 for i in range(2 * 3 * 18)]
    assert all(sum(bits[r * 18 : r * 18 + 18]) == 6 for r in range(6))

    def forged(new_bits: list[int]) -> bytes:
        buf = bytearray(payload)
        buf[offset : offset + length] = sum(b << i for i, b in enumerate(new_bits)).to_bytes(length, "little")
        return bytes(buf)

    odd = bits.copy()
    odd[bits.index(0)] = 1  # one more bit: not a whole number of tokens per head
    with pytest.raises(FormatError, match="LOW_MASK sets"):
        read_header(forged(odd))
    uneven = bits.copy()  # head 0 one more, head 1 one fewer: the count is right, the heads are not
    uneven[bits[:18].index(0)] = 1
    uneven[18 + bits[18:36].index(1)] = 0
    with pytest.raises(FormatError, match="exactly 6"):
        decode_block(forged(uneven))
    in_sink = bits.copy()  # slot 0 is the fp16 sink token: never a 2-bit one
    first = bits[:18].index(1)
    in_sink[0], in_sink[first] = 1, 0
    with pytest.raises(FormatError, match="exactly 6"):
        decode_block(forged(in_sink))
