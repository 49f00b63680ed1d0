"""Baselines measured side by side with Cairn (benchmark code only, never deployed)."""
