# make demo      install into .venv, prepare Shakespeare, train a small TopoLM on CPU, sample, map its topography
# make compare   the demo beside its non-topographic control (alpha=0): reuses the newest finished demo run
#                in out/ (or trains one), trains the control unless it is finished, compares their maps
# make test      install into .venv and run the whole test suite (what CI runs), one pytest worker per core
# make test-quick  the development subset: without the compile, torchrun and brainscore tests
# make .venv-brainscore/.installed  Brain-Score language's own environment (brainscore/requirements.txt)
VENV ?= .venv
PY := $(VENV)/bin/python
# brainscore-language needs numpy < 2 and transformers < 5: an environment of its own (brainscore/score.py)
BS_VENV ?= .venv-brainscore
# Expanded once (:=), so every step of a target names the same run folder.
ifndef RUN
RUN := shakespeare-$(shell date +%Y%m%d-%H%M%S)
# make compare's model: the newest demo run in out/ whose training ended (its log.jsonl has the "end" event).
LAST_DEMO := $(shell for d in $$(ls -d out/shakespeare-*/ 2>/dev/null | grep -v -- '-control/$$' | sort -r); do \
	grep -qs '"event": "end"' "$${d}log.jsonl" && basename "$$d" && break; done)
compare: RUN := $(or $(LAST_DEMO),$(RUN))
endif
# "yes" when out/<run>/ holds a finished run of train.py (expanded in a recipe, with that target's RUN).
finished = $(shell grep -qs '"event": "end"' out/$(1)/log.jsonl && echo yes)

.PHONY: install demo compare test test-quick clean-venv

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt requirements-hf.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# torch first, from its pin, so that no requirement makes pip choose another build
$(BS_VENV)/.installed: brainscore/requirements.txt
	python3 -m venv $(BS_VENV)
	$(BS_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(BS_VENV)/bin/python -m pip install --quiet -r brainscore/requirements.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) data/shakespeare/prepare.py
	$(PY) train.py train_shakespeare.yaml run_name=$(RUN)
	$(PY) sample.py ckpt=out/$(RUN) start="ROMEO:" num_samples=2 max_new_tokens=120
	$(PY) analyze.py ckpt=out/$(RUN) out=figures/$(RUN)

compare: install
	$(PY) data/shakespeare/prepare.py
	$(if $(call finished,$(RUN)),@echo "reusing the finished run out/$(RUN) (RUN=<name> picks another)",$(PY) train.py train_shakespeare.yaml run_name=$(RUN))
	$(if $(call finished,$(RUN)-control),@echo "reusing the finished run out/$(RUN)-control",$(PY) train.py train_shakespeare.yaml run_name=$(RUN)-control alpha=0)
	$(PY) analyze.py ckpt=out/$(RUN) compare=out/$(RUN)-control out=figures/$(RUN)-compare overwrite=true

test: $(VENV)/.installed-dev $(BS_VENV)/.installed
	BRAINSCORE_VENV=$(BS_VENV) $(PY) -m pytest -q -n auto tests

test-quick: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n auto tests -m "not compile and not torchrun and not brainscore"

clean-venv:
	rm -rf $(VENV) $(BS_VENV)
