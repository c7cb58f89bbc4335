"""``python -m worker.flower``: the Procfile's Flower line (worker/ops/flower.py), with the
operator's pages (worker/pages/), a room above ``ops`` that ``ops`` cannot import itself."""

import sys

from worker.ops.flower import main
from worker.pages.app import pages_extension

if __name__ == "__main__":
    sys.exit(main([pages_extension]))
