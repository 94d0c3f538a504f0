"""A fresh vLLM engine process for the tests: runs phases of greedy prompts, prints JSON.

Usage: python engine_run.py SPEC.json OUT.json, where SPEC is
``{"model": dir, "kv": kv_transfer_config or null, "phases": [{"prompts": [[ids]],
"max_tokens": n, "reset": bool, "params": [kv_transfer_params or null]}]}``.
OUT gets per phase the generated token ids and the connector's counter deltas.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

from deltastore.bench.vllm_harness import CONNECTOR_MODULE, engine_env, make_llm, run_prompts


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    engine_env()
    llm = make_llm(spec["model"], kv=spec.get("kv"), max_model_len=spec.get("max_model_len", 2048))
    conn = importlib.import_module(CONNECTOR_MODULE) if spec.get("kv") else None
    out = []
    for phase in spec["phases"]:
        if phase.get("reset"):
            llm.reset_prefix_cache()
        before = conn.connector_totals() if conn else {}
        runs = run_prompts(
            llm, phase["prompts"], max_tokens=phase.get("max_tokens", 16), params=phase.get("params")
        )
        if conn:
            assert conn.wait_for_saves(llm, 120), "saves did not finish"
        after = conn.connector_totals() if conn else {}
        out.append(
            {
                "tokens": [r.token_ids for r in runs],
                "ttft": [r.ttft_s for r in runs],
                "delta": {k: after[k] - before.get(k, 0) for k in after},
            }
        )
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown of the engine (saves are done: wait_for_saves)
