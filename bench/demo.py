"""A multi-turn SmolLM2 chat whose KV cache round-trips through DeltaStore after every turn.

After each turn the worker stores its cache (only the segments the store lacks), drops it,
restores it from the server and continues the conversation from the restored cache. The same
chat also runs uninterrupted (cache kept in memory) as the reference: with the bit-exact
``lossless`` codec the generated tokens are identical; with a lossy codec (default ``k4v2``) the
demo reports how many generated tokens agree (position by position, per turn) and the storage
savings so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltastore.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

    from deltastore.client.sync import DeltaStoreClient

__all__ = ["DEFAULT_TURNS", "ChatResult", "add_arguments", "chat", "run", "run_demo"]

SYSTEM = "You are a helpful assistant. Answer briefly."
DEFAULT_TURNS = (
    "What is a KV cache in a transformer?",
    "Why does it grow with the conversation?",
    "How could a server avoid storing the same prompt twice?",
    "Summarize that in one sentence.",
)

# (token ids, cache) -> cache restored from the store, for the tokens' turn.
Roundtrip = Callable[[int, list[int], Any], Any]


@dataclasses.dataclass
class ChatResult:
    """Generated token ids per turn, the conversation's token ids, and per-turn store figures."""

    replies: list[list[int]]
    token_ids: list[int]
    turns: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def chat(
    model: Any,
    tokenizer: Any,
    messages: Sequence[str],
    *,
    max_new_tokens: int,
    roundtrip: Roundtrip | None = None,
    on_reply: Callable[[int, str], None] | None = None,
) -> ChatResult:
    """Greedy multi-turn chat driving the model by hand, so the cache can be swapped between turns.

    Positions and cache indices are tracked separately: ``position_ids`` are absolute token
    positions (RoPE), ``cache_position`` indexes the cache (the causal mask). They differ only
    when a restored cache holds fewer tokens than the sequence (an evicting codec).

    Args:
        roundtrip: called after each turn with (turn, token ids, cache); returns the cache to
            continue from. None runs the uninterrupted reference.
    """
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stops = {im_end, tokenizer.eos_token_id}
    cache: Any = DynamicCache(config=model.config)
    ids: list[int] = []  # tokens whose KV is in the cache
    pending: list[int] = []  # tokens to feed next
    result = ChatResult(replies=[], token_ids=ids)
    for turn, message in enumerate(messages):
        head = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n" if turn == 0 else "\n"
        text = f"{head}<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"
        if pending and pending[-1] != im_end:  # the last reply was cut by max_new_tokens
            text = "<|im_end|>" + text
        pending += tokenizer(text, add_special_tokens=False).input_ids
        reply: list[int] = []
        while True:
            logits = _forward(model, cache, pending, len(ids), device)
            ids += pending
            nxt = int(torch.argmax(logits[0, -1]))
            reply.append(nxt)
            pending = [nxt]
            if nxt in stops or len(reply) >= max_new_tokens:
                break
        result.replies.append(reply)
        if on_reply is not None:
            on_reply(turn, tokenizer.decode(reply, skip_special_tokens=True))
        if roundtrip is not None and turn < len(messages) - 1:
            cache = roundtrip(turn, list(ids), cache)
    return result


def _forward(model: Any, cache: Any, tokens: list[int], position: int, device: torch.device) -> torch.Tensor:
    """Feed ``tokens`` at absolute ``position``; returns logits ``(1, len(tokens), vocab)``."""
    import torch

    kv_len = cache.get_seq_length()
    n = len(tokens)
    with torch.inference_mode():
        out = model(
            input_ids=torch.tensor([tokens], device=device),
            past_key_values=cache,
            position_ids=torch.arange(position, position + n, device=device).unsqueeze(0),
            cache_position=torch.arange(kv_len, kv_len + n, device=device),
            use_cache=True,
        )
    return out.logits


def store_roundtrip(
    client: DeltaStoreClient,
    model: Any,
    *,
    session: str,
    codec: str,
    device: Any,
    dtype: Any,
    log: Callable[[str], None],
) -> tuple[Roundtrip, list[dict[str, Any]]]:
    """A roundtrip that puts the cache, drops it and gets it back from the server."""
    figures: list[dict[str, Any]] = []

    def roundtrip(turn: int, token_ids: list[int], cache: Any) -> Any:
        put = client.put_snapshot(
            session,
            turn,
            token_ids,
            cache,
            model=model,
            codec=codec,
            parent_turn=turn - 1 if turn else None,
        )
        del cache  # the worker's copy is gone; only the store has it now
        restored = client.get_snapshot(session, turn, model=model, codec=codec, device=device, dtype=dtype)
        row = {
            "turn": turn,
            "tokens": len(token_ids),
            "sent_bytes": put.sent_bytes,
            "new_bytes": put.new_bytes,
            "reused_temporal_bytes": put.reused_temporal_bytes,
            "reused_shared_bytes": put.reused_shared_bytes,
            "logical_bytes": put.logical_bytes,
            "restored_tokens": restored.kept_tokens,
        }
        figures.append(row)
        log(
            f"  [store] turn {turn}: {len(token_ids)} tokens, sent {put.sent_bytes} B, wrote {put.new_bytes} B, "
            f"reused {put.reused_temporal_bytes} B (earlier turns) + {put.reused_shared_bytes} B (shared), "
            f"FP16 size {put.logical_bytes} B; restored {restored.kept_tokens} tokens"
        )
        return restored.cache

    return roundtrip, figures


def run_demo(
    target: str,
    *,
    model_name: str = "smollm2",
    codec: str = "k4v2",
    messages: Sequence[str] = DEFAULT_TURNS,
    max_new_tokens: int = 24,
    session: str = "demo",
    namespace: str = "default",
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the stored chat and the uninterrupted reference; return the comparison and savings."""

    from deltastore.client.models import load_model, model_fingerprint
    from deltastore.client.sync import DeltaStoreClient

    model, tokenizer = load_model(model_name, device=device)
    dtype = next(model.parameters()).dtype
    log(f"model {model_fingerprint(model)} on {device}, codec {codec}, server {target}")
    with DeltaStoreClient(target, namespace=namespace) as client:
        roundtrip, figures = store_roundtrip(
            client, model, session=session, codec=codec, device=device, dtype=dtype, log=log
        )
        messages = list(messages)

        def show(turn: int, text: str) -> None:
            log(f"user> {messages[turn]}")
            log(f"assistant> {text.strip()}")

        stored = chat(
            model, tokenizer, messages, max_new_tokens=max_new_tokens, roundtrip=roundtrip, on_reply=show
        )
        log("reference run (cache kept in memory) ...")
        reference = chat(model, tokenizer, messages, max_new_tokens=max_new_tokens)
        savings = client.savings(namespace)
    agree = total = 0
    per_turn = []
    for got, ref in zip(stored.replies, reference.replies, strict=True):
        same = sum(a == b for a, b in zip(got, ref, strict=False))
        agree += same
        total += max(len(got), len(ref))
        per_turn.append({"tokens": len(got), "agreeing": same, "identical": got == ref})
    report = {
        "model": model_fingerprint(model),
        "codec": codec,
        "turns": len(messages),
        "identical": stored.replies == reference.replies,
        "token_agreement": agree / total if total else 1.0,
        "per_turn": per_turn,
        "store": figures,
        "savings": savings,
    }
    log(
        f"generated tokens identical to the uninterrupted run: {report['identical']} "
        f"(agreement {report['token_agreement']:.1%})"
    )
    layers = savings["layers"]
    log(
        f"savings so far: {savings['logical_bytes']} B logical (FP16) in {savings['stored_bytes']} B stored = "
        f"{savings['ratio']:.2f}x (codec {layers['codec']:.2f}x, prefix dedup {layers['prefix_dedup']:.2f}x, "
        f"temporal delta {layers['temporal_delta']:.2f}x)"
    )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", default="127.0.0.1:50051", help="DeltaStore gRPC address (default %(default)s)"
    )
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="start a private server on a temporary data directory instead of using --target",
    )
    parser.add_argument(
        "--codec", default="k4v2", help="codec spec (default %(default)s; 'lossless' is bit-exact)"
    )
    parser.add_argument(
        "--model", default="smollm2", help="HF model id or path (default: offline SmolLM2-135M)"
    )
    parser.add_argument(
        "--turns", type=int, default=len(DEFAULT_TURNS), help="user turns to play (max %(default)s)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated per turn")
    parser.add_argument("--session", default="demo", help="session id to store under")
    parser.add_argument("--namespace", default="default", help="namespace (tenant)")
    parser.add_argument("--device", default="cpu", help="torch device of the model and the codec")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")


def run(args: argparse.Namespace) -> int:
    import tempfile

    if not 1 <= args.turns <= len(DEFAULT_TURNS):
        raise InvalidArgument(f"--turns must be in [1, {len(DEFAULT_TURNS)}]")
    kwargs: dict[str, Any] = {
        "model_name": args.model,
        "codec": args.codec,
        "messages": DEFAULT_TURNS[: args.turns],
        "max_new_tokens": args.max_new_tokens,
        "session": args.session,
        "namespace": args.namespace,
        "device": args.device,
    }
    if args.embedded:
        from deltastore.server.app import Service
        from deltastore.server.settings import ServerSettings

        with tempfile.TemporaryDirectory(prefix="deltastore-demo-") as tmp:
            settings = ServerSettings(data_dir=Path(tmp), grpc_address="127.0.0.1:0", http_address="")
            with Service(settings) as service:
                report = run_demo(f"127.0.0.1:{service.grpc_port}", **kwargs)
    else:
        report = run_demo(args.target, **kwargs)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    lossless = args.codec == "lossless"
    if lossless and not report["identical"]:
        print("error: the lossless codec changed the generated tokens", file=sys.stderr)
        return 1
    return 0
