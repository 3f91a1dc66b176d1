# One command each: `make test` (set up .venv if needed, run the whole suite) and `make demo` (the main job).
SHELL := /bin/bash
VENV_STAMP := .venv/.installed
PYTEST_ARGS ?=

.PHONY: test demo setup clean

$(VENV_STAMP): pyproject.toml uv.lock launch/setup_env.sh
	bash launch/setup_env.sh
	touch $@

setup: $(VENV_STAMP)

test: $(VENV_STAMP)
	.venv/bin/python -m pytest tests $(PYTEST_ARGS)

demo: $(VENV_STAMP)
	bash launch/demo.sh

clean:
	rm -rf .venv .uv-bootstrap .pytest_cache
