"""The operator's pages, in Flower's process: orders and dead letters, with a Replay button.

Served by ``python -m worker.flower`` on Flower's port, behind its authentication, linked
from its navigation bar:

- ``/orders``: find an order by a part of its id, ``store/order``, or a task id;
- ``/order?store=&id=``: one order's state, every attempt, settle decisions and duplicate
  warnings, its done record and dead letters; an Ask mipos button (its pending list);
- ``/dead-letters``: newest first, paged, filtered by reason, store, action and time, with
  counts by reason; a selection of them replayed at once;
- ``/dead-letter/<id>``: one letter and its order's history, with Replay and Discard.

Writes are POSTs after a confirmation page, with Tornado's XSRF token; a user of
``FLOWER_READONLY_USERS`` sees no button and gets a 403 on a POST. Each replay or discard
writes a ``dead_letter_replayed`` / ``dead_letter_discarded`` line naming the user.

The room sits above ``ops``: it reuses the order's story, replay and the dead letters' owner,
never a Redis key by name. ``pages_extension`` (app.py) is what ``worker/flower.py`` adds.
"""
