"""Run the ``mipos-worker`` console script in a pseudo-terminal: what an operator's terminal receives.

The CLI's stdin, stdout and stderr are the pty's slave side, so ``isatty()`` is true for all
three, as at a real terminal; the test reads the raw bytes from the master side (where the
terminal emulator would), and can type an answer to a prompt.
"""

from __future__ import annotations

import errno
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from support.processes import ROOT, stop_process

CLI = str(Path(sys.executable).parent / "mipos-worker")


class Terminal:
    """One CLI run attached to a pty; ``output`` collects every byte it wrote."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen([CLI, *args], cwd=ROOT, env=env, stdin=slave, stdout=slave,
                                     stderr=slave, start_new_session=True)
        os.close(slave)
        self.output = b""
        self.closed = False

    def read_until(self, needle: bytes, timeout: float = 30.0) -> bytes:
        """Read until ``needle`` has arrived (or the CLI closed the terminal); all output so far."""
        give_up = time.monotonic() + timeout
        while needle not in self.output and not self.closed:
            left = give_up - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {needle!r}; "
                                     f"the terminal shows {self.output!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                self._read_once()
        return self.output

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self, timeout: float = 60.0) -> tuple[int, bytes]:
        """Read to the end; the exit code and everything the terminal received."""
        try:
            self.read_until(b"\0never\0", timeout=timeout)
            code = self.proc.wait(timeout=timeout)
        finally:
            stop_process(self.proc)
            os.close(self.master)
        return code, self.output

    def _read_once(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError as exc:  # Linux: EIO once every slave descriptor is closed
            if exc.errno != errno.EIO:
                raise
            data = b""
        if data:
            self.output += data
        else:
            self.closed = True


def run_in_terminal(env: dict[str, str], *args: str, timeout: float = 60.0) -> tuple[int, bytes]:
    return Terminal(env, *args).finish(timeout)
