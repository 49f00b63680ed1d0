"""The HTTP layer: routes (api/routes/) and the FastAPI dependencies they share (api/deps.py)."""
