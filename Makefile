# seekflow: one command to a trained, registered model.
#   make run [PROFILE=tiny] [STEPS=N]   start MLflow + Airflow locally, trigger the pipeline, follow it
#   make status | make stop | make clean
#   make test [PYTEST_ARGS='-m "not slow"'] [PYTEST_WORKERS=2]
#   make test-extended                  the multi-process checks kept outside make test's 15 minutes
# Ports: SEEKFLOW_MLFLOW_PORT (default 5000), SEEKFLOW_AIRFLOW_PORT (default 8080).

PYTHON3 ?= python3.11
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.seekflow-installed

PROFILE ?= tiny
STEPS   ?=
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2

.PHONY: venv run stop status test test-extended clean constraints

venv: $(STAMP)

# Re-installs only when pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -U pip
	$(PY) -m pip install -c constraints.txt -e '.[all]'
	touch $@

# Refreeze constraints.txt from the current .venv (after changing a pin in pyproject.toml).
constraints: venv
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -vi '^seekflow' | sed 's/+cpu$$//'; } > constraints.tmp
	mv constraints.tmp constraints.txt

run: venv
	$(PY) scripts/local_platform.py run --profile $(PROFILE) $(if $(STEPS),--steps $(STEPS))

stop:
	@python3 scripts/local_platform.py stop

status:
	@python3 scripts/local_platform.py status

test: venv
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-extended: venv
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --extended -m extended $(PYTEST_ARGS)

clean: stop
	rm -rf .seekflow
