# The two commands a newcomer needs: `make quickstart` and `make test`.
# Each creates .venv if missing and installs torch first (CPU wheel by default).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.mim-hf-installed

.PHONY: test quickstart results install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

quickstart: $(STAMP)
	$(BIN)/mim-hf quickstart

# the results protocol with every lever row in item fold 0: what docs/results.md shows (hours on a
# laptop CPU; resumable: run it again to continue; runs in results-archive/ are reused, not trained)
LEVERS = behaviour_pairs id_aligned_pairs user_negatives no_anchor from_raw raw_channel simtier \
	aware_attention content_to_id id_dropout_high
results: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[results]"
	$(BIN)/mim-hf results --archive results-archive --lever-folds 1 --models din fuxictr_din \
		content_feature ciubm_raw ciubm_pretrained ciubm_csft $(addprefix ciubm_csft+,$(LEVERS))

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs build *.egg-info
