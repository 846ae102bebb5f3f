# Every target creates the virtual environment it needs; nothing beyond Python is assumed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OUT    := out

.PHONY: demo test fuzz fixtures bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.fixtures: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,fixtures]'
	touch $@

demo: $(VENV)/.installed
	@mkdir -p $(OUT)
	$(BIN)/onnx-bnslim fixtures/resnet.onnx --ratio 0.25 --data fixtures/heldout.npz -o $(OUT)/resnet.slim.onnx --report $(OUT)/resnet.report.json
	@echo "wrote $(OUT)/resnet.slim.onnx and $(OUT)/resnet.report.json"

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# The property-based fuzz of `make test`, with many more (and fresh random) examples.
FUZZ_EXAMPLES ?= 20000
fuzz: $(VENV)/.installed
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

fixtures: $(VENV)/.fixtures
	$(BIN)/python fixtures/train.py
	$(BIN)/python fixtures/architectures.py

# The peer, onnxsim 0.8.1, in an environment of its own (its pins must not move ours).
PEER := .venv-onnxsim
$(PEER)/.installed:
	$(PYTHON) -m venv $(PEER)
	$(PEER)/bin/python -m pip install --quiet 'onnxsim==0.8.1' onnxruntime numpy
	touch $@

# Measures, asserts nothing; needs torch (fixtures extra) to build the ResNet-50-sized model.
bench: $(VENV)/.fixtures $(PEER)/.installed
	$(BIN)/python bench/run.py
	$(BIN)/python bench/peer.py --peer-python $(PEER)/bin/python
	$(BIN)/python bench/int8.py --nncf

clean:
	rm -rf $(VENV) $(PEER) $(OUT) .pytest_cache
