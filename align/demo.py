"""The main job on the embedded default: `make demo` (or `python -m align.demo`).

Builds the shapes world and the tiny pretrained parts (reusing what is already built) and prints
their quality figures. Later stages of the pipeline join this job as they land.
"""

from __future__ import annotations

import sys
import time

from align.zoo import main as build_zoo


def main(argv=None):
    t0 = time.time()
    build_zoo(argv)
    print(f"\nmake demo finished in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
