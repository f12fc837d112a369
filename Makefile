# ragtune — `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
PYTEST_ARGS ?=
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/workloads
# Models come from the project's own packages and fixtures; nothing is fetched from a hub at run time.
export HF_HUB_OFFLINE := 1
# milvus-lite's gRPC core logs keep-alive chatter at exit, after the test summary; its errors still raise.
export GRPC_VERBOSITY := NONE
# The venv and the control-plane binaries live in version-keyed caches outside the repository.
venv = $$(bash hack/venv.sh)
k8s_bin = $$(bash hack/build-k8s.sh)

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-22s %s\n", $$1, $$2}'

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

.PHONY: images
images: ## Build the operator and workload images (BASE_IMAGE=…; offline from a local wheelhouse by default)
	@bash hack/images.sh

.PHONY: images-gpu
images-gpu: ## Build the NVIDIA images finetune-gpu and serve-gpu (several GB each; GPU_BASE_IMAGE=…)
	@IMAGES="finetune-gpu serve-gpu" bash hack/images.sh

.PHONY: kind-up
kind-up: ## Start Docker if needed, build the offline kind node image (cached) and create the kind cluster
	@bash hack/kind/cluster.sh up

.PHONY: kind-down
kind-down: ## Delete the kind cluster and stop the Docker engine if kind-up started it
	@bash hack/kind/cluster.sh down

.PHONY: kind-kubeconfig
kind-kubeconfig: ## Print the kind cluster's kubeconfig
	@bash hack/kind/cluster.sh kubeconfig

.PHONY: manifests
manifests: ## Generate crds/ (and the chart's copy) from the pydantic models
	@$(venv)/bin/python -m ragtune.manifests write

.PHONY: verify
verify: ## Fail when generated files drift from the models
	@$(venv)/bin/python -m ragtune.manifests verify

.PHONY: test
test: ## Install everything needed and run the test suite: unit, control plane, kind e2e (Docker, root)
	@venv=$(venv); bin=$(k8s_bin); \
	RAGTUNE_K8S_BIN="$$bin" "$$venv/bin/python" -m pytest tests e2e $(PYTEST_ARGS)

.PHONY: test-e2e
test-e2e: ## Run only the e2e tests on the kind cluster (created, images built and loaded as needed)
	@venv=$(venv); "$$venv/bin/python" -m pytest e2e $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: ## Run the tests that need no cluster
	@"$(venv)/bin/python" -m pytest -m "not cluster" $(PYTEST_ARGS)

.PHONY: run
run: ## Run the operator against the current kubeconfig (make manifests; kubectl apply -f crds/ first)
	@"$(venv)/bin/python" -m ragtune run

.PHONY: rbac
rbac: ## Print the operator's ClusterRole (least privilege, from ragtune.rbac)
	@"$(venv)/bin/python" -m ragtune.rbac

.PHONY: demo
demo: ## The main job on kind (cluster, images, chart, samples): fine-tune, index, serve, ask; prints answer + sources
	@venv=$(venv); "$$venv/bin/python" hack/demo_kind.py

.PHONY: demo-local
demo-local: ## The same job as plain processes (no cluster): each workload program as its pod runs it
	@venv=$(venv); "$$venv/bin/python" hack/demo.py

BENCH_ARGS ?= --quick
.PHONY: bench bench-operator bench-index bench-finetune bench-serve bench-generate
bench: bench-operator bench-index bench-finetune bench-serve bench-generate ## Run every benchmark (BENCH_ARGS=--quick by default)
bench-operator: ## Operator: apply→Job latency, reconcile time, RSS vs direct API writes
	@venv=$(venv); bin=$(k8s_bin); RAGTUNE_K8S_BIN="$$bin" "$$venv/bin/python" bench/operator.py $(BENCH_ARGS)
bench-index: ## Indexing: ragtune vs the LlamaIndex + Chroma stack vs raw encode
	@"$(venv)/bin/python" -m bench.index $(BENCH_ARGS)
bench-finetune: ## Fine-tuning: tokens/s and peak RSS (unsloth/trl ratio on a GPU)
	@"$(venv)/bin/python" -m bench.finetune $(BENCH_ARGS)
bench-serve: ## Serving: latency and throughput at 1/4/16 clients vs the FastAPI + LlamaIndex server
	@"$(venv)/bin/python" -m bench.serve $(BENCH_ARGS)
bench-generate: ## Generation: vLLM engine with a LoRA adapter vs HF generate, tokens/s (target on a GPU)
	@"$(venv)/bin/python" -m bench.generate $(BENCH_ARGS)

.PHONY: clean
clean: ## Remove caches inside the repository (the venv and binary caches stay)
	@find . -name __pycache__ -type d -prune -exec rm -rf {} + ; rm -rf .pytest_cache
