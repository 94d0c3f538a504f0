"""One configuration of ``deltastore bench vllm`` in its own fresh engine process.

``python -m deltastore.bench.vllm_worker prepare OUT`` writes the checkpoint path, the token
ids of the workload texts and the engine dtype; ``python -m deltastore.bench.vllm_worker run SPEC OUT`` replays the
chat transcript of SPEC through one engine and writes per-request TTFT, timings, tokens, top-k
logprobs and the connector's counters. Runs in the interpreter that has vLLM (``.venv-vllm``).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from deltastore.bench.vllm_harness import (
    CONNECTOR_MODULE,
    engine_dtype,
    engine_env,
    make_llm,
    prompt_tokens,
    run_prompts,
)

TEXT = Path(__file__).resolve().parent / "data" / "gardiner_french_revolution.txt"


def prepare(out: Path) -> None:
    from deltastore.bench.vllm_model import smollm2_checkpoint

    model = smollm2_checkpoint()
    (ids,) = prompt_tokens(model, [TEXT.read_text()])
    out.write_text(json.dumps({"model": str(model), "ids": ids, "dtype": engine_dtype()}))


def run(spec: dict[str, Any], out: Path) -> None:
    engine_env()
    llm = make_llm(
        spec["model"],
        kv=spec.get("kv"),
        prefix_caching=spec.get("prefix_caching", True),
        max_model_len=spec["max_model_len"],
        num_blocks=spec.get("num_blocks"),
    )
    conn = importlib.import_module(CONNECTOR_MODULE) if spec.get("deltastore") else None

    def settle() -> None:
        if conn is not None:
            conn.wait_for_saves(llm, 300)

    run_prompts(llm, [spec["warmup"]], max_tokens=4)  # one-time kernel and allocator costs
    settle()
    system, msgs, answers = spec["system"], spec["messages"], spec.get("answers")
    own: list[list[list[int]]] = [[] for _ in msgs]
    records = []
    for turn in range(len(msgs[0])):
        for user, user_msgs in enumerate(msgs):
            history: list[int] = list(system)
            for k in range(turn):
                history += user_msgs[k] + (answers[user][k] if answers else own[user][k])
            prompt = history + user_msgs[turn]
            before = conn.connector_totals() if conn else {}
            started = time.perf_counter()
            (r,) = run_prompts(llm, [prompt], max_tokens=spec["answer_tokens"], logprobs=spec["logprobs"])
            seconds = time.perf_counter() - started
            settle()
            after = conn.connector_totals() if conn else {}
            own[user].append(r.token_ids)
            ttft = r.ttft_s if r.ttft_s is not None else seconds
            decode = (len(r.token_ids) - 1) / max(seconds - ttft, 1e-9)
            records.append(
                {
                    "user": user,
                    "turn": turn,
                    "prompt_tokens": len(prompt),
                    "ttft_s": ttft,
                    "seconds": seconds,
                    "decode_tok_s": decode,
                    "tokens": r.token_ids,
                    "logprobs": [{str(k): v for k, v in d.items()} for d in r.logprobs],
                    "connector": {k: after[k] - before.get(k, 0) for k in after},
                }
            )
            print(f"{spec['config']} turn {turn} user {user}: ttft {ttft:.3f}s", file=sys.stderr, flush=True)
    out.write_text(json.dumps({"records": records, "answers": own}))


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare(Path(sys.argv[2]))
    else:
        run(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the engine's interpreter teardown (saves are settled)
