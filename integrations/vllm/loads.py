"""The worker's loads: a step's stored prefixes land in vLLM's paged cache layer by layer, on a
background thread, while the forward pass runs the layers already there.

One step with loads:

- ``start_load_kv`` (before the forward): :meth:`LayerLoader.start` hands the step's loads to the
  loader thread and returns at once.
- Loader thread: ``fetch_prefix`` of each load (payloads checked by the client: digests, codec,
  coverage, bounds; through shared memory when configured), a :class:`BlockDecoder` over the
  segments the load writes; then for layer 0, 1, ...: that layer of every load decoded on the
  cache's device and scattered into the load's blocks, then the layer is signalled.
- ``wait_for_layer_load(name)`` (vLLM's attention decorator, before each attention layer):
  :meth:`LayerLoader.wait_layer` blocks until that layer is signalled.
- ``get_block_ids_with_load_errors`` (after the forward): :meth:`LayerLoader.finish` waits for
  the step's last layer and returns every block of every load that failed anywhere: the fetch
  (store down, deadline, DATA_LOSS), a short answer, a layer count that is not the model's, or a
  layer's decode or scatter.

Why all of a failed load's blocks, even when some layers were written: for a sync load, vLLM
0.32's scheduler (``_update_requests_with_invalid_blocks``) cuts the request's computed tokens at
its first reported block, drops the step's output for it and recomputes from there, which
rewrites every layer of those blocks. KV written before the failure is never used.

Bounded: every wait returns by the step's deadline (``load_timeout_s`` after ``start``). At the
deadline the step is cancelled under the lock that every scatter holds, so nothing is written
after a wait gave up, and its unfinished loads fail (recomputed), as a fetch failing before any
layer does: the waits of every layer return either way.

On an accelerator the loader enqueues on its own stream: it starts after the work queued before
``start`` (vLLM zeroing new blocks), and each wait makes the forward's stream wait for the event
recorded after that layer's scatters (on CPU every op is done when it returns).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from deltastore.codecs.block import BlockDecoder

if TYPE_CHECKING:
    from deltastore.client.results import FetchedPrefix
    from deltastore.integrations.vllm.stats import Counters

__all__ = ["LayerLoader", "LoadSpec"]

log = logging.getLogger("vllm.deltastore")

KVLayer = tuple[torch.Tensor, torch.Tensor]  # K and V views [num_blocks, kv_heads, block_size, head_size]


@dataclasses.dataclass
class LoadSpec:
    req_id: str
    token_ids: list[int]  # the prompt up to ``end``
    start: int  # first token to write (the tokens before are computed locally)
    end: int
    block_ids: list[int]

    def blocks(self, block_size: int) -> set[int]:
        """The paged blocks it writes: the ones a failure reports."""
        return set(self.block_ids[self.start // block_size : -(-self.end // block_size)])


class _Cancelled(Exception):
    """The step's deadline passed: write nothing more."""


@dataclasses.dataclass
class _Load:
    """One load of a step, as the loader works on it."""

    spec: LoadSpec
    blocks: set[int]  # every block it writes (reported when it fails)
    started: float
    fetched: FetchedPrefix | None = None
    decoder: BlockDecoder | None = None
    offset: int = 0  # absolute position of the decoder's first token
    slots: tuple[torch.Tensor, torch.Tensor] | None = None  # (block ids, offsets) of its tokens
    failed: bool = False
    done: bool = False


class _Step:
    """One step's loads and how far they landed; ``cond`` guards it and every scatter."""

    def __init__(self, loads: list[_Load], n_layers: int, deadline: float, ready: torch.Event | None) -> None:
        self.loads = loads
        self.n_layers = n_layers
        self.deadline = deadline
        self.ready = ready  # recorded on the forward's stream at start (None on CPU)
        self.cond = threading.Condition()
        self.landed = 0  # layers signalled (each layer of every load: written, or its load failed)
        self.cancelled = False
        self.events: list[torch.Event | None] = []  # per landed layer, after its scatters
        self.last: torch.Event | None = None  # after the latest scatter

    def check(self) -> None:
        """Raise :class:`_Cancelled` once the step is cancelled (a plain read: the flag only goes up)."""
        if self.cancelled:
            raise _Cancelled

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self.cond:
            if self.cancelled:
                raise _Cancelled
            yield

    def land(self, event: torch.Event | None) -> None:
        with self.cond:
            self.events.append(event)
            self.landed += 1
            self.cond.notify_all()

    def wait(self, layers: int) -> bool:
        """Until ``layers`` layers landed or the deadline (then cancel); True if they landed."""
        with self.cond:
            while self.landed < layers and not self.cancelled:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    self.cancelled = True  # no scatter runs past this point (they hold cond)
                    for load in self.loads:
                        load.failed |= not load.done
                    break
                self.cond.wait(left)
            return self.landed >= layers


class LayerLoader:
    """Runs each step's loads on a background thread and lets the forward pass wait per layer.

    Args:
        fetch: one load's checked payloads (``DeltaStoreClient.fetch_prefix``) within a timeout
            (seconds), None if nothing matched; raises on failure.
        kv: per layer, K and V views of the paged cache (``connector.split_kv``).
        block_size: vLLM's tokens per block.
        counters: the connector's counters.
        on_error: logs a failed load (and pauses the store when it is down).
        timeout_s: a step's deadline, from ``start``.
    """

    def __init__(
        self,
        fetch: Callable[[LoadSpec, float], FetchedPrefix | None],
        kv: list[KVLayer],
        block_size: int,
        counters: Counters,
        on_error: Callable[[str, BaseException], None],
        timeout_s: float,
    ) -> None:
        self._fetch, self._kv, self._block_size = fetch, kv, block_size
        self._counters, self._on_error, self._timeout_s = counters, on_error, timeout_s
        self._device = kv[0][0].device
        # Two threads: a step whose store call overruns its deadline (it is cancelled and writes
        # nothing more) must not hold up the next step's loads; a third stuck step queues.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deltastore-load")
        self._stream = torch.Stream(device=self._device) if self._device.type != "cpu" else None
        self._step: _Step | None = None

    # -- the forward's side --------------------------------------------------------------------

    def start(self, loads: list[LoadSpec]) -> None:
        """Start the step's loads; returns at once. The previous step must be finished."""
        if not loads:
            return
        ready = None
        if self._device.type != "cpu":
            ready = torch.Event(device=self._device)
            ready.record()
        now = time.perf_counter()
        step = _Step(
            [_Load(spec, spec.blocks(self._block_size), now) for spec in loads],
            len(self._kv),
            time.monotonic() + self._timeout_s,
            ready,
        )
        self._step = step
        self._pool.submit(self._run, step)

    def wait_layer(self, layer: int) -> None:
        """Block until ``layer`` of every load of this step is in the paged cache (or its load
        failed, or the deadline passed)."""
        step = self._step
        if step is None:
            return
        started = time.perf_counter()
        landed = step.wait(layer + 1)
        self._counters.add(layer_waits=1, load_wait_seconds=time.perf_counter() - started)
        event = step.events[layer] if landed else step.last
        if event is not None:
            event.wait()  # the forward's stream waits for the loader's scatters

    def finish(self) -> set[int]:
        """Wait for the step's last layer (at most until its deadline): the blocks of every load
        that failed, to report as load errors. No write of this step follows."""
        step, self._step = self._step, None
        if step is None:
            return set()
        step.wait(step.n_layers)
        if step.last is not None:
            step.last.wait()
        failed = [load for load in step.loads if load.failed]
        if failed:
            self._counters.add(load_errors=len(failed))
        return set().union(*(load.blocks for load in failed))

    def shutdown(self) -> None:
        """Cancel a step in flight and stop the loader thread."""
        step = self._step
        if step is not None:
            step.deadline = 0.0
            step.wait(step.n_layers)
        self._pool.shutdown(wait=True)

    # -- the loader thread ---------------------------------------------------------------------

    def _run(self, step: _Step) -> None:
        try:
            with self._stream if self._stream is not None else contextlib.nullcontext():
                if step.ready is not None:
                    step.ready.wait()
                for load in step.loads:
                    step.check()  # past the deadline: fetch nothing more (the next step waits)
                    self._open(load, step.deadline)
                for layer in range(step.n_layers):
                    step.check()
                    for load in step.loads:
                        if not load.failed:
                            self._write(step, load, layer)
                    if layer == step.n_layers - 1:  # counted before the last wait returns
                        for load in step.loads:
                            self._landed(load)
                    step.land(self._record(step))
        except _Cancelled:
            log.warning("DeltaStore loads passed their %.1fs deadline; recomputing", self._timeout_s)
        except BaseException as exc:  # never leave a wait hanging: fail what is left
            for load in step.loads:
                load.failed |= not load.done
            self._on_error("load", exc)
        finally:
            for load in step.loads:
                if load.fetched is not None:
                    load.fetched.close()
            step.deadline = 0.0  # every wait still pending returns now
            with step.cond:
                step.cond.notify_all()

    def _open(self, load: _Load, deadline: float) -> None:
        """Fetch one load and prepare its decoder and slots; a failure fails the load."""
        spec = load.spec
        try:
            load.fetched = fetched = self._fetch(spec, max(0.001, deadline - time.monotonic()))
            got = 0 if fetched is None else fetched.n_tokens
            if fetched is None or got < spec.end:
                raise LookupError(f"the store returned {got} of {spec.end} tokens")
            if list(fetched.info.token_ids[: spec.end]) != spec.token_ids[: spec.end]:
                raise LookupError("the store returned the KV of other tokens")
            # only the segments holding tokens [start, end) are decoded
            segments = list(fetched.info.segments)
            chosen = [i for i, s in enumerate(segments) if s.end > spec.start and s.start < spec.end]
            load.offset = segments[chosen[0]].start
            load.decoder = BlockDecoder(
                [fetched.payloads[i] for i in chosen], device=self._device, dtype=self._kv[0][0].dtype
            )
            if load.decoder.n_layers != len(self._kv):
                raise LookupError(
                    f"the store holds {load.decoder.n_layers} layers, the model {len(self._kv)}"
                )
            pos = torch.arange(spec.start, spec.end, device=self._device)
            ids = torch.tensor(spec.block_ids, device=self._device)
            load.slots = ids[pos // self._block_size], pos % self._block_size
        except Exception as exc:
            load.failed = True
            self._on_error(f"load of {spec.end - spec.start} tokens", exc)

    def _write(self, step: _Step, load: _Load, layer: int) -> None:
        """Decode one layer of one load and scatter it into the load's blocks."""
        spec = load.spec
        assert load.decoder is not None and load.slots is not None
        try:
            blocks = load.decoder.decode(slice(layer, layer + 1))
            a, b = spec.start - load.offset, spec.end - load.offset
            k = torch.cat([blk.layers[0][0] for blk in blocks], dim=1)[:, a:b].permute(1, 0, 2)
            v = torch.cat([blk.layers[0][1] for blk in blocks], dim=1)[:, a:b].permute(1, 0, 2)
            kc, vc = self._kv[layer]
            ids, offsets = load.slots
            want = (len(ids), kc.shape[1], kc.shape[3])
            if k.shape != want or v.shape != want:  # never broadcast a wrong shape into the cache
                raise LookupError(f"stored layer {layer} is {tuple(k.shape)}, the cache wants {want}")
            with step.writing():
                kc[ids, :, offsets] = k
                vc[ids, :, offsets] = v
                step.last = self._record(step)
        except _Cancelled:
            raise
        except Exception as exc:
            load.failed = True
            self._on_error(f"load of {spec.end - spec.start} tokens (layer {layer})", exc)
            return
        self._counters.add(layers_loaded=1)

    def _record(self, step: _Step) -> torch.Event | None:
        if self._device.type == "cpu":
            return None
        event = torch.Event(device=self._device)
        event.record()
        return event

    def _landed(self, load: _Load) -> None:
        load.done = True
        if load.failed:
            return
        spec = load.spec
        seconds = time.perf_counter() - load.started
        assert load.fetched is not None
        self._counters.add(
            loads=1,
            tokens_loaded=spec.end - spec.start,
            bytes_loaded=load.fetched.payload_bytes,
            load_seconds=seconds,
        )
        log.info("DeltaStore loaded %d tokens for %s in %.3fs", spec.end - spec.start, spec.req_id, seconds)
