"""Cairn gateway service."""
