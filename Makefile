# `make setup` installs everything (CPU torch first so no CUDA build is pulled).
# `make run` runs the main job; `make test` runs the test suite; `make reproduce` runs (or continues) the
# paper's reproduction from this checkout (paper/README.md: about 5 hours on two cores; rerun to resume).
PYTHON ?= python3

.PHONY: setup run test data reproduce

setup:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]"

data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || echo "could not install dataset-fashion-mnist"; \
	fi

# the same network without noise layers first, for the same epochs: the default run is compared with it
run: setup data
	$(PYTHON) -m bmrs train --criterion none --no-noise --output runs/plain --resume
	$(PYTHON) -m bmrs train --output runs/default --resume --compare-to runs/plain

test:
	$(PYTHON) -m pytest

# resumable: finished runs are skipped, interrupted ones continue, the report in paper/results is rebuilt
# (setup installs every extra, the `paper` one among them: matplotlib, scipy, kneed)
reproduce: setup data
	$(PYTHON) -m paper fashion-mnist
