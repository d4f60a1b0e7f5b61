# Every target builds the environment it needs; nothing is assumed installed but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first, and only when missing, so that a local CPU wheel is used when present.
TORCH_SPEC ?= torch==2.13.0
# what `make test` needs: both adapters, PEFT, and the test and lint tools
EXTRAS := lightning,hf,peft,dev
# `make test-min`: the oldest versions pyproject.toml accepts, pinned in .ci/min-versions.txt
VENV_MIN := .venv-min
PY_MIN := $(VENV_MIN)/bin/python

.PHONY: venv demo lint test test-min bench soak clean

$(VENV)/.ready: pyproject.toml setup.py ckpt_plugins/persist/_stream_copy.c Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.ready

demo: venv
	$(PY) examples/demo.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# -n auto: one pytest worker per core (many tests wait on the real subprocesses they start)
test: venv lint
	$(PY) -m pytest -q -n auto tests

$(VENV_MIN)/.ready: pyproject.toml setup.py ckpt_plugins/persist/_stream_copy.c Makefile .ci/min-versions.txt
	test -x $(PY_MIN) || $(PYTHON) -m venv $(VENV_MIN)
	$(PY_MIN) -m pip install -q -c .ci/min-versions.txt -e ".[$(EXTRAS)]"
	touch $@

# Not part of `make test`: the suite against the minimum versions (a separate, larger download).
test-min: $(VENV_MIN)/.ready
	$(PY_MIN) -m pytest -q -n auto tests

bench: venv
	$(PY) -m pip install -q -e ".[$(EXTRAS),bench]"
	$(PY) benchmarks/run_all.py

soak: venv
	CKPT_SOAK=1 $(PY) -m pytest -q -p no:cacheprovider --timeout=7200 tests/reliability tests/lightning/test_lightning_preemption.py tests/hf/test_hf_preemption.py tests/core/storage/test_s3_adapters.py tests/hf/test_hf_s3.py

clean:
	rm -rf $(VENV) $(VENV_MIN) build *.egg-info .pytest_cache
	rm -f ckpt_plugins/persist/_stream_copy.*.so
