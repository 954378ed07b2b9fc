"""App subcommands: `otclip serve INDEX_DIR` and `otclip demo`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the search app (UI and HTTP JSON API) for one or more index directories")
    p.add_argument("index_dirs", type=Path, nargs="+", metavar="INDEX_DIR",
                   help="each a collection, picked in the app and by ?collection= in the API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=7860)
    p.add_argument("--report", type=Path, default=None, help="an `otclip eval` JSON or partial-pairs report to show")
    p.add_argument("--threads", type=int, default=None, help="model threads (default: the available cores)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="index the bundled sample gallery and serve the app")
    p.add_argument("--out", type=Path, default=Path("demo-index"), help="index directory (default: %(default)s)")
    p.add_argument("--data", type=Path, default=Path("data/sample-gallery"), help="where sample images are written")
    p.add_argument("--fashion-mnist", type=int, default=300, help="Fashion-MNIST test images to add (if installed)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=7860)
    p.add_argument("--no-serve", action="store_true", help="build the index and stop")
    p.add_argument("--threads", type=int, default=None, help="model threads (default: the available cores)")
    p.set_defaults(func=_demo)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a TCP port is a number from 1 to 65535")
    return int(text)


def _check_listening(host: str, port: int) -> None:
    """One line, before any index or model is opened, where the server could not listen (Gradio's own error for
    a port in use, or the socket's for a bad host, is a traceback after the loading)."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket: a closed one's
        try:  # lingering connections do not count, a listening one does
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ValueError(f"--port {port}: in use on {host} (another server listens there); pick another "
                                 "--port") from None
            raise ValueError(f"--host {host}: cannot listen on {host}:{port} ({exc.strerror})") from None


def _serve(args: argparse.Namespace) -> int:
    from otclip.engine.index_directory import IndexDirectory
    from otclip.engine.threads import thread_budget

    thread_budget(args.threads)  # each a one-line error before the banner and before Gradio or a model loads
    for index_dir in args.index_dirs:
        IndexDirectory(index_dir).manifest()
    _check_listening(args.host, args.port)
    from .server import serve

    where = ", ".join(map(str, args.index_dirs))
    print(f"otclip: serving {where} on http://{args.host}:{args.port} (API: /api/docs)")
    serve(list(args.index_dirs), args.host, args.port, args.report, threads=args.threads)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import build_demo_index

    for line in build_demo_index(args.out, args.data, args.fashion_mnist):
        print(line)
    if args.no_serve:
        return 0
    args.index_dirs, args.report = [args.out], None
    return _serve(args)
