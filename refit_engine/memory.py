"""`python -m refit_engine.memory`: the memory dry run. It lives in refit_engine.harness.dry_run."""

import sys

from refit_engine.harness.dry_run import main

if __name__ == "__main__":
    sys.exit(main())
