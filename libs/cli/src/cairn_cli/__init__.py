"""`cairn`: Cairn's command line, a client of the gateway's HTTP API only (main.py)."""
