"""`python -m refit_engine.sweep`: the benchmark sweep. It lives in refit_engine.harness.sweep."""

import sys

from refit_engine.harness.sweep import main

if __name__ == "__main__":
    sys.exit(main())
