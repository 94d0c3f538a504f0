"""DeltaStore as a vLLM KV connector (v1 API); install the `vllm` extra."""
