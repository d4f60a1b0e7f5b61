# Every target builds the environment it needs; nothing is assumed installed but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first, and only when missing, so that a local CPU wheel is used when present.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test bench soak clean

$(VENV)/.ready: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[lightning,hf,dev]"
	touch $@

venv: $(VENV)/.ready

demo: venv
	$(PY) examples/demo.py

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) benchmarks/run_all.py

soak: venv
	CKPT_SOAK=1 $(PY) -m pytest -q -p no:cacheprovider --timeout=7200 tests/test_crash.py tests/test_faults.py tests/test_fuzz.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
