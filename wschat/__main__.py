"""Command line: ``python -m wschat token --sub alice --name Alice`` mints a dev token.

The token is signed with ``JWT_SECRET`` (HS256) from the environment or
``--secret``; start the server with the same ``JWT_SECRET`` and connect with
``ws://localhost:8080/ws?token=...``.
"""

from __future__ import annotations

import argparse
import os
import sys

from .auth import mint_token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wschat", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    token = commands.add_parser("token", help="mint a development JWT (HS256)")
    token.add_argument("--sub", required=True, help="user_id (the token's sub)")
    token.add_argument("--name", help="username shown to others")
    token.add_argument("--ttl", type=float, default=3600, help="seconds until exp (3600)")
    token.add_argument("--secret", default=os.environ.get("JWT_SECRET"),
                       help="HMAC secret (default: $JWT_SECRET)")
    token.add_argument("--audience", default=os.environ.get("JWT_AUDIENCE"))
    token.add_argument("--issuer", default=os.environ.get("JWT_ISSUER"))
    token.add_argument("--rooms", help="comma-separated room patterns the user may join")
    token.add_argument("--mod-rooms", help="comma-separated room patterns the user moderates")
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("no secret: set JWT_SECRET or pass --secret")
    claims = {}
    if args.audience:
        claims["aud"] = args.audience
    if args.issuer:
        claims["iss"] = args.issuer
    for claim, value in (("rooms", args.rooms), ("mod_rooms", args.mod_rooms)):
        if value is not None:
            claims[claim] = [p.strip() for p in value.split(",") if p.strip()]
    print(mint_token(args.secret, args.sub, args.name, args.ttl, **claims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
