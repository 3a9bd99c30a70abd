# Set-up and everyday targets. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  := torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
WORDNET := /usr/share/wordnet/data.noun

.PHONY: install install-dev demo test lint bench clean data

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) install -e ".[vision,hf,fl,dev]"
	touch $@

install: $(VENV)/.core data      ## the package and its core dependencies
install-dev: $(VENV)/.dev data   ## plus torchvision, timm, transformers, peft, flwr, pytest

data:                            ## Fashion-MNIST from Debian's package, when we may install it
	@if [ -f $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || \
	  echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"; \
	else echo "note: not root: skipping 'apt-get install dataset-fashion-mnist' (Fashion-MNIST tests will be skipped)"; fi
	@if [ -f $(WORDNET) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q wordnet-base >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wordnet-base >/dev/null 2>&1) || echo "note: could not install wordnet-base; WordNet tests will be skipped"; \
	else echo "note: not root: skipping 'apt-get install wordnet-base' (WordNet tests will be skipped)"; fi

demo: install                    ## train two MLPs on digits, align them, show the barrier table
	$(VENV)/bin/neuralign demo

test: install-dev                ## the test suite (exit 5, no test collected, is a failure too)
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; exit $$rc

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
