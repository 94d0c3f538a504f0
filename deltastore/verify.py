"""Check every invariant of a store: ``deltastore verify --data-dir DIR`` (or ``--backend URL``).

In one consistent read view it checks: the format markers; every block's payload digest; every
manifest's own digest, its segments covering ``[0, n)`` and pointing at existing blocks whose
token ids hash to the segment keys; that refcounts (store, namespace and session level) equal a
recount from the manifests, with no orphan blocks; session records, snapshot counts and the LRU
index agree; every accounting counter equals a recount from the data; and nothing is
quarantined. Exit status 0 when clean, 1 with a report of each problem otherwise.

``deltastore verify --repair`` makes a damaged store clean again, in one transaction: it drops
quarantined records (set aside by deletes and eviction that met damage, see
:func:`deltastore.store.refcounts.quarantine`), damaged blocks and session records, every snapshot with a
problem (a damaged manifest, a segment whose block is damaged or lost, wrong coverage or token
ids), then sessions left without snapshots, and blocks nothing references; it rewrites session
snapshot counts, the LRU index, refcounts and counters to the recount of what is left. Intact
snapshots are untouched and stay readable; the dropped ones are listed.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from deltastore.accounting import COUNTERS, KS, global_counter_key, ns_counter_key
from deltastore.addressing import Chain, Key, seed
from deltastore.backend import COUNTER_NBYTES, Backend, ReadView, WriteBatch
from deltastore.errors import DeltaStoreError
from deltastore.manifest import (
    QUARANTINE_PREFIX,
    STORE_FORMAT,
    BlockMeta,
    Manifest,
    SessionRecord,
    block_key,
    decode_block,
    global_ref_key,
    lru_key,
    ns_ref_key,
    session_key,
    session_ref_key,
    split_name,
    split_session_prefix,
    turn_of_manifest_key,
)

__all__ = ["RepairReport", "VerifyReport", "add_arguments", "repair_backend", "run", "verify_backend"]

_MAX_SHOWN = 50


@dataclass
class VerifyReport:
    """Problems found (empty when clean) and what was checked."""

    problems: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"clean": self.clean, "problems": self.problems, "checked": self.checked}


@dataclass
class RepairReport:
    """What ``verify --repair`` removed or rewrote, and the verification of the result."""

    actions: list[str] = field(default_factory=list)
    dropped_snapshots: list[str] = field(default_factory=list)
    after: VerifyReport = field(default_factory=VerifyReport)

    def as_dict(self) -> dict[str, Any]:
        return {
            "actions": self.actions,
            "dropped_snapshots": self.dropped_snapshots,
            "after": self.after.as_dict(),
        }


@dataclass
class _Recount:
    """A verification pass over one view: the report, and what a repair needs to act on."""

    report: VerifyReport = field(default_factory=VerifyReport)
    quarantined: list[bytes] = field(default_factory=list)
    damaged_blocks: list[bytes] = field(default_factory=list)
    damaged_sessions: list[bytes] = field(default_factory=list)
    bad_manifests: dict[bytes, str] = field(default_factory=dict)  # raw key -> snapshot name
    sessions: dict[tuple[str, str], SessionRecord] = field(default_factory=dict)
    per_session: Counter[tuple[str, str]] = field(default_factory=Counter)
    lru: set[bytes] = field(default_factory=set)
    orphan_blocks: list[bytes] = field(default_factory=list)
    stored_refs: dict[bytes, int] = field(default_factory=dict)
    expected_refs: dict[bytes, int] = field(default_factory=dict)
    stored_counters: dict[bytes, int] = field(default_factory=dict)
    expected_counters: dict[bytes, int] = field(default_factory=dict)


def _blocks(view: ReadView, rc: _Recount) -> dict[tuple[str, Key], tuple[BlockMeta, bytes, int]]:
    """Every block, digest-checked: (domain, key) -> (meta, token bytes, key+record size)."""
    out: dict[tuple[str, Key], tuple[BlockMeta, bytes, int]] = {}
    for raw_key, value in view.scan("blocks"):
        domain, key = split_name(raw_key)
        try:
            meta, tokens, _ = decode_block(value, key.hex())
        except DeltaStoreError as exc:
            rc.report.problems.append(f"block {domain}/{key.hex()}: {exc.message}")
            rc.damaged_blocks.append(bytes(raw_key))
            continue
        out[(domain, Key(key))] = (meta, bytes(tokens), len(raw_key) + len(value))
    return out


def verify_backend(backend: Backend) -> VerifyReport:
    """Check every invariant of the store on ``backend`` (see the module docstring)."""
    with backend.read() as view:
        report = _recount(view).report
    stray = backend.stray_values()
    report.problems.extend(
        f"stored value {name}: referenced by nothing (a writer that lost its lease wrote it); "
        "`deltastore verify --repair` removes it"
        for name in stray
    )
    report.checked["stray values"] = len(stray)
    return report


def _recount(view: ReadView) -> _Recount:
    rc = _Recount()
    report = rc.report
    problems = report.problems
    found = view.get("meta", b"store_format")
    if found is None or bytes(found) != STORE_FORMAT:
        problems.append(f"store format marker is {None if found is None else bytes(found)!r}")
    for raw_key, _ in view.scan("meta", QUARANTINE_PREFIX):
        rc.quarantined.append(bytes(raw_key))
        kind, _, key = bytes(raw_key)[len(QUARANTINE_PREFIX) :].partition(b"/")
        problems.append(
            f"quarantined {kind.decode('ascii', 'replace')} record {key.hex()}: set aside as damaged "
            "by a delete or an eviction; `deltastore verify --repair` drops it and what depends on it"
        )
    blocks = _blocks(view, rc)

    # Sessions and the LRU index.
    sessions = rc.sessions
    session_bytes: dict[tuple[str, str], int] = {}
    lru: dict[bytes, int] = {}
    for raw_key, value in view.scan("sessions"):
        if raw_key[:1] == b"t":
            lru[bytes(raw_key)] = len(raw_key) + len(value)
            continue
        ns, sess, _ = split_session_prefix(raw_key[1:])
        try:
            sessions[(ns, sess)] = SessionRecord.decode(value)
        except (DeltaStoreError, ValueError, struct.error) as exc:
            problems.append(f"session {ns}/{sess}: {getattr(exc, 'message', exc)}")
            rc.damaged_sessions.append(bytes(raw_key))
            continue
        session_bytes[(ns, sess)] = len(raw_key) + len(value)
    for (ns, sess), rec in sessions.items():
        key = lru_key(rec.last_access_ms, ns, sess)
        if key not in lru:
            problems.append(f"session {ns}/{sess}: no LRU entry at {rec.last_access_ms}")
    expected_lru = {lru_key(r.last_access_ms, ns, s) for (ns, s), r in sessions.items()}
    for key in lru.keys() - expected_lru:
        problems.append(f"LRU entry {key!r} names no session (or a stale time)")
    rc.lru = set(lru)

    # Manifests: recount references and accounting from them.
    g_refs: Counter[tuple[str, Key]] = Counter()
    n_refs: Counter[tuple[str, Key]] = Counter()
    ns_domain: dict[str, str] = {}
    s_refs: Counter[tuple[str, str, Key]] = Counter()
    per_session = rc.per_session
    expect: dict[bytes, int] = defaultdict(int)

    def add(name: str, delta: int, ns: str | None, *, store: bool = True) -> None:
        if store:
            expect[global_counter_key(name)] += delta
        if ns is not None:
            expect[ns_counter_key(ns, name)] += delta

    last: tuple[bytes, str, int] | None = None  # a manifest with a problem is a bad manifest
    for raw_key, value in view.scan("manifests"):
        if last is not None and len(problems) > last[2]:
            rc.bad_manifests[last[0]] = last[1]
        ns, sess, rest = split_session_prefix(raw_key)
        name = f"{ns}/{sess}/{turn_of_manifest_key(rest)}"
        last = (bytes(raw_key), name, len(problems))
        srec = sessions.get((ns, sess))
        if srec is None:
            problems.append(f"manifest {name}: its session does not exist")
            continue
        try:
            m = Manifest.decode(value, name)
        except DeltaStoreError as exc:
            problems.append(f"manifest {name}: {exc.message}")
            continue
        per_session[(ns, sess)] += 1
        add("manifest_bytes", len(raw_key) + len(value), ns)
        add("logical", m.fp16_nbytes, ns)
        add("snapshots", 1, ns)
        if m.block_size != srec.block_size:
            problems.append(f"manifest {name}: block size {m.block_size} != session's {srec.block_size}")
        pos, fp16, tokens, complete = 0, 0, [], True
        for seg in m.segments:
            if seg.start != pos or seg.end <= seg.start:
                problems.append(f"manifest {name}: segment [{seg.start}, {seg.end}) does not follow {pos}")
            pos = seg.end
            g_refs[(srec.domain, seg.key)] += 1
            s_refs[(ns, sess, seg.key)] += 1
            if srec.domain != ns:
                n_refs[(ns, seg.key)] += 1
                ns_domain[ns] = srec.domain
            block = blocks.get((srec.domain, seg.key))
            if block is None:
                problems.append(f"manifest {name}: segment {seg.hex} points at no block")
                complete = False
                continue
            fp16 += block[0].fp16_nbytes
            tokens.append(block[1])
            if block[0].n_tokens != seg.n_tokens:
                problems.append(f"manifest {name}: block {seg.hex} holds {block[0].n_tokens} tokens")
                complete = False
        if pos != m.n_tokens:
            problems.append(f"manifest {name}: segments cover {pos} of {m.n_tokens} tokens")
        elif complete:
            if fp16 != m.fp16_nbytes:
                problems.append(f"manifest {name}: logical bytes {m.fp16_nbytes} != sum of blocks {fp16}")
            chain = Chain(seed(srec.domain, m.model, m.codec, m.block_size), b"".join(tokens), m.block_size)
            bad = [s.hex for s in m.segments if chain.segment_key(s.start, s.end) != s.key]
            if bad:
                problems.append(f"manifest {name}: token ids do not hash to keys {', '.join(bad[:3])}")
    if last is not None and len(problems) > last[2]:
        rc.bad_manifests[last[0]] = last[1]

    for (ns, sess), rec in sessions.items():
        if rec.n_snapshots != per_session[(ns, sess)] or rec.n_snapshots == 0:
            problems.append(
                f"session {ns}/{sess}: record says {rec.n_snapshots} snapshots, found {per_session[(ns, sess)]}"
            )
        index = session_bytes[(ns, sess)] + len(lru_key(rec.last_access_ms, ns, sess))
        add("index_bytes", index, ns)
        add("sessions", 1, ns)

    # Refcounts: stored == recount, both ways; blocks exist exactly while referenced.
    stored_refs = dict(view.scan_counters("refs"))
    expected_refs: dict[bytes, int] = {}
    for (domain, key), count in g_refs.items():
        expected_refs[global_ref_key(domain, key)] = count
    for (ns, key), count in n_refs.items():
        expected_refs[ns_ref_key(ns, key)] = count
    for (ns, sess, key), count in s_refs.items():
        expected_refs[session_ref_key(ns, sess, key)] = count
    for ref_key in stored_refs.keys() | expected_refs.keys():
        got, want = stored_refs.get(ref_key, 0), expected_refs.get(ref_key, 0)
        if got != want:
            problems.append(f"refcount {ref_key.hex()}: stored {got}, recount {want}")
    for domain, key in blocks.keys() - g_refs.keys():
        problems.append(f"block {domain}/{key.hex()}: stored but referenced by no manifest (leak)")
        rc.orphan_blocks.append(block_key(domain, key))
    rc.stored_refs, rc.expected_refs = stored_refs, expected_refs

    for (domain, _key), (meta, _, nbytes) in blocks.items():
        owner = None if domain.startswith("shared:") else domain
        add("unique_fp16", meta.fp16_nbytes, owner)
        add("block_bytes", nbytes, owner)
        add("blocks", 1, owner)
    entry = COUNTER_NBYTES
    for domain, key in g_refs:
        add(
            "index_bytes",
            len(global_ref_key(domain, key)) + entry,
            None if domain.startswith("shared:") else domain,
        )
    for ns, key in n_refs:
        bmeta, _, nbytes = blocks.get((ns_domain[ns], key), (None, b"", 0))
        add("index_bytes", len(ns_ref_key(ns, key)) + entry, ns)
        add("unique_fp16", bmeta.fp16_nbytes if bmeta else 0, ns, store=False)
        add("block_bytes", nbytes, ns, store=False)
        add("blocks", 1, ns, store=False)
    for ns, sess, key in s_refs:
        domain = sessions[(ns, sess)].domain
        bmeta = blocks.get((domain, key), (None,))[0]
        add("index_bytes", len(session_ref_key(ns, sess, key)) + entry, ns)
        add("session_fp16", bmeta.fp16_nbytes if bmeta else 0, ns)

    # Counters: stored == recount, for the store and every namespace.
    stored_counters = dict(view.scan_counters(KS))
    for key in stored_counters.keys() | {k for k, v in expect.items() if v}:
        got, want = stored_counters.get(key, 0), expect.get(key, 0)
        if got != want:
            problems.append(f"counter {key.decode('utf-8', 'replace')}: stored {got}, recount {want}")
    unknown = [k for k in stored_counters if k[:1] == b"g" and k[1:].decode() not in COUNTERS]
    problems.extend(f"unknown counter {k!r}" for k in unknown)
    rc.stored_counters, rc.expected_counters = stored_counters, dict(expect)

    report.checked = {
        "blocks": len(blocks),
        "manifests": sum(per_session.values()),
        "sessions": len(sessions),
        "refcounts": len(stored_refs),
        "counters": len(stored_counters),
    }
    return rc


def repair_backend(backend: Backend) -> RepairReport:
    """Drop what is damaged and what depends on it; recount the rest (see the module docstring).

    One transaction: a crash midway leaves the store as it was. Returns what was done and the
    verification of the result (clean unless something outside these rules is wrong).
    """

    def tx(b: WriteBatch) -> RepairReport:
        out = RepairReport()
        rc = _recount(b)
        for key in rc.quarantined:
            b.delete("meta", key)
            out.actions.append(f"removed quarantined record {key[len(QUARANTINE_PREFIX) :]!r}")
        for key in rc.damaged_blocks:
            b.delete("blocks", key)
            out.actions.append(f"removed damaged block {key.hex()}")
        for key in rc.damaged_sessions:
            b.delete("sessions", key)
            out.actions.append(f"removed damaged session record {key!r}")
        for key, name in rc.bad_manifests.items():
            b.delete("manifests", key)
            out.dropped_snapshots.append(name)
        out.actions.extend(f"dropped snapshot {name}" for name in out.dropped_snapshots)

        rc = _recount(b)  # sessions, LRU and orphans of what is left
        keep_lru = set()
        for (ns, sess), rec in rc.sessions.items():
            n, skey = rc.per_session[(ns, sess)], session_key(ns, sess)
            if n == 0:
                b.delete("sessions", skey)
                out.actions.append(f"removed session {ns}/{sess} (no snapshot left)")
                continue
            keep_lru.add(lru_key(rec.last_access_ms, ns, sess))
            if n != rec.n_snapshots:
                fixed = SessionRecord(rec.domain, rec.block_size, n, rec.created_ms, rec.last_access_ms)
                b.put("sessions", skey, fixed.encode())
        for key in rc.lru - keep_lru:
            b.delete("sessions", key)
        for key in keep_lru - rc.lru:
            b.put("sessions", key, b"")
        for key in rc.orphan_blocks:
            b.delete("blocks", key)
            out.actions.append(f"removed unreferenced block {key.hex()}")

        rc = _recount(b)  # refcounts and counters: set to the recount
        for keyspace, stored, wanted in (
            ("refs", rc.stored_refs, rc.expected_refs),
            (KS, rc.stored_counters, rc.expected_counters),
        ):
            changed = 0
            for key in stored.keys() | wanted.keys():
                delta = wanted.get(key, 0) - stored.get(key, 0)
                if delta:
                    b.incr(keyspace, key, delta)
                    changed += 1
            if changed:
                out.actions.append(f"rewrote {changed} {'refcounts' if keyspace == 'refs' else 'counters'}")
        out.after = _recount(b).report
        return out

    out = backend.transact(tx)
    stray = backend.stray_values()
    if stray:
        removed = backend.remove_stray_values(stray)
        out.actions.append(f"removed {removed} stored value(s) nothing referenced")
    out.after = verify_backend(backend)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", help="the store's LMDB directory")
    where.add_argument(
        "--backend", help="a backend URL, as for `deltastore serve --backend` (e.g. redis://host:port)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--repair",
        action="store_true",
        help="drop quarantined and damaged records and the snapshots that depend on them, recount "
        "the rest, then verify (one transaction; stop writers first for a quiet store)",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deltastore.backends import open_backend
    from deltastore.settings import load_settings

    if args.data_dir is not None:
        path = Path(args.data_dir)
        if not (path / "data.mdb").is_file():
            print(f"verify: {path} holds no store (no data.mdb)", file=sys.stderr)
            return 2
        url = f"lmdb://{path.resolve()}"
    else:
        url = args.backend
    try:
        backend = open_backend(url, load_settings().lmdb)
    except DeltaStoreError as exc:
        print(f"verify: {exc}", file=sys.stderr)
        return 2
    with backend:
        repaired = repair_backend(backend) if getattr(args, "repair", False) else None
        report = verify_backend(backend)
    if repaired is not None and not args.json:
        for line in repaired.actions[:_MAX_SHOWN]:
            print(f"REPAIRED: {line}")
        print(
            f"repair: {len(repaired.actions)} action(s), {len(repaired.dropped_snapshots)} snapshot(s) dropped"
        )
    if args.json:
        out = report.as_dict()
        if repaired is not None:
            out["repair"] = repaired.as_dict()
        print(json.dumps(out, indent=2))
    else:
        checked = ", ".join(f"{v} {k}" for k, v in report.checked.items())
        print(f"checked {checked}")
        for line in report.problems[:_MAX_SHOWN]:
            print(f"PROBLEM: {line}")
        if len(report.problems) > _MAX_SHOWN:
            print(f"... and {len(report.problems) - _MAX_SHOWN} more problems")
        print("clean" if report.clean else f"{len(report.problems)} problem(s) found")
    return 0 if report.clean else 1
