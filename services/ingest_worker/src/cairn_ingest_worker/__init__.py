"""Cairn ingest_worker service."""
