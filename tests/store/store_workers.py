"""Subprocess workers of the crash and concurrency tests: ``python store_workers.py MODE DIR ARG``.

``crash``: keeps extending sessions (and sometimes deleting one) with the default durable
settings, printing ``ACK ...`` after each call returns (and ``BEGIN DEL`` before a delete), until
killed.
``overlap``: puts snapshots sharing one system prompt, then exits.
Tokens are a pure function of (session, length) and payloads of their key, so the parent can
check every acknowledged snapshot bit for bit.
"""

from __future__ import annotations

import random
import sys

from store_testlib import payloads, random_tokens

from deltastore.errors import MissingSegments
from deltastore.settings import StoreConfig
from deltastore.store import Store

CRASH_SESSIONS = 4
BLOCK = 16
SYSTEM = random_tokens(4242, 5 * BLOCK)


def crash_tokens(session: int, n: int) -> list[int]:
    return random_tokens(1000 + session, n)


def overlap_tokens(worker: int, session: int) -> list[int]:
    return SYSTEM + random_tokens(10_000 * worker + session, 2 * BLOCK + 5)


def put_retrying(store: Store, session: str, turn: int, tokens: list[int], parent: int | None) -> None:
    """A client's loop: plan, send what is missing, plan again if a segment vanished meanwhile."""
    for _ in range(10):
        plan = store.plan_snapshot("acme", session, "m1", "k4v2", tokens, parent)
        try:
            store.put_snapshot("acme", session, turn, "m1", "k4v2", tokens, payloads(plan), parent)
            return
        except MissingSegments:
            continue
    raise RuntimeError("segments kept vanishing")


def crash(data_dir: str, rng_seed: int) -> None:
    rng = random.Random(rng_seed)
    store = Store.open(data_dir, StoreConfig(block_size=BLOCK))  # durable defaults: sync=True
    print("READY", flush=True)
    while True:
        idx = rng.randrange(CRASH_SESSIONS)
        session = f"s{idx}"
        infos = store.list_snapshots("acme", session)
        if infos and rng.random() < 0.08:
            print(f"BEGIN DEL {session}", flush=True)  # a kill may land after the commit, before the ACK
            store.delete_session("acme", session)
            print(f"ACK DEL {session}", flush=True)
            continue
        last = infos[-1] if infos else None
        n = (last.n_tokens if last else 0) + rng.randrange(1, 2 * BLOCK)
        turn = last.turn + 1 if last else 0
        put_retrying(store, session, turn, crash_tokens(idx, n), last.turn if last else None)
        print(f"ACK PUT {session} {turn} {n}", flush=True)


def overlap(data_dir: str, worker: int) -> None:
    store = Store.open(data_dir, StoreConfig(block_size=BLOCK))
    for session in range(6):
        put_retrying(store, f"w{worker}-{session}", 0, overlap_tokens(worker, session), None)
    store.close()


if __name__ == "__main__":
    mode, directory, arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
    {"crash": crash, "overlap": overlap}[mode](directory, arg)
