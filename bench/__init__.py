"""Cairn's benchmark suite: `make bench` or `uv run --no-sync python -m bench [scenario ...]`.

See bench/README.md for what each scenario measures and how the bench isolates itself.
"""
