"""The recommended evicting tiers (keep<P>, recent window at the sequence end) through a real server."""

from __future__ import annotations

import torch
from service_helpers import MODEL, make_cache

from deltastore.client.results import RestoredSnapshot
from deltastore.client.sync import DeltaStoreClient

SPEC = "k4v4-sink4-z-keep50-r64"


def test_keep_tier_round_trips_and_the_next_turn_stores_only_new_tokens(client: DeltaStoreClient) -> None:
    n0, n1 = 200, 260
    cache = make_cache(n1, seed=3)
    turn0 = [(k[:, :n0], v[:, :n0]) for k, v in cache]
    tokens = list(range(9000, 9000 + n1))
    scores = [
        torch.rand(k.shape[0], n0, generator=torch.Generator().manual_seed(i))
        for i, (k, _) in enumerate(turn0)
    ]
    client.put_snapshot("keep", 0, tokens[:n0], turn0, model=MODEL, codec=SPEC, scores=scores)
    got = client.get_snapshot("keep", 0, as_cache=False)
    kept = got.kept_tokens
    # Per 64-token block: the last 64 of the sequence (>= 136) plus half of the block's other tokens:
    # [0,64) 32, [64,128) 32, [128,192) 56 (136..191) + 4 of 128..135, [192,200) 8.
    assert kept == 32 + 32 + 56 + 4 + 8
    for pos in got.positions:
        assert (pos[:, :4] == torch.arange(4)).all()  # sinks
        assert (pos[:, -64:] == torch.arange(n0 - 64, n0)).all()  # recent window at the sequence end
    # The worker continues from the restored (evicted) cache: new tokens appended, only they are encoded.
    grown = [
        (torch.cat([k, nk[:, n0:]], 1), torch.cat([v, nv[:, n0:]], 1))
        for (k, v), (nk, nv) in zip(got.layers, cache, strict=True)
    ]
    put = client.put_snapshot("keep", 1, tokens, grown, model=MODEL, codec=SPEC, parent_turn=0)
    assert put.reused_temporal_bytes > 0 and put.encoded_segments == 2  # [200, 256) and [256, 260)
    again = client.get_snapshot("keep", as_cache=False)
    assert again.turn == 1 and again.n_tokens == n1
    # The last segment's tokens are the newest: all kept.
    for (k, _), (ref, _) in zip(again.layers, cache, strict=True):
        assert torch.allclose(k[:, -4:].float(), ref[:, -4:].float(), atol=0.5)


Layers = list[tuple[torch.Tensor, torch.Tensor]]


def _put_and_get(
    client: DeltaStoreClient, session: str, spec: str, seed: int, first_token: int
) -> tuple[Layers, list[int], Layers, list[int], RestoredSnapshot]:
    """A 150-token snapshot stored with ``spec`` and read back, and the 214-token cache and tokens
    a longer session would store (its first block is the same prefix)."""
    n = 150
    longer = make_cache(n + 64, seed=seed)
    more = list(range(first_token, first_token + n + 64))
    cache, tokens = [(k[:, :n], v[:, :n]) for k, v in longer], more[:n]
    client.put_snapshot(session, 0, tokens, cache, model=MODEL, codec=spec)
    return cache, tokens, longer, more, client.get_snapshot(session, 0, as_cache=False)


def test_newest_tokens_come_back_at_8_bits(client: DeltaStoreClient) -> None:
    """hp<N> through the service: the segments under the window carry the newest tokens at 8 bits,
    and a prefix block sealed by a longer session is the one already stored (dedup)."""
    spec = "k4v4-p8-sink4-z-hp16-keep88-r16"
    n = 150
    cache, _, longer, more, got = _put_and_get(client, "hp", spec, seed=5, first_token=7000)
    for (k, v), (k0, v0), pos in zip(got.layers, cache, got.positions, strict=True):
        assert (pos[:, -16:] == torch.arange(n - 16, n)).all()
        for x, ref, old in ((k, k0, slice(8, 40)), (v, v0, slice(8, 40))):
            src = ref.float().gather(1, pos[..., None].expand(-1, -1, ref.shape[-1]))
            newest = (x[:, -16:].float() - src[:, -16:]).norm() / src[:, -16:].norm()
            older = (x[:, old].float() - src[:, old]).norm() / src[:, old].norm()
            assert newest < 0.01 < older  # 8 bits against 4 bits
    put = client.put_snapshot("hp-longer", 0, more, longer, model=MODEL, codec=spec)
    assert put.reused_shared_bytes > 0 and put.reused_segments >= 1  # [0, 64): before both windows


def test_demoted_tokens_come_back_at_2_bits(client: DeltaStoreClient) -> None:
    """lo<L> through the service: every kept token comes back where it was, the demoted ones
    coarser than the 4-bit ones and than the 8-bit newest, and a prefix block sealed by a longer
    session is the one already stored (dedup)."""
    spec = "k4v4-p8-sink4-z-hp16-keep88-lo72-r32"
    cache, tokens, longer, more, got = _put_and_get(client, "lo", spec, seed=6, first_token=5000)
    # [0,64): 4 sinks + 53 of 60 = 57; [64,128): 54 older -> 48, + 10 in the window; [128,150): all 22
    assert got.kept_tokens == 57 + 58 + 22
    client.put_snapshot("lo-none", 0, tokens, cache, model=MODEL, codec=spec.replace("-lo72", ""))
    plain = client.get_snapshot("lo-none", 0, as_cache=False)

    def value_errors(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Per kept token past the sinks and before the window: relative error of its values."""
        out = []
        for (_, v), (_, v0), pos in zip(layers, cache, got.positions, strict=True):
            src = v0.float().gather(1, pos[..., None].expand(-1, -1, v0.shape[-1]))
            out.append(((v.float() - src).norm(dim=-1) / src.norm(dim=-1))[:, 4:-32])
        return torch.cat(out).flatten()

    assert all(torch.equal(a, b) for a, b in zip(got.positions, plain.positions, strict=True))
    low, four = value_errors(got.layers), value_errors(plain.layers)
    # 86 of these 101 tokens per head are 2-bit: their median error is several times the 4-bit one
    assert low.median() > 2 * four.median()
    assert (low >= four - 1e-3).float().mean() > 0.8
    put = client.put_snapshot("lo-longer", 0, more, longer, model=MODEL, codec=spec)
    assert put.reused_shared_bytes > 0 and put.reused_segments >= 1  # [0, 64): before both windows
