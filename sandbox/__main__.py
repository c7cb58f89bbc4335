"""``python -m sandbox``: run the sandbox mipos server in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from sandbox import SANDBOX_CREDENTIALS
from sandbox.server import RANDOM_FAULTS, SandboxConfig, make_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--token-ttl-s", type=float, default=3600.0, help="token lifetime")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay of every API answer")
    parser.add_argument("--expires-in-format", choices=("absolute", "relative", "missing"),
                        default="absolute", help="how `expires_in` is written")
    parser.add_argument("--timeout-delay-s", type=float, default=15.0,
                        help="how long a 'timeout' fault holds the answer")
    parser.add_argument("--fault-rate", action="append", default=[], metavar="NAME=RATE",
                        help=f"a random fault on that share of accepts/denies, NAME one of "
                             f"{', '.join(RANDOM_FAULTS)}; repeatable")
    parser.add_argument("--quiet", action="store_true", help="(default) no access log")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    options = parser.parse_args(argv)
    fault_rates: dict[str, float] = {}
    for text in options.fault_rate:
        name, _, rate = text.partition("=")
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if name not in RANDOM_FAULTS or not 0 <= value <= 1:
            parser.error(f"--fault-rate {text!r}: expected NAME=RATE with NAME one of "
                         f"{', '.join(RANDOM_FAULTS)} and RATE between 0 and 1")
        fault_rates[name] = value

    config = SandboxConfig(
        token_ttl_s=options.token_ttl_s,
        latency_ms=options.latency_ms,
        expires_in_format=options.expires_in_format,
        fault_rates=fault_rates,
        timeout_delay_s=options.timeout_delay_s,
        credentials=dict(SANDBOX_CREDENTIALS),
    )
    try:
        server = make_server(options.host, options.port, config, verbose=options.verbose)
    except OSError as exc:
        print(f"sandbox mipos: cannot listen on {options.host}:{options.port}: {exc}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
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
