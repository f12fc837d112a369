# ragtune — `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
PYTEST_ARGS ?=
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/workloads
# The venv and the control-plane binaries live in version-keyed caches outside the repository.
venv = $$(bash hack/venv.sh)
k8s_bin = $$(bash hack/build-k8s.sh)

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-22s %s\n", $$1, $$2}'

.PHONY: venv
venv: ## Create the cached virtualenv (once per dependency set) and print its path
	@bash hack/venv.sh

.PHONY: k8s-bins
k8s-bins: ## Build the pinned Kubernetes 1.34 control plane, etcd and kwok (cached) and print their directory
	@bash hack/build-k8s.sh

.PHONY: cluster-up
cluster-up: ## Start the local control plane (etcd, apiserver, controller-manager, scheduler, kwok + 2 nodes)
	@bash hack/build-k8s.sh >/dev/null
	@$(PYTHON) hack/localcluster.py up

.PHONY: cluster-down
cluster-down: ## Stop the local control plane and remove its state
	@$(PYTHON) hack/localcluster.py down

.PHONY: cluster-kubeconfig
cluster-kubeconfig: ## Print the local control plane's kubeconfig path
	@$(PYTHON) hack/localcluster.py kubeconfig

.PHONY: manifests
manifests: ## Generate crds/ (and the chart's copy) from the pydantic models
	@$(venv)/bin/python -m ragtune.manifests write

.PHONY: verify
verify: ## Fail when generated files drift from the models
	@$(venv)/bin/python -m ragtune.manifests verify

.PHONY: test
test: ## Install everything needed and run the whole test suite
	@venv=$(venv); bin=$(k8s_bin); \
	RAGTUNE_K8S_BIN="$$bin" "$$venv/bin/python" -m pytest $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: ## Run the tests that need no cluster
	@"$(venv)/bin/python" -m pytest -m "not cluster" $(PYTEST_ARGS)

.PHONY: run
run: ## Run the operator against the current kubeconfig
	@"$(venv)/bin/python" -m ragtune run

.PHONY: clean
clean: ## Remove caches inside the repository (the venv and binary caches stay)
	@find . -name __pycache__ -type d -prune -exec rm -rf {} + ; rm -rf .pytest_cache
