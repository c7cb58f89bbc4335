"""``python -m sandbox``: run the sandbox mipos server in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from sandbox import SANDBOX_CREDENTIALS
from sandbox.server import RANDOM_FAULTS, SandboxConfig, make_server


def _fault_rate(text: str) -> tuple[str, float]:
    name, _, rate = text.partition("=")
    try:
        value = float(rate)
    except ValueError:
        value = -1.0
    if name not in RANDOM_FAULTS or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=RATE with NAME one of {', '.join(RANDOM_FAULTS)} "
            "and RATE between 0 and 1")
    return name, value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a non-negative number of seconds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sandbox's options, shared by ``python -m sandbox`` and ``mipos-worker sandbox``."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port (default 8765)")
    parser.add_argument("--token-ttl-s", type=float, default=3600.0, help="token lifetime (default 3600)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay of every API answer")
    parser.add_argument("--expires-in-format", choices=("absolute", "relative", "missing"),
                        default="absolute", help="how `expires_in` is written")
    parser.add_argument("--expires-in-fixed", default=None, metavar="TEXT",
                        help="every token answer's expires_in is exactly this "
                             "(e.g. the documented 1585815796)")
    parser.add_argument("--timeout-delay-s", type=float, default=15.0,
                        help="how long a 'timeout' fault holds the answer (default 15)")
    parser.add_argument("--timeout-land-after-s", type=_non_negative, default=None, metavar="S",
                        help="a 'timeout' fault lands (mipos applies it) S seconds after the "
                             "request arrived, before or after its answer (default: when the "
                             "answer goes, at --timeout-delay-s)")
    parser.add_argument("--strict", action="store_true",
                        help="an accept or deny of an order that is not pending (already "
                             "accepted or denied, never delivered, older than 10 minutes) answers "
                             "409 Order not found. and changes nothing; default: lenient, 200. "
                             "A modelling choice: mipos's documentation does not say which")
    parser.add_argument("--fault-rate", type=_fault_rate, action="append", default=[],
                        metavar="NAME=RATE",
                        help=f"a random fault on that share of accepts/denies; NAME one of "
                             f"{', '.join(RANDOM_FAULTS)}; repeatable (e.g. http_500=0.1)")
    parser.add_argument("--quiet", action="store_true", help="(default) no access log")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--fast", action="store_true",
                        help="the fast serving mode for benchmarks (sandbox/fast.py): token, refresh, "
                             "accept and deny only, no faults (--strict works)")
    return serve(parser.parse_args(argv))


def serve(options: argparse.Namespace) -> int:
    if getattr(options, "fast", False):
        from sandbox.fast import serve_fast

        return serve_fast(options.host, options.port, dict(SANDBOX_CREDENTIALS),
                          options.token_ttl_s, options.latency_ms, strict=options.strict)
    fault_rates = dict(options.fault_rate)
    config = SandboxConfig(
        token_ttl_s=options.token_ttl_s,
        latency_ms=options.latency_ms,
        expires_in_format=options.expires_in_format,
        fault_rates=fault_rates,
        timeout_delay_s=options.timeout_delay_s,
        expires_in_fixed=options.expires_in_fixed,
        strict=options.strict,
        timeout_land_after_s=options.timeout_land_after_s,
        credentials=dict(SANDBOX_CREDENTIALS),
    )
    try:
        server = make_server(options.host, options.port, config, verbose=options.verbose)
    except OSError as exc:
        print(f"sandbox mipos: cannot listen on {options.host}:{options.port}: {exc}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    host = host.decode() if isinstance(host, bytes) else host
    print(f"sandbox mipos listening on http://{host}:{port}", flush=True)

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
