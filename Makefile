# Two commands do everything: `make demo` and `make test`. Both set up .venv themselves.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.lorakit-setup-stamp
SETUP_FILES := pyproject.toml constraints.txt scripts/setup.sh $(wildcard scripts/setup.d/*.sh)

.PHONY: setup demo test lint constraints clean

$(STAMP): $(SETUP_FILES)
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m lorakit demo --output-dir outputs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --timeout=600

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# After upgrading a package in .venv and seeing `make test` pass: record the tested versions.
constraints: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | sed -E 's/^(torch==[0-9.]+)\+cpu$$/\1/' > constraints.txt

clean:
	rm -rf outputs runs .pytest_cache
