# Setup is two commands: `make run` (install + dvc repro) and `make test` (install + lint + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stages run as `python -m stages.<name>`: the venv must come first on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install install-dev run test test-fast lint format compare ui docs bench lock server clean

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	touch $@

$(VENV)/.installed-dev: requirements-dev.lock $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -r requirements-dev.lock
	touch $@

run: install
	dvc repro

# One worker per core (pytest-xdist); a test file's tests stay on one worker, so a module's
# shared fixture is made once.
test: install-dev lint
	python -m pytest -q -n auto --dist loadfile tests

# The unit tests only, no end-to-end runs of dvc or mlflow (under 2 minutes on 2 cores).
test-fast: install-dev
	python -m pytest -q -m "not e2e" tests

lint: install-dev
	ruff check .
	ruff format --check .

format: install-dev
	ruff format .
	ruff check --fix .

# Queue the three headline kernels, run them two at a time, and show them side by side.
compare: install
	dvc exp run --queue -S 'kernel=sobel_x,sobel_y,smiley'
	dvc exp run --run-all -j 2
	dvc exp show --no-pager --md --drop '.*' \
	  --keep 'Experiment|^kernel$$|kernel_mse|kernel_rel_error|val_loss|train_seconds'
	@echo
	@echo "Compare the runs in MLflow:  make ui   (it prints the link to open)"

# `mlflow ui` on the project's store (src/paths.py: mlflow.db and mlartifacts/ at the main
# repo root), light: one worker and no GenAI job runner, where a plain `mlflow ui` starts 15
# processes and takes 3 GB. Once it answers, it prints the link to the experiment's runs in
# the Model training view. HOST and PORT as for `make server`; Ctrl-C stops it.
define UI_STORE
import shlex, sys
from src import paths
uri = paths.tracking_uri()
if not uri.startswith("sqlite"):
    sys.exit(f"error: MLFLOW_TRACKING_URI is {uri}; open that server, or unset it for make ui")
print(f"store={shlex.quote(uri)} artifacts={shlex.quote(str(paths.artifact_root()))}")
endef
define UI_LINK
import os, sys, time, requests
from src import config, errors
host, port, server = sys.argv[1:]  # server: the pid of the shell that became `mlflow server`
base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
while True:
    try:
        if requests.get(f"{base}/health", timeout=1).ok:
            break
    except requests.RequestException:
        pass
    try:
        os.kill(int(server), 0)
    except ProcessLookupError:
        sys.exit()  # the server stopped, and said why
    time.sleep(0.25)
try:
    name = config.load().mlflow.experiment
except errors.UserError:
    name = config.MlflowConfig().experiment
found = requests.get(f"{base}/api/2.0/mlflow/experiments/get-by-name",
                     params={"experiment_name": name}, timeout=10)
view = "workflowType=machine_learning"
if found.ok:
    link = f"{base}/#/experiments/{found.json()['experiment']['experiment_id']}/runs?{view}"
else:
    link = f"{base}/#/experiments?{view}   (no {name} runs yet: dvc repro logs the first)"
print(f"\nMLflow UI, the runs of {name}:  {link}\n", flush=True)
endef
export UI_STORE UI_LINK
ui: install
	@found=$$(python -c "$$UI_STORE") && eval "$$found" && \
	{ (python -c "$$UI_LINK" '$(HOST)' '$(PORT)' $$$$ &) } && \
	exec env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --host '$(HOST)' \
	  --port '$(PORT)' --workers 1 --backend-store-uri "$$store" --artifacts-destination "$$artifacts"

# A shared MLflow tracking server (README, "Scaling up"): runs and metrics in PostgreSQL (DB),
# artifacts proxied by the server to ARTIFACTS (a folder or s3://bucket/path), so clients
# need no storage of their own. Bound to 127.0.0.1 unless HOST says otherwise; ALLOWED_HOSTS
# are the names clients may reach it by (empty: MLflow's default, localhost and private IPs).
# No GenAI job runner: nothing here uses it, and it is one more process per server.
HOST ?= 127.0.0.1
PORT ?= 5000
WORKERS ?= 4
DB ?=
ARTIFACTS ?=
ALLOWED_HOSTS ?=
server: install
	@if [ -z "$(DB)" ] || [ -z "$(ARTIFACTS)" ]; then \
	  echo "error: make server needs DB=postgresql://user:password@host:5432/database" \
	    "and ARTIFACTS=<a folder or s3://bucket/path>" >&2; exit 2; fi
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --host '$(HOST)' --port '$(PORT)' \
	  --workers '$(WORKERS)' --backend-store-uri '$(DB)' --artifacts-destination '$(ARTIFACTS)' \
	  $(if $(ALLOWED_HOSTS),--allowed-hosts '$(ALLOWED_HOSTS)')

docs: install-dev  # refresh the README's pictures from real runs, in a temporary copy
	python docs/refresh.py

bench: install-dev  # measure everything BENCHMARKS.md reports (~15 min on 2 cores)
	python -m benchmarks.bench

lock:  # re-resolve requirements.in and requirements-dev.in into their .lock files
	rm -rf /tmp/llf-lock && $(PYTHON) -m venv /tmp/llf-lock
	/tmp/llf-lock/bin/pip install --quiet -r requirements.in
	{ echo "# Generated by \`make lock\` from requirements.in on Python 3.11, Linux x86_64. Do not edit."; \
	  /tmp/llf-lock/bin/pip freeze; } > requirements.lock
	/tmp/llf-lock/bin/pip install --quiet -r requirements-dev.in
	{ echo "# Generated by \`make lock\` from requirements-dev.in on Python 3.11, Linux x86_64. Do not edit."; \
	  /tmp/llf-lock/bin/pip freeze; } > requirements-dev.lock

clean:
	rm -rf $(VENV)
