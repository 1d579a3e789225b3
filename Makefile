# Two commands for a fresh machine:
#   make demo   set up (virtual environment + dependencies) and privately fine-tune
#               SmolLM2-135M with LoRA on the bundled clinic-notes corpus
#   make test   set up if needed and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BASE := $(VENV)/.installed-base

.PHONY: demo test setup lint bench clean

# the quickstart needs only the core install; the tests need every extra (dev pulls `all`)
$(BASE): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(BASE)
	$(VENV)/bin/dptrain train recipes/quickstart.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
