"""``python -m worker.flower``: the Procfile's Flower line, unchanged (worker/ops/flower.py)."""

import sys

from worker.ops.flower import main

if __name__ == "__main__":
    sys.exit(main())
