"""`kimi-desktop serve`: the local API (kimi_desktop/server) on any engine: OpenAI Chat Completions,
Completions and Responses, Anthropic Messages, /v1/models, /health, /metrics.

Binds 127.0.0.1 by default and then answers only requests for a loopback Host name (DNS-rebinding
guard); --host ADDR adds that address (0.0.0.0 / ::: this machine's addresses), --allowed-host more
names. Any non-loopback address needs a key: without one the command refuses to start. CORS is off
unless --cors-origin lists origins. Prints the base URL once it accepts requests; Ctrl+C / SIGTERM
cancel running generations and exit 0.

Wiring: cli.py calls `register(subparsers)` from build_parser().
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from kimi_desktop.cli_options import UsageError, add_model_args, engine_options, int_at_least, resolve_model, say

KEY_ENV = "KIMI_DESKTOP_API_KEY"


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `serve` subcommand to cli.py's subparsers."""
    p = subparsers.add_parser(
        "serve", help="serve the model over OpenAI- and Anthropic-compatible HTTP APIs",
        description="Serve the model over HTTP: OpenAI Chat Completions (POST /v1/chat/completions), "
                    "Completions (POST /v1/completions) and Responses (POST /v1/responses); Anthropic "
                    "Messages (POST /v1/messages, POST /v1/messages/count_tokens); GET /v1/models, "
                    "GET /health (no key needed), GET /metrics (Prometheus text) and the OpenAPI schema "
                    "(GET /openapi.json). Point an OpenAI client at the printed base URL (it ends in /v1), "
                    "an Anthropic client at it without the /v1.")
    add_model_args(p, engines=True)
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on (default 127.0.0.1: this machine only); any other address "
                        "needs an API key, and requests may then name it in their Host header (for 0.0.0.0 "
                        "or ::, any address of this machine or its host name)")
    p.add_argument("--port", type=_port, default=8000, metavar="N", help="TCP port (default 8000; 0: a free one)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help=f"file holding the API key clients must send as 'Authorization: Bearer KEY' or "
                        f"'x-api-key: KEY' (or set {KEY_ENV}); /health needs none")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"the API key itself; visible to other users in `ps`: prefer --api-key-file or {KEY_ENV}")
    p.add_argument("--max-queue", type=int_at_least(0), default=16, metavar="N",
                   help="requests that may wait behind the running one; more get 503 (default 16)")
    p.add_argument("--max-body-mb", type=int_at_least(1), default=32, metavar="N",
                   help="largest request body in MiB; larger get 413 (default 32)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the name /v1/models reports (default: the model folder's or file's name)")
    p.add_argument("--strict-model", action="store_true",
                   help="answer requests naming another model than --model-name with 404 model_not_found "
                        "(default: any name is served by the loaded model, as llama-server does)")
    p.add_argument("--allowed-host", action="append", default=[], type=_host_name, metavar="NAME",
                   help="a further Host name the server answers (repeatable), e.g. the machine's DNS name "
                        "behind --host 0.0.0.0; loopback names always pass, others get 403 (DNS-rebinding "
                        "guard)")
    p.add_argument("--cors-origin", action="append", default=[], type=_origin, metavar="ORIGIN",
                   help="a browser origin allowed to call the API, like http://localhost:3000 (repeatable; "
                        "'*' for any); default: CORS off, no Access-Control headers")
    p.set_defaults(func=cmd_serve)
    return p


def _port(text: str) -> int:
    v = int_at_least(0)(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0..65535, got {v}")
    return v


_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def _host_name(text: str) -> str:
    """--allowed-host: a DNS name or an IP address (no port, scheme or path)."""
    h = text.strip().lower().rstrip(".")
    bare = h[1:-1] if h.startswith("[") and h.endswith("]") else h
    try:
        ipaddress.ip_address(bare)
        return bare
    except ValueError:
        pass
    if not h or len(h) > 253 or not all(_HOST_LABEL.match(part) for part in h.split(".")):
        raise argparse.ArgumentTypeError(f"expected a host name or IP address like myhost.lan or "
                                         f"192.168.1.20 (no port or scheme), got {text!r}")
    return h


def _origin(text: str) -> str:
    """--cors-origin: '*' or scheme://host[:port], as a browser sends it in Origin."""
    t = text.strip()
    if t == "*":
        return t
    try:
        u = urlsplit(t)
        u.port                                  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        u = None
    if u is None or u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") \
            or u.query or u.fragment or u.username or u.password:
        raise argparse.ArgumentTypeError(f"expected an origin like http://localhost:3000 (scheme, host, "
                                         f"optional port; no path) or '*', got {text!r}")
    return t.rstrip("/").lower()


def read_key(args, environ=os.environ) -> str | None:
    """The API key from --api-key, --api-key-file or KIMI_DESKTOP_API_KEY (in that order); None if none."""
    if args.api_key is not None and args.api_key_file is not None:
        raise UsageError("give --api-key or --api-key-file, not both")
    if args.api_key is not None:
        key, where = args.api_key.strip(), "--api-key"
    elif args.api_key_file is not None:
        path = Path(args.api_key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--api-key-file: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        where = f"--api-key-file {path}"
    elif environ.get(KEY_ENV):
        key, where = environ[KEY_ENV].strip(), KEY_ENV
    else:
        return None
    if not key or any(c.isspace() for c in key) or not key.isprintable():
        raise UsageError(f"{where}: the API key must be one word of printable characters")
    return key


def check_bind(host: str, key: str | None) -> None:
    from kimi_desktop.server.security import is_loopback

    if not is_loopback(host) and key is None:
        raise UsageError(f"--host {host} would let other machines use this server without a key: give "
                         f"--api-key-file FILE (or set {KEY_ENV}), or keep the default --host 127.0.0.1")


def cmd_serve(args) -> int:
    from kimi_desktop.engines import open_engine
    from kimi_desktop.server import LocalServer, create_app
    from kimi_desktop.server.runner import bind

    key = read_key(args)
    check_bind(args.host, key)
    path = resolve_model(args, args.engine)
    name = args.model_name or ("kimi-desktop-demo" if args.demo else
                               Path(str(path).rstrip("/")).name if args.engine != "remote" else str(path))
    opts = engine_options(args, path)
    try:
        sock = bind(args.host, args.port)          # before the model loads: a taken port fails at once
    except OSError as e:
        raise UsageError(f"--host {args.host} --port {args.port}: cannot listen there: {e.strerror or e}") from None
    try:
        engine = open_engine(args.engine, path, **opts)
    except BaseException:
        sock.close()
        raise
    try:
        app = create_app(engine, name, api_key=key, host=args.host, allowed_hosts=args.allowed_host,
                         cors_origins=args.cors_origin, strict_model=args.strict_model,
                         max_queue=args.max_queue, max_body_bytes=args.max_body_mb << 20)
        server = LocalServer(app, host=args.host, sock=sock)

        def ready(url: str) -> None:
            demo = " (demo: random weights, expect gibberish)" if args.demo else ""
            say(f"serving {name} ({args.engine} engine){' with an API key' if key else ''}{demo}")
            print(f"{url}/v1", flush=True)
        server.run(on_ready=ready)
    finally:
        engine.close()
    return 0
