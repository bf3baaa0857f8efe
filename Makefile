# Two commands on a fresh machine with Python 3.10+ and pip:
#   make run   - virtualenv, install, fetch the default model, serve it on http://HOST:PORT
#   make test  - install the test extras, lint, run the test suite
# (make chat answers one chat prompt without a server.)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?
HOST ?= 127.0.0.1
PORT ?= 30000

# make image: docker/Dockerfile for $(BACKEND), tagged engine:$(BACKEND) (DOCKER=podman works too)
BACKEND ?= cpu
DOCKER ?= docker
.PHONY: run chat test lint model install clean
.PHONY: image

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[gguf]'
	$(BIN)/python -m backends.cpu.kernels.build
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m backends.cpu.kernels.build
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

model: $(VENV)/.installed
	$(BIN)/python -m engine.loader.hub

run: model
	$(BIN)/engine serve --host $(HOST) --port $(PORT)

chat: model
	$(BIN)/engine generate --chat "$(PROMPT)"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

# Two pytest workers (pytest-xdist): on a 2-core host the suite took 19.6 min against 25.1
# in one process (2026-12-04); TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test lint
	$(BIN)/python -m engine.loader.hub
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 -n $(TEST_WORKERS)

image:
	$(DOCKER) build -f docker/Dockerfile --build-arg BACKEND=$(BACKEND) -t engine:$(BACKEND) .

clean:
	rm -rf $(VENV)
