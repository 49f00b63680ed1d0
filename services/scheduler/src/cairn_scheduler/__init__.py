"""Cairn scheduler service."""
