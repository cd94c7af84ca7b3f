# `make test` and `make demo` set up .venv from constraints.txt (only when pyproject.toml or
# constraints.txt changed) and run the test suite / the main job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint format clean

# uv installs the same pinned set as pip (compared package by package) in ~50 s instead of
# ~165 s (measured on 2 cores): it downloads and unpacks torch's ~3 GB of CUDA wheels in
# parallel. uv reads no pip.conf, so where only pip's configured index can serve the packages
# (a private mirror), the install falls back to pip, saying so. --compile-bytecode, as pip
# does: uv does not by default, and with PYTHONDONTWRITEBYTECODE set (this machine sets it) every
# Ray worker would compile torch, Ray and MLflow from source at each start (measured: importing
# them 6-7 s with bytecode, 14-113 s without).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt uv
	$(VENV)/bin/uv pip install --python $(PY) -q --compile-bytecode -c constraints.txt -e '.[dev]' || { \
	  echo "uv could not install the pins; installing with pip (pip.conf's index)"; \
	  $(PY) -m pip install -q -c constraints.txt -e '.[dev]'; }
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) experiments/tune_dsts.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
