# make test / make demo: each creates .venv (Python 3.11) and installs chx[dev] when missing or stale.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo venv clean
venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadscope

demo: venv
	$(BIN)/chx demo --out demo-out

clean:
	rm -rf $(VENV) *.egg-info
