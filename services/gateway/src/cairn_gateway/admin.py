"""`cairn-gateway-admin`: API keys from the command line (the bootstrap of the first admin key).

    cairn-gateway-admin create-key --tenant acme --scopes admin --name ops
    cairn-gateway-admin create-key --tenant acme --scopes submit,read --name ci --rate-limit 120
    cairn-gateway-admin list-keys [--tenant acme]
    cairn-gateway-admin revoke-key KEY_ID

It talks to MongoDB directly (the gateway's settings: MONGODB_URI, CAIRN_MONGODB_DATABASE), so it
works before any key exists. `create-key` prints the token once on stdout; only its hash is kept.
"""

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pymongo.database import Database

from cairn_contracts import clock
from cairn_contracts.store import API_KEYS
from cairn_gateway.auth import new_key
from cairn_gateway.settings import GatewaySettings
from cairn_runtime.log import configure_logging
from cairn_runtime.mongo import ensure_indexes_sync, sync_client

logger = logging.getLogger(__name__)


def create_key(db: Database, tenant: str, scopes: Sequence[str], name: str | None, rate_limit: int | None = None) -> str:
    document, token = new_key(tenant, scopes, name, rate_limit_per_minute=rate_limit)
    db[API_KEYS].insert_one(document)
    logger.info("API key %s created for tenant %s with scopes %s", document["_id"], tenant, ",".join(document["scopes"]))
    return token


def revoke_key(db: Database, key_id: str) -> bool:
    result = db[API_KEYS].update_one({"_id": key_id, "revoked_at": None}, {"$set": {"revoked_at": clock.iso(clock.utcnow())}})
    return result.modified_count == 1


def list_keys(db: Database, tenant: str | None = None) -> list[dict]:
    query = {"tenant": tenant} if tenant else {}
    return [
        {k: v for k, v in key.items() if k != "secret_hash"} | {"id": key["_id"]}
        for key in db[API_KEYS].find(query, {"secret_hash": 0}).sort("created_at_ms", 1)
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cairn-gateway-admin", description="Manage Cairn API keys")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-key", help="create a key and print its token (once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--scopes", required=True, help="comma-separated: submit, read, admin (implies submit, read), operator (cross-tenant and worker control; implies all)")
    create.add_argument("--name", default=None, help="what the key is for")
    create.add_argument("--rate-limit", type=int, default=None, help="requests per minute for this key (default: the gateway's)")
    listing = commands.add_parser("list-keys", help="list keys (never their secrets)")
    listing.add_argument("--tenant", default=None)
    revoke = commands.add_parser("revoke-key", help="revoke a key by its id")
    revoke.add_argument("key_id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = GatewaySettings()
    configure_logging("gateway-admin", settings.log_level, "text", stream=sys.stderr)
    client = sync_client(settings.mongodb_uri)
    try:
        db = client[settings.mongodb_database]
        ensure_indexes_sync(db)
        if args.command == "create-key":
            try:
                token = create_key(db, args.tenant, args.scopes.split(","), args.name, args.rate_limit)
            except ValueError as error:
                sys.stderr.write(f"cairn-gateway-admin: {error}\n")
                return 2
            sys.stdout.write(token + "\n")
        elif args.command == "list-keys":
            for key in list_keys(db, args.tenant):
                sys.stdout.write(json.dumps(key, default=str) + "\n")
        elif args.command == "revoke-key":
            if not revoke_key(db, args.key_id):
                sys.stderr.write(f"cairn-gateway-admin: no active key {args.key_id}\n")
                return 1
            sys.stdout.write(f"revoked {args.key_id}\n")
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
