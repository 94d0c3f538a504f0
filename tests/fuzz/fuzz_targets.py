"""Coverage-guided fuzzing (atheris, libFuzzer) of what parses bytes from a caller.

``python tests/fuzz/fuzz_targets.py TARGET [libFuzzer flags...]``, e.g.
``-max_total_time=10 -print_final_stats=1``. Targets:

- ``block``: the block format. ``read_header`` either answers or raises a DeltaStore error;
  a header it accepts decodes (``decode_block``) or raises a DeltaStore error, and the decoded
  tensors have the shapes the header declares. Seeds: real blocks of every codec family.
- ``wire``: the request decoders. The hand parser of chunk messages never raises and agrees with
  protobuf on what it accepts; every request type's deserializer, as the server wraps it, never
  raises; a stream of fuzzed chunks through the server's chunk assembler ends in payloads or a
  DeltaStore error, never more memory than the limits allow.

Anything else (an IndexError, a torch RuntimeError, an allocation the header did not declare) is
a finding: libFuzzer stops, writes the input to ``crash-*`` and exits non-zero.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["deltastore"]):
    from deltastore.codecs.format import read_header
    from deltastore.errors import DeltaStoreError
    from deltastore.server.service import method_handlers
    from deltastore.v1 import deltastore_pb2 as pb
    from deltastore.v1 import deltastore_pb2_grpc as pb_grpc
    from deltastore.v1.protocol import ChunkAssembler, WireChunk, encode_chunk_message, parse_chunk_message

MAX_DECODE_FP16_BYTES = 4 << 20
"""Headers declaring more FP16 bytes than this are not decoded (the fuzzer's memory, not a finding)."""

SEED_SPECS = (
    "lossless",
    "fp8",
    "k4v4",
    "k4v2",
    "k2v2-sink4",
    "k4v4-p8-sink4-z",
    "k4v2-keep50-r8",
    "k4v4-hp4",
)


def block_seeds() -> list[bytes]:
    """Real blocks: small shapes, every codec family (quantized, fp8, lossless, eviction, zstd)."""
    import torch

    from deltastore.codecs import CodecSpec, encode_block

    gen = torch.Generator().manual_seed(0)
    layers = [
        (torch.randn(2, 24, 32, generator=gen), torch.randn(2, 24, 32, generator=gen)) for _ in range(2)
    ]
    layers = [(k.half(), v.half()) for k, v in layers]
    seeds = []
    for text in SEED_SPECS:
        try:
            spec = CodecSpec.parse(text)
        except DeltaStoreError:  # a grammar this version does not have
            continue
        seeds.append(bytes(encode_block(layers, spec, start=64)))
    return seeds


def fuzz_block(data: bytes) -> None:
    try:
        header = read_header(data)
    except DeltaStoreError:
        return
    if header.fp16_nbytes > MAX_DECODE_FP16_BYTES:
        return
    from deltastore.codecs import decode_block

    try:
        block = decode_block(data)
    except DeltaStoreError:
        return
    if len(block.layers) != header.n_layers:
        raise AssertionError(f"{len(block.layers)} layers decoded, header says {header.n_layers}")
    for k, v in block.layers:
        if k.shape[0] != header.kv_heads or k.shape[-1] != header.head_dim or k.shape != v.shape:
            raise AssertionError(f"decoded {tuple(k.shape)}/{tuple(v.shape)} against header {header}")
        if k.shape[1] > header.n_tokens:
            raise AssertionError(f"{k.shape[1]} tokens decoded of {header.n_tokens} declared")


_REQUEST_PARSERS: list = []


def _request_parsers() -> list:
    """Every rpc's request deserializer exactly as the server registers it (never raises)."""
    if not _REQUEST_PARSERS:
        handlers = method_handlers(pb_grpc.DeltaStoreServicer())
        _REQUEST_PARSERS.extend(h.request_deserializer for h in handlers.values())
    return _REQUEST_PARSERS


def wire_seeds() -> list[bytes]:
    chunks = list(encode_chunk_message(b"k" * 32, b"0123456789" * 7, 16))
    header = pb.PutSnapshotRequest(
        header=pb.SnapshotHeader(
            namespace="ns", session="s", turn=1, model="m", codec="k4v2", token_ids=[1, 2]
        )
    ).SerializeToString()
    plan = pb.PlanSnapshotRequest(namespace="ns", session="s", token_ids=list(range(70))).SerializeToString()
    return [*map(bytes, chunks), header, plan]


def fuzz_wire(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
    chunk = parse_chunk_message(raw)
    if chunk is not None:  # the hand parser accepted it: protobuf reads the same fields
        msg = pb.PutSnapshotRequest.FromString(raw)
        if (msg.chunk.key, msg.chunk.offset, msg.chunk.total_bytes, msg.chunk.data) != (
            chunk.key,
            chunk.offset,
            chunk.total_bytes,
            bytes(chunk.data),
        ):
            raise AssertionError(f"hand parser and protobuf disagree on {raw!r}")
    for parse in _request_parsers():
        parse(raw)  # must never raise: a Malformed marker at worst
    limit = fdp.ConsumeIntInRange(1, 1 << 12)
    assembler = ChunkAssembler(max_payload_bytes=limit, max_total_bytes=4 * limit, digest=True)
    try:
        for _ in range(fdp.ConsumeIntInRange(0, 8)):
            key = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 33))
            offset = fdp.ConsumeIntInRange(0, 1 << 13)
            total = fdp.ConsumeIntInRange(0, 1 << 13)
            body = memoryview(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256)))
            done = assembler.add(WireChunk(key, offset, total, body))
            if done is not None and (len(done.data) > limit or assembler.total_bytes > 4 * limit):
                raise AssertionError("a payload past the assembler's limits was accepted")
        assembler.finish()
    except DeltaStoreError:
        return


TARGETS = {"block": (fuzz_block, block_seeds), "wire": (fuzz_wire, wire_seeds)}


def main(argv: list[str]) -> None:
    name, flags = argv[1], argv[2:]
    target, seeds = TARGETS[name]
    folders = [Path(f) for f in flags if not f.startswith("-")]
    for corpus in folders[:1]:  # libFuzzer reads seeds from, and adds finds to, the first folder
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds()):
            (corpus / f"seed-{i}").write_bytes(seed)
    if name == "wire":
        _request_parsers()  # built once, outside the measured loop
    atheris.Setup([argv[0], *flags], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
