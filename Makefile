# Two commands do everything on a fresh Debian machine with Python 3.11:
#   make demo   - a local fleet: simulators -> edge agent -> broker -> hub (API on :8000)
#   make test   - the whole test-suite against real Mosquitto, PostgreSQL and Modbus
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test lint typecheck bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	bash scripts/system-deps.sh $(if $(filter test,$(MAKECMDGOALS)),test,demo)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(PY) -m fleet.demo

test: install
	bash scripts/system-deps.sh test
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: install
	$(PY) -m bench.pipeline

bench-quick: install
	$(PY) -m bench.pipeline --quick

clean:
	rm -rf var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
