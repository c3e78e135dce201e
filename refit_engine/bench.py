"""`python -m refit_engine.bench`: the main job (README's first command). It lives in refit_engine.harness.main_job."""

import sys

from refit_engine.harness.main_job import main

if __name__ == "__main__":
    sys.exit(main())
