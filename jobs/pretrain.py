"""Pretrain SANE: ``python jobs/pretrain.py [--config FILE] [--zoo URI] [--out URI] ...``.

With no arguments it pretrains on the built-in digits zoo (generated on first use) on a
local Ray cluster. Thin entry point for ``ray job submit``; see ``sane-ray pretrain --help``.
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package may not be installed: use the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sane_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
