"""Every mipos HTTP call ends within its total bound (issue 11, item 5, client half), and
says whether the request may have reached mipos (item 6)."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3.util.connection

from config import MiposSettings
from sandbox import SANDBOX_CREDENTIALS
from support.processes import Sandbox, free_port
from tests.conftest import new_order_id
from tests.test_tls import make_certificates
from worker.mipos import call_deadline
from worker.mipos.budget import attempt_budget
from worker.mipos.classification import Answer, classify
from worker.mipos.client import MiposClient
from worker.mipos.errors import ErrorClass
from mipos_worker.order.model import Action, parse_order_request

TIMEOUT_S = 1.0  # per connect and per read: the total of one call is 2 s
TOTAL_S = 2 * TIMEOUT_S
MARGIN_S = 3.0  # generous: this is a bound, not a speed benchmark


def settings_for(base_url: str, timeout_s: float = TIMEOUT_S) -> MiposSettings:
    return MiposSettings(base_url=base_url, timeout_s=timeout_s, **SANDBOX_CREDENTIALS)


@pytest.fixture(scope="module")
def client(sandbox: Sandbox) -> MiposClient:
    return MiposClient(settings_for(sandbox.url))


def accept_of(order_id: str) -> Any:
    return parse_order_request(Action.ACCEPT, {"delivery_id": "1", "store_id": "3",
                                               "order_external_id": order_id})


def bounded(call: Callable[[], Answer], wait_s: float) -> tuple[Answer, float]:
    """Run ``call`` in a thread; fail (without waiting for it) if it outlives ``wait_s``."""
    result: list[tuple[Answer, float]] = []

    def run() -> None:
        started = time.monotonic()
        answer = call()
        result.append((answer, time.monotonic() - started))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(wait_s)
    assert result, f"the call was still running after {wait_s} s"
    return result[0]


# -- the total deadline -------------------------------------------------------------------


def test_a_trickled_body_ends_at_the_total_timeout(client: MiposClient, sandbox: Sandbox) -> None:
    token = client.request_token().token
    order_id = new_order_id()
    sandbox.control.add_faults(order_id, {"trickle_s": 0.5})  # ~60 bytes: 30 s without a bound
    answer, elapsed = bounded(lambda: client.send(accept_of(order_id), token), TOTAL_S + MARGIN_S)
    assert answer.http_status is None
    assert f"total timeout of {TOTAL_S:g} s exceeded" in (classify(answer).error or "")
    assert classify(answer).error_class is ErrorClass.TRANSIENT
    assert answer.outcome_unknown  # sent: mipos may have applied it
    assert elapsed >= TOTAL_S - 0.1


def test_trickled_token_answer_ends_at_the_total_timeout(client: MiposClient,
                                                         sandbox: Sandbox) -> None:
    sandbox.control.add_call_faults("token", {"status": 500, "body": {"message": "x" * 40},
                                              "trickle_s": 0.5})

    def call() -> Answer:
        try:
            client.request_token()
        except Exception as exc:  # noqa: BLE001
            return Answer(http_status=None, exception=exc)
        return Answer(http_status=200)

    answer, _ = bounded(call, TOTAL_S + MARGIN_S)
    assert "total timeout of 2 s exceeded" in str(answer.exception)


def test_the_attempt_budget_shortens_the_call(client: MiposClient, sandbox: Sandbox) -> None:
    token = client.request_token().token
    order_id = new_order_id()
    sandbox.control.add_faults(order_id, {"trickle_s": 0.5})

    def call() -> Answer:
        with attempt_budget(0.6):
            return client.send(accept_of(order_id), token)

    answer, elapsed = bounded(call, 0.6 + MARGIN_S)
    assert "total timeout of 0.6 s exceeded" in (classify(answer).error or "")
    assert elapsed < TOTAL_S


def test_a_spent_budget_sends_nothing(client: MiposClient, sandbox: Sandbox) -> None:
    token = client.request_token().token
    order_id = new_order_id()
    with attempt_budget(0.0):
        answer = client.send(accept_of(order_id), token)
    assert answer.http_status is None and not answer.outcome_unknown
    verdict = classify(answer)
    assert verdict.error_class is ErrorClass.TRANSIENT
    assert "attempt time budget spent" in (verdict.error or "")
    assert sandbox.control.requests(order_external_id=order_id) == []


def test_the_connection_is_reused_after_a_normal_call(client: MiposClient, sandbox: Sandbox) -> None:
    token = client.request_token().token
    before = call_deadline.connections_opened()
    for _ in range(5):
        assert classify(client.send(accept_of(new_order_id()), token)).ok
    assert call_deadline.connections_opened() == before  # keep-alive: no new connection per call


def test_a_cut_call_does_not_spoil_the_next_one(client: MiposClient, sandbox: Sandbox) -> None:
    token = client.request_token().token
    slow = new_order_id()
    sandbox.control.add_faults(slow, {"trickle_s": 0.5})
    with attempt_budget(0.3):
        assert client.send(accept_of(slow), token).http_status is None
    assert classify(client.send(accept_of(new_order_id()), token)).ok


# -- outcome unknown: after sending, yes; before sending, no -------------------------------


@pytest.mark.parametrize(
    "fault",
    [{"drop": True}, {"reset": True}, {"reset": True, "apply": False}, {"delay_s": 1.5}],
    ids=["drop", "reset-after-read", "reset-not-applied", "read-timeout"],
)
def test_failures_after_sending_leave_the_outcome_unknown(client: MiposClient, sandbox: Sandbox,
                                                          fault: dict[str, Any]) -> None:
    token = client.request_token().token
    order_id = new_order_id()
    sandbox.control.add_faults(order_id, fault)
    answer = client.send(accept_of(order_id), token)
    assert answer.http_status is None and answer.outcome_unknown
    assert classify(answer).error_class is ErrorClass.TRANSIENT


def test_a_closed_port_is_known_not_sent() -> None:
    closed = MiposClient(settings_for(f"http://127.0.0.1:{free_port()}"))
    answer = closed.send(accept_of(new_order_id()), "t")
    assert answer.http_status is None and not answer.outcome_unknown
    assert classify(answer).error_class is ErrorClass.TRANSIENT


def test_name_resolution_failure_is_known_not_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    answer = MiposClient(settings_for("http://mipos.test:80")).send(accept_of(new_order_id()), "t")
    assert answer.http_status is None and not answer.outcome_unknown
    assert "NameResolution" in (classify(answer).error or "")


def test_connect_timeout_is_known_not_sent(monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox) -> None:
    def slow_connect(*args: Any, **kwargs: Any) -> Any:
        raise TimeoutError("timed out")

    monkeypatch.setattr(urllib3.util.connection, "create_connection", slow_connect)
    monkeypatch.setattr(urllib3.connection.connection, "create_connection", slow_connect)
    answer = MiposClient(settings_for(sandbox.url)).send(accept_of(new_order_id()), "t")
    assert answer.http_status is None and not answer.outcome_unknown
    assert "ConnectTimeout" in (classify(answer).error or "")


def test_tls_handshake_failure_is_known_not_sent(sandbox: Sandbox) -> None:
    """https:// to the plain-HTTP sandbox: the handshake fails before anything is sent."""
    order_id = new_order_id()
    tls = MiposClient(settings_for(sandbox.url.replace("http://", "https://")))
    answer = tls.send(accept_of(order_id), "t")
    assert answer.http_status is None and not answer.outcome_unknown
    assert "SSL" in (classify(answer).error or "")


# -- https: the same bound ---------------------------------------------------------------------


class _TrickleHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"message": ["Operation completed successfully"], "data": null}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for byte in body:
                self.wfile.write(bytes([byte]))
                time.sleep(0.5)
        except OSError:
            pass


@pytest.fixture(scope="module")
def trickling_https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    make_certificates(directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TrickleHandler)
    server.daemon_threads = True
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "redis.crt", directory / "redis.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", directory / "ca.crt"
    server.shutdown()
    server.server_close()


def test_a_trickled_https_body_ends_at_the_total_timeout(
        trickling_https: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    url, ca = trickling_https
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    tls = MiposClient(settings_for(url))
    answer, elapsed = bounded(lambda: tls.send(accept_of(new_order_id()), "t"), TOTAL_S + MARGIN_S)
    assert "total timeout of 2 s exceeded" in (classify(answer).error or ""), classify(answer).error
    assert answer.outcome_unknown and elapsed >= TOTAL_S - 0.1
