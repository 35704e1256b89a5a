"""Train a model zoo on scikit-learn's digits: ``python jobs/make_zoo.py --out URI --models N --epochs E``.

Thin entry point for ``ray job submit``; see ``sane-ray make-zoo --help`` (``--format public`` writes
the public model-zoo layout).
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package may not be installed: use the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sane_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["make-zoo", *sys.argv[1:]]))
