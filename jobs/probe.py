"""Probe model properties from SANE embeddings: ``python jobs/probe.py --run URI [--zoo URI] [--out URI]``.

Writes the paper's property-prediction table (W, s(W), SANE, an untrained SANE) as CSV
and Markdown, plus figures. Thin entry point for ``ray job submit``; see ``sane-ray probe --help``.
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package may not be installed: use the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sane_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["probe", *sys.argv[1:]]))
