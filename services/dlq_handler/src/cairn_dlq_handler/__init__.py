"""Cairn dlq_handler service."""
