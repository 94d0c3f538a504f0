"""Blocks inside a transaction: header reads, references and their counters, quarantine.

A block lives as long as a snapshot references it. :func:`ref` is the one place a reference is
added or dropped, and it moves the accounting counters (store-wide, per namespace, per session)
in the same transaction, so the savings figures never drift from the data (``verify`` recounts
them). A put adds references, a delete or eviction drops them; both meet damaged records, which
:func:`quarantine` sets aside instead of failing the whole operation.
"""

from __future__ import annotations

import logging

from deltastore.accounting import Ledger
from deltastore.addressing import Key
from deltastore.backend import COUNTER_NBYTES, ReadView, WriteBatch
from deltastore.manifest import (
    BlockMeta,
    block_key,
    block_payload_offset,
    decode_block,
    global_ref_key,
    ns_ref_key,
    quarantine_key,
    session_ref_key,
)

__all__ = ["block_head", "quarantine", "ref"]

log = logging.getLogger(__name__)


def block_head(view: ReadView, domain: str, key: Key, n_tokens: int) -> tuple[BlockMeta, memoryview] | None:
    """A stored block's meta and token ids, reading only its header (never the payload)."""
    head = view.get_head("blocks", block_key(domain, key), block_payload_offset(n_tokens))
    if head is None:
        return None
    data, total = head
    meta, toks, _ = decode_block(data, key.hex(), check=False)
    offset = block_payload_offset(meta.n_tokens)
    return BlockMeta(meta.n_tokens, meta.fp16_nbytes, meta.digest, total - offset, total), toks


def quarantine(b: WriteBatch, kind: bytes, key: bytes, raw: bytes | memoryview) -> None:
    """Set a damaged record aside (``meta`` keyspace) for ``deltastore verify --repair``."""
    qkey = quarantine_key(kind, bytes(key))
    if b.get("meta", qkey) is None:  # the first copy set aside stays
        b.put("meta", qkey, bytes(raw))
    log.warning(
        "quarantined a damaged %s record %s; run `deltastore verify --repair`", kind.decode(), key.hex()
    )


def ref(
    b: WriteBatch,
    ledger: Ledger,
    namespace: str,
    session: str,
    domain: str,
    key: Key,
    meta: BlockMeta,
    delta: int,
) -> tuple[bool, bool]:
    """Add (+1) or drop (-1) one snapshot's reference to a segment; keep counters exact.

    Frees the block when its last reference goes. Returns (whether the session referenced
    the segment before this change, whether the block was freed).
    """
    shared_domain = domain != namespace
    block_nbytes = len(block_key(domain, key)) + meta.record_nbytes

    def edge(count: int) -> int:
        """+1 when the entry was just created, -1 when just removed, else 0."""
        if delta > 0:
            return 1 if count == delta else 0
        return -1 if count == 0 else 0

    gkey = global_ref_key(domain, key)
    g = edge(b.incr("refs", gkey, delta))
    if g:
        # Store-wide: the block itself and its refcount entry. Unshared domain: also the namespace's.
        ns = None if shared_domain else namespace
        ledger.add("unique_fp16", g * meta.fp16_nbytes, namespace=ns)
        ledger.add("block_bytes", g * block_nbytes, namespace=ns)
        ledger.add("index_bytes", g * (len(gkey) + COUNTER_NBYTES), namespace=ns)
        ledger.add("blocks", g, namespace=ns)
        if g < 0:
            b.delete("blocks", block_key(domain, key))
    if shared_domain:
        # The namespace as if stored alone: the block and a refcount entry of its own.
        nkey = ns_ref_key(namespace, key)
        n = edge(b.incr("refs", nkey, delta))
        if n:
            entry = len(nkey) + COUNTER_NBYTES
            ledger.add("index_bytes", n * entry)
            ledger.add("unique_fp16", n * meta.fp16_nbytes, namespace=namespace, store=False)
            ledger.add("block_bytes", n * block_nbytes, namespace=namespace, store=False)
            ledger.add("index_bytes", n * entry, namespace=namespace, store=False)
            ledger.add("blocks", n, namespace=namespace, store=False)
    skey = session_ref_key(namespace, session, key)
    count = b.incr("refs", skey, delta)
    s = edge(count)
    if s:
        ledger.add("session_fp16", s * meta.fp16_nbytes, namespace=namespace)
        ledger.add("index_bytes", s * (len(skey) + COUNTER_NBYTES), namespace=namespace)
    return count - delta > 0, g < 0
