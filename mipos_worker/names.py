"""Names a POS and the workers must agree on: the queue and the task names.

A producer that does not import this package sends by these names
(``send_task("mipos.accept_order", kwargs=...)``).
"""

from __future__ import annotations

from mipos_worker.order.model import Action

QUEUE = "mipos"  # the one queue order tasks travel on
TASK_NAMES = {Action.ACCEPT: "mipos.accept_order", Action.DENY: "mipos.deny_order"}
