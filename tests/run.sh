#!/usr/bin/env bash
# The test command (README, and CI through .ci/run): installs what the tests need, builds and
# installs the package, runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -r tests/requirements.txt
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps .
exec python -m pytest -q "$@"
