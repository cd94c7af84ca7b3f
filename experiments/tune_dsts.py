"""The main job: tune DSTS (`experiments/tune.py --method dsts`).

    ray job submit --working-dir . -- python experiments/tune_dsts.py [--config ...]
    python experiments/tune_dsts.py          # local Ray, embedded MLflow, synthetic benchmark

Options are those of experiments/tune.py (without --method).
"""

from __future__ import annotations

import sys

from tune import main

if __name__ == "__main__":
    sys.exit(main(method="dsts"))
