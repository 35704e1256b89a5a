"""Sample new models from a pretrained run: ``python jobs/sample.py --run URI --task NAME --out URI``.

Thin entry point for ``ray job submit``; see ``sane-ray sample --help``.
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package may not be installed: use the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sane_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
