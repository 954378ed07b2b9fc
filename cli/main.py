"""`otclip` entry point: each package contributes its subcommands through `register(subparsers)`."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from otclip.engine import commands as engine_commands

    parser = argparse.ArgumentParser(prog="otclip", description="Cross-modal text <-> image retrieval search.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _command_modules(engine_commands):
        module.register(sub)
    return parser


def _command_modules(*always):
    modules = list(always)
    for name in ("otclip.indexer.commands", "otclip.training.commands", "otclip.app.commands"):
        try:
            modules.append(__import__(name, fromlist=["register"]))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return modules


def main(argv: list[str] | None = None) -> int:
    from otclip.engine.threads import passive_waiting

    passive_waiting()  # before anything imports torch or faiss
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe's (a socket's)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE: what a shell reports for a command a pipe stopped, as `cat` does
    except Exception as exc:
        from otclip.engine.errors import USER_ERRORS, disk_full, not_permitted

        if os.environ.get("OTCLIP_DEBUG"):  # OTCLIP_DEBUG=1: full traceback
            raise
        if disk_full(exc):
            where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
            print(f"otclip {args.command}: no space left on the disk{where}; free some and run the command again "
                  "(what it committed is kept)", file=sys.stderr)
            return 2
        if not_permitted(exc):  # e.g. "otclip index: read-only file system: IX/.writer.lock"
            where = f": {exc.filename}" if exc.filename else ""
            print(f"otclip {args.command}: {(exc.strerror or os.strerror(exc.errno)).lower()}{where}", file=sys.stderr)
            return 2
        if isinstance(exc, USER_ERRORS):
            print(f"otclip {args.command}: {exc}", file=sys.stderr)
            return 2
        raise


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader closed it (`otclip search ... | head`): poll reports an error on it."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout is not a file
        return False


if __name__ == "__main__":
    sys.exit(main())
