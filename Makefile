# Two commands for a newcomer: `make demo` (set up, then meta-train on the embedded default) and
# `make test` (set up, then run the test suite). Both create .venv when it is missing. `-q`: accelerate
# launch would repeat a failed script's one-line error inside its own traceback.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This project's machines install the torch wheels that lie on local disk (a CUDA build that runs on
# the CPU); elsewhere override, e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.metacontrol-installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test chromium lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/accelerate launch -q meta_train.py

# chromium first: without it the report tests fail, so say so before minutes of installing.
# Two workers, one per core; each test file stays on one worker, so a module's fixture (a training run several tests
# read) is built once.
test: chromium install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

chromium:
	@sh .ci/ensure-chromium

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf outputs .pytest_cache
