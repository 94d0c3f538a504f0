"""Option up<layers> (per-layer mixed precision, block format version 3): each listed layer is
coded exactly as the one-bit-wider spec codes it, layer after layer in every section; exact sizes."""

from __future__ import annotations

import pytest
import torch
from codec_testlib import DEVICES, make_cache, rel_err

from deltastore.codecs import CodecSpec, decode_block, encode_block, encoded_nbytes, read_header
from deltastore.codecs.format import block_version, pack_header, section_sizes
from deltastore.errors import CodecError, FormatError, InvalidArgument


def test_spec_grammar() -> None:
    spec = CodecSpec.parse("k3v2-up1.3.17-p8-z")
    assert spec.up_layers == (1, 3, 17) and spec.canonical() == "k3v2-g64-kc-p8-up1.3.17-z"
    assert CodecSpec.parse(spec.canonical()) == spec and block_version(spec) == 3
    assert spec.layer_bits(3) == (4, 3) and spec.layer_bits(2) == (3, 2)
    assert CodecSpec.parse("k2v2-up0").layer_bits(0) == (3, 3)
    for bad in (
        "k4v2-up1",
        "k3v4-up1",
        "k8v8-up1",
        "fp8-up1",
        "k3v2-up3.1",
        "k3v2-up1.1",
        "k3v2-up1-up2",
        "k3v2-up",
    ):
        with pytest.raises(InvalidArgument):
            CodecSpec.parse(bad)


def _sections(payload: bytes) -> list[bytes]:
    return [payload[offset : offset + length] for _, _, offset, length in read_header(payload).sections]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("spec_text", "wide"),
    [
        ("k3v2-up1.3.4", "k4v3"),
        ("k3v2-p8-sink4-hp8-pr100000-up0.2", "k4v3-p8-sink4-hp8-pr100000"),
        ("k2v3-kt-g32-up4-keep75-lo25-r8", "k3v4-kt-g32-keep75-lo25-r8"),
    ],
)
def test_each_layer_is_coded_as_its_bits_say(spec_text: str, wide: str, device: str) -> None:
    """Every section is the concatenation, layer by layer, of what the plain (narrow) or the wide
    spec writes for that layer alone; the payload's size is exact."""
    layers = make_cache(n_layers=5, tokens=70, device=device)
    spec = CodecSpec.parse(spec_text)
    narrow = CodecSpec.parse(spec_text.replace(f"-up{'.'.join(map(str, spec.up_layers))}", ""))
    kw = {"seq_end": 90} if spec.evicts else {}
    payload = encode_block(layers, spec, start=10, **kw)
    alone = [
        _sections(encode_block([layer], wide if i in spec.up_layers else narrow, start=10, **kw))
        for i, layer in enumerate(layers)
    ]
    got = _sections(payload)
    for j in range(4):  # K codes, K params, V codes, V params: layer after layer
        assert got[j] == b"".join(s[j] for s in alone)
    assert len(payload) == encoded_nbytes(
        spec, n_layers=5, kv_heads=3, head_dim=64, n_tokens=70, start=10, **kw
    )
    assert read_header(payload).version == 3
    blk = decode_block(payload, device=device)
    for i, ((k, v), (k0, v0)) in enumerate(zip(blk.layers, layers, strict=True)):
        ref = decode_block(encode_block([layers[i]], wide if i in spec.up_layers else narrow, start=10, **kw))
        assert torch.equal(k, ref.layers[0][0].to(device)) and torch.equal(v, ref.layers[0][1].to(device))
        if not spec.evicts:
            assert rel_err(k, k0) < 0.5 and rel_err(v, v0) < 0.5


def test_wider_layers_err_less() -> None:
    layers = make_cache(n_layers=4, tokens=64, seed=2)
    blk = decode_block(encode_block(layers, "k3v2-up1.2"))
    errs = [rel_err(v, v0) for (_, v), (_, v0) in zip(blk.layers, layers, strict=True)]
    assert max(errs[1], errs[2]) < 0.6 * min(errs[0], errs[3])


def test_layers_past_the_cache_are_refused() -> None:
    with pytest.raises(CodecError, match="layer 2"):
        encode_block(make_cache(n_layers=2, tokens=8), "k3v2-up2")
    spec = CodecSpec.parse("k3v2-up2")
    sizes = section_sizes(spec, 2, 1, 64, 4, 0, "float16")
    header = pack_header(spec, 2, 1, 64, 4, 0, "float16", [(kind, 0, size) for kind, size in sizes])
    with pytest.raises(FormatError, match="layer 2"):
        decode_block(header + bytes(sum(size for _, size in sizes)))
