# `make test` is what CI runs (.ci/run); `make run` starts the provider (:8000)
# and the demo portal (:8001). Both first run scripts/bootstrap.sh, which installs
# whatever is missing.
PYTHON := .venv/bin/python

.PHONY: test run clean

test:
	bash scripts/bootstrap.sh --test
	$(PYTHON) -m pytest -n 2 -q

run:
	bash scripts/bootstrap.sh
	$(PYTHON) -m idp.demo

clean:
	rm -rf var .venv
