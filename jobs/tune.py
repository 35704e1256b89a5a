"""Sweep pretraining hyperparameters: ``python jobs/tune.py --config SWEEP.yaml [--samples N] ...``.

Thin entry point for ``ray job submit``; see ``sane-ray tune --help`` and docs/tune.md.
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package may not be installed: use the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sane_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
