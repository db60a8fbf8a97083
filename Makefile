# `make test` is what CI runs (.ci/run); `make run` starts the provider (:8000)
# and the demo portals; `make bench` runs bench/run.py (about 12 minutes). Each
# first runs scripts/bootstrap.sh, which installs whatever is missing.
PYTHON := .venv/bin/python

.PHONY: test run bench clean

test:
	bash scripts/bootstrap.sh --test
	$(PYTHON) -m pytest -n 2 -q

run:
	bash scripts/bootstrap.sh
	$(PYTHON) -m idp.demo

bench:
	bash scripts/bootstrap.sh --bench
	$(PYTHON) bench/run.py

clean:
	rm -rf var .venv
