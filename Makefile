# make demo   install into .venv, prepare Shakespeare, train a small TopoLM on CPU, sample from it
# make test   install into .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= shakespeare-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test clean-venv

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt requirements-hf.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) data/shakespeare/prepare.py
	$(PY) train.py train_shakespeare.yaml run_name=$(RUN)
	$(PY) sample.py ckpt=out/$(RUN) start="ROMEO:" num_samples=2 max_new_tokens=120

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
