"""`python -m refit_engine.memory`: the memory dry run (refit_engine.harness.dry_run), and with
--advise the layout advisor (refit_engine.harness.advisor)."""

import sys

from refit_engine.harness.advisor import main

if __name__ == "__main__":
    sys.exit(main())
