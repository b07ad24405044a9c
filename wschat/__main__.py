"""Command line tools: a terminal client and a development token minter.

  python -m wschat connect URL     a terminal client: type JSON lines, see events
  python -m wschat token --sub ID  mint an HS256 token signed with JWT_SECRET
"""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
wschat's command line tools (the server itself runs under gunicorn:
gunicorn -c gunicorn.conf.py wschat:app)."""

CONNECT_HELP = """\
Connect to a wschat server and speak its protocol from a terminal: each line you
type (or pipe in) is sent as one JSON frame, each event the server sends is
printed as one line. Example:

  python -m wschat connect ws://localhost:8080/ws?username=alice
  {"type": "join", "room": "general"}
  {"type": "message", "room": "general", "text": "Hello!"}

When input ends (Ctrl-D, or the end of a pipe) it waits briefly for the answers,
then closes the connection."""

TOKEN_HELP = """\
Mint a development JWT (HS256) signed with JWT_SECRET (or --secret); start the
server with the same JWT_SECRET and connect with ws://localhost:8080/ws?token=...
JWT_AUDIENCE and JWT_ISSUER, when set, become the token's aud and iss."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wschat", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    connect = commands.add_parser(
        "connect", help="a terminal client: type JSON lines, see the events",
        description=CONNECT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    connect.add_argument("url", help="ws:// or wss:// URL, e.g. ws://localhost:8080/ws")
    connect.add_argument("--linger", type=float, default=3.0,
                         help="seconds to wait for answers after input ends (3)")
    token = commands.add_parser(
        "token", help="mint a development JWT (HS256)", description=TOKEN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
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
    if args.command == "connect":
        from .terminal import run

        return run(args.url, sys.stdin, linger=args.linger)
    if not args.secret:
        parser.error("no secret: set JWT_SECRET or pass --secret")
    from .auth import mint_token

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
