"""What the command-line tools share: common options, progress on stderr,
one-line errors, --json results.

  add_common_args(ap)       --url, --key/--key-id, --quiet, --json, --debug
  run(main, prog)           calls main(); turns every failure into one line
                            on stderr and a non-zero exit (traceback only
                            with --debug)
  Progress(label, total)    "label  12.3/45.6 MiB  120 MB/s  ETA 0:03" on a
                            terminal; silent otherwise or with --quiet
  Fail(msg, code=1)         raise to stop with a message
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms)
if TYPE_CHECKING:
    from typing import Any, Callable

    from .hub import Hub

# The HTTP client (http.client, ~15-20 ms to import) and the pack reader
# load when a tool first talks to a server or reads a pack, not for
# --help or a usage error.

DEFAULT_URL = "http://127.0.0.1:1337"


class Fail(Exception):
    """Stop the tool with a one-line message and exit code."""

    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code


def add_common_args(ap: argparse.ArgumentParser, server: bool = True) -> None:
    if server:
        ap.add_argument("--url", default=os.environ.get("MUSEHUB_URL", DEFAULT_URL),
                        help=f"server base URL (env MUSEHUB_URL, default {DEFAULT_URL})")
        ap.add_argument("--key", default=os.environ.get("MUSE_KEY"), metavar="PEM",
                        help="private key (PEM, P-256) to sign requests with MSign "
                             "($MUSE_KEY); without it requests are unsigned (anonymous, "
                             "or the server's dev identity)")
        ap.add_argument("--key-id", default=os.environ.get("MUSE_KEY_ID"), metavar="ID",
                        help="key id registered on the server ($MUSE_KEY_ID; default: "
                             "computed from the key)")
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="no progress and no report on stderr (errors still)")
    ap.add_argument("--json", action="store_true",
                    help="print the result as JSON on stdout (machine-readable)")
    ap.add_argument("--debug", action="store_true",
                    help="on an error, print the Python traceback too")


def hub_from_args(a: argparse.Namespace) -> Hub:
    from .hub import Hub
    signer = None
    if getattr(a, "key", None):
        from . import msign
        try:
            signer = msign.signer_from_files(a.key_id, a.key)
        except (OSError, ValueError) as e:
            raise Fail(f"cannot use the key {a.key}: {e}", 2)
    try:
        return Hub(a.url, signer=signer)
    except ValueError as e:
        raise Fail(str(e), 2)


class Progress:
    """A one-line progress meter on stderr, redrawn at most 10 times a
    second, only when stderr is a terminal (and not --quiet)."""

    def __init__(self, label: str, total: int | None = None, unit: str = "bytes",
                 enabled: bool | None = None) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.monotonic()
        self._last = 0.0
        self.done = 0
        self._drawn = False

    def __call__(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and (self.total is None or done < self.total):
            return
        self._last = now
        sys.stderr.write("\r" + self.line(now) + "\x1b[K")
        sys.stderr.flush()
        self._drawn = True

    def line(self, now: float | None = None) -> str:
        el = max((now or time.monotonic()) - self.t0, 1e-6)
        rate = self.done / el
        if self.unit == "bytes":
            s = f"{self.label}  {_mib(self.done)}"
            if self.total:
                s += f" / {_mib(self.total)}"
            s += f"  {rate / 1e6:.1f} MB/s"
        else:
            s = f"{self.label}  {self.done}" + (f" / {self.total}" if self.total else "") \
                + f" {self.unit}  {rate:.0f}/s"
        if self.total and rate > 0 and self.done < self.total:
            left = (self.total - self.done) / rate
            s += f"  ETA {int(left // 60)}:{int(left % 60):02d}"
        return s

    def finish(self) -> None:
        if self.enabled and self._drawn:
            sys.stderr.write("\r" + self.line() + "\x1b[K\n")
            sys.stderr.flush()


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB" if n >= 1048576 else f"{n / 1024:.1f} KiB"


def human(n: int) -> str:
    return _mib(n) if n >= 1024 else f"{n} B"


class Reporter:
    """Messages for a person on stderr (silent with --quiet) and the one
    JSON result on stdout (--json)."""

    def __init__(self, prog: str, a: argparse.Namespace) -> None:
        self.prog, self.quiet, self.json = prog, bool(a.quiet), bool(a.json)
        self.tty = sys.stderr.isatty() and not self.quiet

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        print(f"{self.prog}: warning: {msg}", file=sys.stderr, flush=True)

    def progress(self, label: str, total: int | None = None, unit: str = "bytes") -> Progress:
        return Progress(label, total, unit, enabled=self.tty)

    def result(self, obj: Any, text: str | None = None) -> None:
        if self.json:
            print(json.dumps(obj), flush=True)
        elif text is not None and not self.quiet:
            print(text, flush=True)


def run(main: Callable[[], int], prog: str) -> int:
    """Run a tool's main(): exit codes 0 ok, 1 failure, 2 usage; every
    failure one line on stderr (a traceback too with --debug)."""
    debug = "--debug" in sys.argv[1:]
    try:
        return main()
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - this is the one place that reports
        if debug:
            import traceback
            traceback.print_exc()
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return e.code if isinstance(e, Fail) else 1


def describe(e: BaseException) -> str:
    """One line for an exception."""
    if isinstance(e, Fail):
        return str(e)
    # an exception of a module that was never imported cannot be raised
    hub = sys.modules.get(__package__ + ".hub")
    walk = sys.modules.get(__package__ + ".mpwalk")
    if hub is not None and isinstance(e, hub.HubError):
        return f"{e.method} {e.url}: {e.brief()}"
    if walk is not None and isinstance(e, walk.PackError):
        return f"bad pack: {e}"
    if hub is not None and isinstance(e, hub.TransportError):
        return str(e)
    if isinstance(e, OSError):
        where = f" {e.filename}" if e.filename else ""
        return f"{e.strerror or e}{':' if where else ''}{where}"
    if isinstance(e, ValueError):
        return str(e)
    return f"{type(e).__name__}: {e}"
