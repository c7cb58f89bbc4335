"""Hostile text in what the CLI shows (issue 25, item 7).

mipos's error bodies, and the arguments of a message another producer sent, are stored as
they came. Shown raw, a newline and terminal escapes in them forge a line, recolour the
operator's terminal and set its title. The CLI is run here in a pseudo-terminal against a
real Redis, and the bytes the terminal receives are checked.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

from cli.output import table
from mipos_worker import terminal
from mipos_worker.order.errors import InvalidOrder
from mipos_worker.order.model import Action, parse_order_request
from support.processes import RedisServer
from tests.pty_terminal import run_in_terminal
from worker.state.deadletters import DeadLetter, DeadLetters

# A newline that forges a line of `dead show`, then: set the window title (OSC 0, ended by BEL),
# turn the text red (CSI 31m), a C1 CSI, and a right-to-left override that reorders the rest.
HOSTILE = ("Order not found.\nreplayed:         yes, accepted at mipos"
           "\x1b]0;pwned\x07\x1b[31m red \x9b2J \u202edesrever")
SHOWN = (r"Order not found.\nreplayed:         yes, accepted at mipos"
         r"\x1b]0;pwned\x07\x1b[31m red \x9b2J \u202edesrever")
RAW = [b"\x1b", b"\x07", "\x9b".encode(), "\u202e".encode()]


def terminal_env(redis_server: RedisServer) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "REDIS_URL": redis_server.url, "PYTHONUNBUFFERED": "1"}


def screen_lines(output: bytes) -> list[str]:
    """The lines the terminal shows; raw control bytes fail the test first."""
    for raw in RAW:
        assert raw not in output, f"{raw!r} reached the terminal: {output!r}"
    assert b"\r" not in output.replace(b"\r\n", b""), f"a bare CR reached the terminal: {output!r}"
    return output.decode().split("\r\n")


@pytest.fixture
def letters(redis_server: RedisServer) -> DeadLetters:
    return DeadLetters(redis_server.client, "mipos:")


def unique_store() -> str:
    """A store of one test's own, so listings by store show its letters alone."""
    return str(uuid.uuid4().int % 10**9)


@pytest.fixture
def hostile_letter(letters: DeadLetters) -> DeadLetter:
    """A permanent failure whose mipos error (and its attempt's) is hostile; ordinary ids."""
    attempt = {"attempt": 1, "at": 1_700_000_000.0, "outcome": "failed", "http_status": 409,
               "error": HOSTILE, "error_class": "permanent", "retry_in_s": None, "elapsed_ms": 2.0}
    return letters.add(action="accept", order={"delivery_id": "5", "store_id": unique_store(),
                                               "order_external_id": str(uuid.uuid4())},
                       reason="permanent", error=HOSTILE, task_id=str(uuid.uuid4()),
                       enqueued_at=None, attempts=[attempt])


@pytest.fixture
def invalid_letter(letters: DeadLetters) -> DeadLetter:
    """What another producer's message left: the ids and message themselves are hostile."""
    return letters.add(action="deny", order={"delivery_id": "1\x1b[2J", "store_id": unique_store(),
                                             "order_external_id": "o\n\x1b]0;pwned\x07",
                                             "message": HOSTILE},
                       reason="invalid", error="invalid arguments: order_external_id: must not contain "
                                               "a control character (U+000A at position 1)",
                       task_id=str(uuid.uuid4()), enqueued_at=None, attempts=[])


def test_dead_show_escapes_the_stored_error(redis_server: RedisServer, hostile_letter: DeadLetter) -> None:
    code, output = run_in_terminal(terminal_env(redis_server), "dead", "show", hostile_letter.id)
    assert code == 0, output
    lines = screen_lines(output)
    assert f"error:            {SHOWN}" in lines
    assert [line for line in lines if line.startswith("replayed:")] == ["replayed:         no"]
    [row] = [line for line in lines if line.startswith("1 ")]  # the attempts table
    assert r"Order not found.\nreplayed: yes, accepted at mipos\x1b]0;" in row  # cut at 60


def test_dead_show_of_an_invalid_letter_escapes_its_arguments(redis_server: RedisServer,
                                                              invalid_letter: DeadLetter) -> None:
    code, output = run_in_terminal(terminal_env(redis_server), "dead", "show", invalid_letter.id)
    assert code == 0, output
    lines = screen_lines(output)
    assert r"order_external_id:o\n\x1b]0;pwned\x07" in lines
    assert r"delivery_id:      1\x1b[2J" in lines
    assert f"message:          {SHOWN}" in lines


def test_dead_list_escapes_every_cell(redis_server: RedisServer, hostile_letter: DeadLetter,
                                      invalid_letter: DeadLetter) -> None:
    for letter in (hostile_letter, invalid_letter):
        store = letter.order["store_id"]
        code, output = run_in_terminal(terminal_env(redis_server), "dead", "list", "--store", store)
        assert code == 0, output
        lines = [line for line in screen_lines(output) if line]
        assert len(lines) == 2, lines  # the header and one row: nothing forged
    assert r"o\n\x1b]0;pwned\x07" in lines[1]


def test_order_view_escapes_the_summary_and_the_attempts(redis_server: RedisServer,
                                                         hostile_letter: DeadLetter) -> None:
    order = hostile_letter.order
    code, output = run_in_terminal(terminal_env(redis_server), "order", order["store_id"],
                                   order["order_external_id"])
    assert code == 0, output
    lines = screen_lines(output)
    [state] = [line for line in lines if line.startswith("state:")]
    assert r"Order not found.\nreplayed:" in state and r"\u202edesrever" in state
    assert not [line for line in lines if line.startswith("replayed:")]


def test_replay_of_an_invalid_letter_escapes_what_it_prints(redis_server: RedisServer,
                                                            invalid_letter: DeadLetter) -> None:
    code, output = run_in_terminal(terminal_env(redis_server), "dead", "replay", invalid_letter.id)
    assert code == 1, output
    lines = screen_lines(output)
    store = invalid_letter.order["store_id"]
    assert any(line.startswith(f"{invalid_letter.id} deny {store}/o\\n\\x1b]0;pwned\\x07: not replayable")
               for line in lines), lines


# -- the rule, unit by unit ----------------------------------------------------------------


@pytest.mark.parametrize("raw, shown", [
    ("plain text, café 注文 🙂", "plain text, café 注文 🙂"),
    ("a\nb\tc\rd", r"a\nb\tc\rd"),
    ("\x00\x1b\x7f", r"\x00\x1b\x7f"),
    ("\x85\x9b", r"\x85\x9b"),
    ("\u202eabc\u2066\u200f", r"\u202eabc\u2066\u200f"),
    ("line\u2028sep", r"line\u2028sep"),
    ("lone \ud800", r"lone \ud800"),
])
def test_printable_escapes_control_characters_visibly(raw: str, shown: str) -> None:
    assert terminal.printable(raw) == shown


def test_table_cells_are_escaped_not_split() -> None:
    text = table(["ERROR"], [[HOSTILE]], max_width=500)
    assert text.splitlines() == ["ERROR", " ".join(SHOWN.split())]  # runs of spaces made one


@pytest.mark.parametrize("message", ["Out\x1b[31m of stock", "Out of\x00stock", "Out\x9bstock",
                                     "Out of stock:\n- fries", "Out\tof stock", "bad \ud800"])
def test_a_deny_message_with_a_control_character_is_refused(message: str) -> None:
    arguments = {"delivery_id": "1", "store_id": "3", "order_external_id": "o-1", "message": message}
    with pytest.raises(InvalidOrder, match="^message: must not contain") as caught:
        parse_order_request(Action.DENY, arguments)
    assert caught.value.field == "message"


def test_a_deny_message_keeps_its_trimmed_text_and_right_to_left_marks() -> None:
    arguments = {"delivery_id": "1", "store_id": "3", "order_external_id": "o-1",
                 "message": "  \u200fנגמר המלאי\n"}
    assert parse_order_request(Action.DENY, arguments).message == "\u200fנגמר המלאי"
