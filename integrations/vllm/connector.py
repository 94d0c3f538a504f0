"""``DeltaStoreConnector``: DeltaStore as a vLLM KV connector (v1 API, vLLM 0.32-0.33).

Load it with::

    --kv-transfer-config '{"kv_connector": "DeltaStoreConnector",
      "kv_connector_module_path": "deltastore.integrations.vllm.connector",
      "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
      "kv_connector_extra_config": {"target": "127.0.0.1:50051", "codec": "k4v2"}}'

How it works (one request):

- Scheduler, ``get_num_new_matched_tokens``: LookupPrefix of the prompt (all but its last token)
  under this model's fingerprint and the codec: how many leading tokens the store holds. The
  token prefix (its chain hash) is the key, so a later turn of a chat finds its earlier turns
  without a session id. While a save of a prefix of this prompt is still in flight the answer is
  "ask again" (None), so turn t+1 sees what turn t just stored.
- Scheduler, ``update_state_after_alloc`` / ``build_connector_meta``: the load plan (tokens
  ``[start, end)`` and the request's block ids) goes to the workers with the step.
- Worker, ``start_load_kv`` (before the forward pass): starts the step's loads on a background
  thread and returns (``loads.py``): the stored blocks are fetched (checked by the client:
  digests, codec, coverage; shared memory when ``shm_dir`` is set), then decoded on the KV
  cache's device in its dtype and scattered into the allocated paged blocks one layer at a time;
  ``wait_for_layer_load`` (before each attention layer) waits only for its layer. Any failure
  (store down, deadline, DATA_LOSS, model/codec mismatch, short answer, a layer that fails)
  reports all of the load's blocks in ``get_block_ids_with_load_errors``; with
  ``kv_load_failure_policy="recompute"`` vLLM recomputes them. Nothing is ever fatal to the
  engine.
- Scheduler, ``request_finished``: every computed token (prompt and answer, rounded down to
  ``lcm(vLLM block size, store block size)``) is saved: the request's blocks are held
  (``True``) and a save job goes to the workers with the next step.
- Worker: the save runs on a background thread: it gathers the blocks from the paged cache,
  plans the snapshot (only segments the store lacks are encoded, on the cache's device) and puts
  it; then ``get_finished`` reports the request so vLLM frees its blocks. Failed saves are
  dropped and counted. ``has_pending_push_work`` keeps the engine stepping until saves finish.

Identity: without session info a save is recorded under a session named after the prefix hash
(``vllm-<hash>``, turn 0). With ``SamplingParams(extra_args={"kv_transfer_params": ...})`` or the
OpenAI server's ``kv_transfer_params`` set to ``{"deltastore": {"session": "chat-42", "turn": 3}}``
it is recorded as that session's turn (parent: the turn before, when stored), so per-session
savings, temporal deltas and ``/v1/sessions`` work as for HF workers.

Modules: this one holds the connector class (vLLM's API is one class whose scheduler and worker
halves exchange the metadata defined here) and its saves; ``loads.py`` the worker's layer-by-layer
loads, ``stats.py`` the counters, ``config.py`` the configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import blake3
import grpc
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from deltastore.addressing import token_bytes
from deltastore.client.sync import DeltaStoreClient
from deltastore.client.wire import Retry, error_type
from deltastore.errors import InvalidArgument, NotConfigured
from deltastore.integrations.vllm.config import (
    ConnectorConfig,
    plain_rope_theta,
    save_alignment,
    vllm_fingerprint,
)
from deltastore.integrations.vllm.loads import LayerLoader, LoadSpec
from deltastore.integrations.vllm.stats import (
    Counters,
    DeltaStoreConnectorStats,
    connector_totals,
    instances,
    register,
)
from deltastore.manifest import check_session

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from deltastore.client.results import FetchedPrefix

__all__ = ["DeltaStoreConnector", "DeltaStoreConnectorStats", "connector_totals", "wait_for_saves"]

log = logging.getLogger("vllm.deltastore")  # under "vllm": the engine's log handlers and level

# -- metadata ----------------------------------------------------------------------------------


@dataclasses.dataclass
class SaveSpec:
    req_id: str
    token_ids: list[int]  # every token to save (an aligned count)
    block_ids: list[int]
    session: str | None
    turn: int | None


@dataclasses.dataclass
class DeltaStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = dataclasses.field(default_factory=list)
    saves: list[SaveSpec] = dataclasses.field(default_factory=list)


def wait_for_saves(llm: Any, timeout: float = 120.0) -> bool:
    """Step an in-process ``vllm.LLM`` until this process's connectors have no save in flight.

    Offline ``LLM.generate`` stops stepping the engine when the last request finishes, before the
    save that ``request_finished`` queued reaches a worker (``vllm serve`` keeps stepping by
    itself: ``has_pending_push_work``). Returns False on timeout.
    """
    deadline = time.monotonic() + timeout
    while any(isinstance(i, DeltaStoreConnector) and i.has_pending_push_work() for i in instances()):
        if time.monotonic() > deadline:
            return False
        llm.llm_engine.step()
        time.sleep(0.005)
    return True


# -- KV layout ---------------------------------------------------------------------------------


def _layer_index(name: str) -> int:
    nums = re.findall(r"\d+", name)
    return int(nums[0]) if nums else 0


def split_kv(kv: torch.Tensor, head_size: int, *, cpu_backend: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views ``[num_blocks, kv_heads, block_size, head_size]`` of one layer's paged cache.

    vLLM 0.32 hands connectors a ``[num_blocks, kv_heads, block_size, 2 * head_size]`` view per
    layer. The CPU backend reads each block-head's ``block_size x 2*head_size`` bytes as
    ``2*block_size x head_size``: all keys, then all values (``cpu_attn.py``); the GPU backends
    split the last axis (``key, value = kv.split(head_size, -1)``, ``flash_attn.py``).
    """
    if kv.dim() != 4 or kv.shape[-1] != 2 * head_size:
        raise ValueError(f"unsupported KV cache layout {tuple(kv.shape)} (head size {head_size})")
    if cpu_backend:
        b, h, n, _ = kv.shape
        both = kv.view(b, h, 2, n, head_size)
        return both[:, :, 0], both[:, :, 1]
    return kv[..., :head_size], kv[..., head_size:]


# -- the connector -----------------------------------------------------------------------------


def _keyed_by_tokens(request: Request) -> bool:
    """Is the request's KV a function of its token ids and the model alone?

    A LoRA adapter, multimodal inputs (images share placeholder tokens) or a cache salt (vLLM's
    per-tenant prefix-cache isolation) change the KV of the same tokens: such requests are neither
    looked up nor saved, so KV of one never serves another.
    """
    return request.lora_request is None and not request.mm_features and not request.cache_salt


def _session_params(request: Request) -> tuple[str | None, int | None]:
    """``kv_transfer_params={"deltastore": {"session": str, "turn": int >= 0}}``, validated.

    They come from API callers: anything malformed is logged and ignored (the KV is still saved
    under its prefix), never raised into the engine.
    """
    params = request.kv_transfer_params
    ours = params.get("deltastore") if isinstance(params, dict) else None
    if ours is None:
        return None, None
    session, turn = (ours.get("session"), ours.get("turn")) if isinstance(ours, dict) else (None, None)
    try:
        if not isinstance(ours, dict) or session is None:
            raise InvalidArgument("expected {'session': str, 'turn': int}")
        check_session(session)
        if turn is not None and (
            isinstance(turn, bool) or not isinstance(turn, int) or not 0 <= turn < 1 << 32
        ):
            raise InvalidArgument(f"turn {turn!r} is not a non-negative integer")
    except InvalidArgument as exc:
        log.warning("request %s: kv_transfer_params.deltastore ignored: %s", request.request_id, exc)
        return None, None
    return session, turn


class _StoreSkipped(ConnectionError):
    """The store is being skipped after a failure (already logged): no new warning, no new cooldown."""


def _shm_unusable(exc: grpc.RpcError | NotConfigured) -> bool:
    """Whether a shared-memory read failed because shared memory cannot work in this setup (the
    server has no --shm-dir, the caller is not on its socket, an older server, or ``shm_dir`` is
    not the server's directory here), as opposed to a failure of the store or of the data."""
    if isinstance(exc, NotConfigured):
        return True
    return exc.code() == grpc.StatusCode.UNIMPLEMENTED or error_type(exc) == "NotConfigured"


class DeltaStoreConnector(KVConnectorBase_V1):
    """DeltaStore as vLLM's KV connector; see the module docstring."""

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Loads land layer by layer (``wait_for_layer_load``), which a CUDA graph replay would
        skip: the forward could read blocks before they are written. vLLM runs piecewise graphs
        (attention outside the graph) when this says so."""
        return bool(extra_config.get("load", True))

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        mc = vllm_config.model_config
        self.cfg = ConnectorConfig.from_extra(
            self._kv_transfer_config.kv_connector_extra_config, rope_theta=plain_rope_theta(mc.hf_config)
        )
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ValueError("DeltaStoreConnector supports tensor_parallel_size=1 only (not verified beyond)")
        groups = len(kv_cache_config.kv_cache_groups) if kv_cache_config is not None else 1
        if groups != 1:
            # loads and saves address every layer with one request's block ids (group 0's)
            raise ValueError(
                f"DeltaStoreConnector supports one KV cache group, the engine has {groups} (hybrid "
                "KV cache manager: sliding-window or mamba layers); leave it disabled"
            )
        self.block_size = vllm_config.cache_config.block_size
        self.align = save_alignment(self.block_size, self.cfg.store_block_size)
        self.head_size = mc.get_head_size()
        self.model = vllm_fingerprint(
            mc.model,
            mc.hf_config,
            f"{mc.dtype}/{vllm_config.cache_config.cache_dtype}",
            mc.get_num_layers(vllm_config.parallel_config),
            mc.get_num_kv_heads(vllm_config.parallel_config),
            self.head_size,
        )
        self.counters = Counters()
        self._client: DeltaStoreClient | None = None
        self._down_until = 0.0
        self._shm = self.cfg.shm_dir is not None  # False once the shared-memory path failed
        self._lock = threading.Lock()
        # scheduler side
        self._matched: dict[str, tuple[int, int]] = {}  # req -> (local computed, store end)
        self._store_has: dict[str, int] = {}  # req -> leading tokens the store held at lookup
        self._load_plans: dict[str, tuple[int, int]] = {}
        self._to_dispatch: list[SaveSpec] = []
        self._saving: dict[str, list[int]] = {}  # req -> tokens, until the worker reports it
        # worker side
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._layer_of: dict[str, int] = {}  # attention layer name -> index in _kv
        self._loader: LayerLoader | None = None
        self._load_errors: set[int] = set()
        self._saved: set[str] = set()
        self._dispatched: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None
        register(self)
        log.info(
            "DeltaStoreConnector (%s) -> %s ns=%s codec=%s%s model=%s save alignment %d tokens",
            role.name,
            self.cfg.target,
            self.cfg.namespace,
            self.cfg.codec,
            "" if self.cfg.max_kl is None else f" (engine tier for max_kl={self.cfg.max_kl})",
            self.model,
            self.align,
        )

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def client(self) -> DeltaStoreClient:
        with self._lock:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def _new_client(self) -> DeltaStoreClient:
        from deltastore.client.auth import ApiKey

        creds = None
        if self.cfg.tls_ca:
            with open(self.cfg.tls_ca, "rb") as f:
                ca = f.read()
            cert = key = None
            if self.cfg.tls_cert and self.cfg.tls_key:
                with open(self.cfg.tls_cert, "rb") as f:
                    cert = f.read()
                with open(self.cfg.tls_key, "rb") as f:
                    key = f.read()
            creds = grpc.ssl_channel_credentials(ca, key, cert)
            if self.cfg.api_key:
                creds = grpc.composite_channel_credentials(
                    creds, grpc.access_token_call_credentials(self.cfg.api_key)
                )
        interceptors = [ApiKey(self.cfg.api_key)] if self.cfg.api_key and creds is None else []
        return DeltaStoreClient(
            self.cfg.target,
            namespace=self.cfg.namespace,
            timeout=self.cfg.save_timeout_s,
            retry=Retry(attempts=2, base_seconds=0.05, cap_seconds=0.2),
            credentials=creds,
            interceptors=interceptors,
            shm_dir=self.cfg.shm_dir if self._shm else None,
        )

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        """Log a failed call; only a store that is down or too slow is skipped for a while.

        A per-request failure (DATA_LOSS of one block, a refused save, a short answer) costs that
        request a recompute and nothing else: pausing the store for every request would let one
        damaged block or one bad caller turn the cache off for all.
        """
        if isinstance(exc, _StoreSkipped):
            log.debug("DeltaStore %s skipped: %s", what, exc)  # logged when the store went down
            return
        code = exc.code() if isinstance(exc, grpc.RpcError) else None
        down = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or isinstance(
            exc, (ConnectionError, TimeoutError)
        )
        if down:
            self._down_until = time.monotonic() + self.cfg.cooldown_s
            # A fresh channel after the cooldown: one in reconnect backoff would keep failing
            # (or wait out its connect timeout) for a while after the store is back.
            with self._lock:
                old, self._client = self._client, None
            if old is not None:
                with contextlib.suppress(Exception):
                    old.close()
        log.warning(
            "DeltaStore %s failed (%s: %s); recomputing%s",
            what,
            code.name if code is not None else type(exc).__name__,
            exc.details() if isinstance(exc, grpc.RpcError) else str(exc),
            f", store skipped for {self.cfg.cooldown_s:.1f}s" if down else "",
        )

    # -- scheduler side ------------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if not self.cfg.load:
            return 0, False
        prompt = list(request.prompt_token_ids or [])
        if request.num_preemptions > 0 or len(request.all_token_ids) > len(prompt):
            # resumed after preemption: vLLM schedules it as a cached request, whose blocks this
            # connector does not load; no external tokens, so vLLM recomputes them
            return 0, False
        if not _keyed_by_tokens(request):
            return 0, False
        with self._lock:
            for tokens in self._saving.values():
                if len(tokens) <= len(prompt) and prompt[: len(tokens)] == tokens:
                    return None, False  # our own save of this prefix is in flight: ask again
        limit = len(prompt) - 1  # vLLM must compute at least the last prompt token
        if limit <= num_computed_tokens or not self._available():
            return 0, False
        started = time.perf_counter()
        try:
            matched = self.client.lookup_prefix(
                prompt[:limit], model=self.model, codec=self.cfg.codec, timeout=self.cfg.lookup_timeout_s
            )
        except Exception as exc:  # never fatal: recompute
            self.counters.add(lookups=1, lookup_errors=1)
            self._failed("LookupPrefix", exc)
            return 0, False
        # Whole vLLM blocks only: vLLM's own prefix cache works in whole blocks, and a load that
        # ends inside a block changed the greedy output on the CPU backend (measured). A match that
        # ends in a stored tail (another client's partial block) is floored to whole store blocks
        # as well (lcm), since GetPrefix serves a tail only where it ends exactly.
        matched = matched // self.block_size * self.block_size
        if matched % self.cfg.store_block_size:
            matched = matched // self.align * self.align
        self._store_has[request.request_id] = matched
        self.counters.add(lookups=1, lookup_hits=int(matched > num_computed_tokens))
        log.debug(
            "lookup %s: %d of %d in %.3fs", request.request_id, matched, limit, time.perf_counter() - started
        )
        if matched <= num_computed_tokens:
            return 0, False
        self._matched[request.request_id] = (num_computed_tokens, matched)
        return matched - num_computed_tokens, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        start, _ = self._matched.pop(request.request_id, (request.num_computed_tokens, 0))
        if num_external_tokens > 0:
            self._load_plans[request.request_id] = (start, start + num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = DeltaStoreConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            plan = self._load_plans.pop(new.req_id, None)
            if plan is not None:
                start, end = plan
                prompt = list(new.prompt_token_ids or [])
                meta.loads.append(LoadSpec(new.req_id, prompt[:end], start, end, list(new.block_ids[0])))
        self._load_plans.clear()  # plans of requests not scheduled as new (preempted): recompute
        with self._lock:
            meta.saves, self._to_dispatch = self._to_dispatch, []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._matched.pop(request.request_id, None)
        had = self._store_has.pop(request.request_id, 0)
        if not self.cfg.save or not self._available():
            return False, None
        tokens = list(request.all_token_ids)
        computed = min(request.num_computed_tokens, len(tokens) - 1)
        n = computed // self.align * self.align
        if n <= 0 or n // self.block_size > len(block_ids):
            return False, None
        if not _keyed_by_tokens(request):
            return False, None
        with self._lock:
            backlog = len(self._saving)
        if backlog >= self.cfg.max_pending_saves:
            # a slow store must not pin the engine's KV blocks: past the backlog, skip the save
            self.counters.add(saves_skipped=1)
            return False, None
        session, turn = _session_params(request)
        if not session and n <= had:
            return False, None  # the store already holds all of it (no session to record)
        spec = SaveSpec(
            request.request_id,
            tokens[:n],
            list(block_ids[: n // self.block_size]),
            session,
            turn if turn is not None else (0 if session else None),
        )
        with self._lock:
            self._to_dispatch.append(spec)
            self._saving[request.request_id] = spec.token_ids
        return True, None

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        with self._lock:
            for req_id in connector_output.finished_sending or ():
                self._saving.pop(req_id, None)

    def has_pending_push_work(self) -> bool:
        with self._lock:
            return bool(self._saving) or bool(self._to_dispatch)

    # -- worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
        names = sorted(kv_caches, key=_layer_index)
        self._kv = [split_kv(kv_caches[n], self.head_size, cpu_backend=cpu) for n in names]
        self._layer_of = {n: i for i, n in enumerate(names)}
        self._loader = LayerLoader(
            self._fetch, self._kv, self.block_size, self.counters, self._failed, self.cfg.load_timeout_s
        )
        k0 = self._kv[0][0]
        log.info(
            "DeltaStoreConnector: %d layers, blocks of %d tokens x %d kv heads x %d dims, %s on %s",
            len(self._kv),
            k0.shape[2],
            k0.shape[1],
            k0.shape[3],
            k0.dtype,
            k0.device,
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Start this step's loads on the loader thread (``loads.py``); the forward pass waits
        for each layer in ``wait_for_layer_load``."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, DeltaStoreConnectorMetadata)
        self._dispatch_saves(meta)
        if not meta.loads:
            return
        if self._loader is None or not self._available():
            for load in meta.loads:
                self._load_errors |= load.blocks(self.block_size)
            self.counters.add(load_errors=len(meta.loads))
            return
        self._loader.start(meta.loads)

    def _fetch(self, load: LoadSpec, timeout: float) -> FetchedPrefix | None:
        """The checked payloads of one load (shared memory when configured)."""
        if not self._available():
            raise _StoreSkipped("store skipped after a recent failure")
        k0 = self._kv[0][0]
        client = self.client

        def fetch() -> FetchedPrefix | None:
            return client.fetch_prefix(
                load.token_ids,
                model=self.model,
                codec=self.cfg.codec,
                max_tokens=load.end,
                dtype=k0.dtype,
                timeout=timeout,
                start=load.start,  # vLLM holds the tokens before: fetch only the rest
            )

        if client.shm_dir is None:
            return fetch()
        try:
            return fetch()
        except (grpc.RpcError, NotConfigured) as exc:
            if not _shm_unusable(exc):
                raise
            # A setup fault, not a store fault: every load would fail (and leave an unclaimed
            # export that holds the server's shared-memory budget), so stream from now on.
            log.warning(
                "DeltaStore shared memory is unusable here (%s); loading over the GetPrefix stream "
                "from now on. Shared memory needs the server's unix socket as target (or the server's "
                "--shm-peers loopback) and shm_dir set to the server's --shm-dir as mounted here",
                exc.details() if isinstance(exc, grpc.RpcError) else exc,
            )
            self._shm = False
            client.shm_dir = None
            return fetch()

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = self._layer_of.get(layer_name)
        if layer is not None and self._loader is not None:
            self._loader.wait_layer(layer)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return None  # saves run when a request finishes (request_finished holds its blocks)

    def wait_for_save(self) -> None:
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, DeltaStoreConnectorMetadata):
                self._dispatch_saves(meta)

    def _dispatch_saves(self, meta: DeltaStoreConnectorMetadata) -> None:
        for spec in meta.saves:
            if spec.req_id in self._dispatched:
                continue
            self._dispatched.add(spec.req_id)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltastore-save")
            self._pool.submit(self._save, spec)

    def _gather(self, spec: SaveSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = len(spec.token_ids)
        idx = torch.tensor(spec.block_ids, device=self._kv[0][0].device)
        out = []
        for kc, vc in self._kv:
            k = kc[idx].permute(1, 0, 2, 3).reshape(kc.shape[1], -1, kc.shape[3])[:, :n]
            v = vc[idx].permute(1, 0, 2, 3).reshape(vc.shape[1], -1, vc.shape[3])[:, :n]
            out.append((k, v))
        return out

    def _save(self, spec: SaveSpec) -> None:
        started = time.perf_counter()
        try:
            if not self._available():
                raise _StoreSkipped("store skipped after a recent failure")
            layers = self._gather(spec)
            session, turn = spec.session, spec.turn
            if session is None:
                digest = blake3.blake3(
                    f"{self.model}|{self.cfg.codec}|".encode() + token_bytes(spec.token_ids)
                )
                session, turn = f"vllm-{digest.hexdigest()[:32]}", 0
            parent = turn - 1 if spec.session is not None and turn else None
            try:
                put = self.client.put_snapshot(
                    session,
                    turn,
                    spec.token_ids,
                    layers,
                    model=self.model,
                    codec=self.cfg.codec,
                    parent_turn=parent,
                )
            except grpc.RpcError as exc:
                if parent is None or exc.code() not in (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ):
                    raise
                put = self.client.put_snapshot(
                    session, turn, spec.token_ids, layers, model=self.model, codec=self.cfg.codec
                )
            self.counters.add(
                saves=1,
                tokens_saved=len(spec.token_ids),
                bytes_written=put.new_bytes,
                segments_encoded=put.encoded_segments,
                save_seconds=time.perf_counter() - started,
            )
        except Exception as exc:  # a failed save is dropped and counted
            self.counters.add(save_errors=1)
            self._failed(f"save of {len(spec.token_ids)} tokens", exc)
        finally:
            with self._lock:
                self._saved.add(spec.req_id)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        with self._lock:
            done, self._saved = self._saved, set()
        self._dispatched -= done
        return (done or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """After the forward pass: the step's loads are finished (or cancelled at their deadline)
        and every block of a load that failed is reported, so vLLM recomputes it."""
        if self._loader is not None:
            self._load_errors |= self._loader.finish()
        out, self._load_errors = self._load_errors, set()
        return out

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        data = self.counters.take_interval()
        return DeltaStoreConnectorStats(data=data) if any(data.values()) else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return DeltaStoreConnectorStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self._loader is not None:
            self._loader.shutdown()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
