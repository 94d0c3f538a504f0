"""Plugins every suite shares: the Redis engines' session fixtures (tests/backends/redis_harness.py)."""

pytest_plugins = ["redis_harness"]
