# The two set-up commands of the README: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo lint test test-slow bench clean

$(BIN)/vitkit: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $(BIN)/vitkit

# Train the built-in demo recipe (a small ViT on the CIFAR-10 sample in data/), then validate the result.
demo: $(BIN)/vitkit
	$(BIN)/vitkit demo

# Lint and import order (ruff, configured in pyproject.toml); CI runs it before the tests.
lint: $(BIN)/vitkit
	$(BIN)/ruff check .

# The default suite: fast CPU tests. `make test-slow` runs the ones marked slow.
test: $(BIN)/vitkit
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-slow: $(BIN)/vitkit
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
