"""Subprocess of the Redis crash test: ``python redis_crash_worker.py URL SEED``.

Extends sessions turn by turn through a Store on the Redis backend at URL, printing
``ACK session turn n_tokens`` after each put returns, until killed.
"""

from __future__ import annotations

import random
import sys

from store_workers import BLOCK, CRASH_SESSIONS, crash_tokens, put_retrying

from deltastore.backends.redis import RedisBackend
from deltastore.settings import StoreConfig
from deltastore.store import Store


def main(url: str, rng_seed: int) -> None:
    rng = random.Random(rng_seed)
    store = Store(RedisBackend.from_url(url), StoreConfig(block_size=BLOCK))
    print("READY", flush=True)
    while True:
        idx = rng.randrange(CRASH_SESSIONS)
        infos = store.list_snapshots("acme", f"s{idx}")
        last = infos[-1] if infos else None
        n = (last.n_tokens if last else 0) + rng.randrange(1, 2 * BLOCK)
        turn = last.turn + 1 if last else 0
        put_retrying(store, f"s{idx}", turn, crash_tokens(idx, n), last.turn if last else None)
        print(f"ACK s{idx} {turn} {n}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
