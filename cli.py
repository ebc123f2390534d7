"""The overlap-bench command line, runnable from a checkout without installing: ``python cli.py sweep ...``.

The same typer app as the ``overlap-bench`` console script (``overlap_bench.cli``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import overlap_bench.research.commands  # noqa: E402,F401  (after the path insert; registers model, interference)
from overlap_bench.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
