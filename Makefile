# The two set-up commands of the README: `make demo` and `make test`. Both create .venv when it is missing;
# `make demo` installs only what the demo needs (vitkit and its logging extras: curves.png, TensorBoard),
# `make test` adds the test tools and the reference implementations (timm's and transformers' test models,
# onnxruntime, pytest, ruff).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo lint test test-slow clean

$(VENV)/.demo-installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[log]"
	touch $@

$(VENV)/.test-installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $@ $(VENV)/.demo-installed

# Train the built-in demo recipe (a small ViT on the CIFAR-10 sample in data/), then validate the result.
demo: $(VENV)/.demo-installed
	$(BIN)/vitkit demo

# Lint and import order (ruff, configured in pyproject.toml); CI runs it before the tests.
lint: $(VENV)/.test-installed
	$(BIN)/ruff check .

# The default suite: fast CPU tests. `make test-slow` runs the ones marked slow. `--dist loadscope` keeps each
# test module on one worker, so a module's fixtures (reference runs, exports) are built once, not once per
# interleaving: 9 min 16 s against 10 min 18 s with per-test distribution, same machine, same day.
test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -n 2 --dist loadscope

test-slow: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
