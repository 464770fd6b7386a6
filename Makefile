# `make setup` installs everything (CPU torch first so no CUDA build is pulled).
# `make run` runs the main job; `make test` runs the test suite.
PYTHON ?= python3

.PHONY: setup run test data

setup:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]"

data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || echo "could not install dataset-fashion-mnist"; \
	fi

run: setup data
	$(PYTHON) -m bmrs train --output runs/default --resume

test:
	$(PYTHON) -m pytest
