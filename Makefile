# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_INDEX ?= demo-index
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test lint system-deps bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Debian packages: real Fashion-MNIST data and a headless browser for the end-to-end UI tests.
# Installed when running as root; tests that need them skip with a message otherwise.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in dataset-fashion-mnist chromium chromium-driver; do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	fi

demo: $(STAMP) system-deps
	$(VENV)/bin/otclip demo --out $(DEMO_INDEX) --host 127.0.0.1 --port 7860

# two workers (pytest-xdist), each test file on one of them: the suite's model loads, subprocesses and servers are
# largely single-threaded, so one process left a core idle (24 -> 16 min on a 2-core machine); `pytest` alone runs serially
test: $(STAMP) system-deps
	$(VENV)/bin/pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .
