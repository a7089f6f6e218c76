# lazyoci — the README's two commands: `make demo` and `make test`.
# Both are idempotent: system packages and the virtualenv are installed once.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := docker-registry skopeo umoci runc flatbuffers-compiler pigz zstd stargz-snapshotter \
	fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv apache2-utils \
	mmdebstrap iproute2 util-linux busybox-static strace buildah podman \
	containerd golang-github-containerd-containerd-dev

.PHONY: deps lint test test-fast demo bench fuzz clean

# System packages: apt-get update first (a fresh machine has no lists).
# Depends on the Makefile so that a package added to APT_PACKAGES gets installed.
.stamp-apt: Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@modprobe fuse 2>/dev/null || true
	@touch $@

$(VENV)/.installed: pyproject.toml .stamp-apt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# containerd's gRPC API as Python modules (build output, not committed): generated from the .proto
# files of golang-github-containerd-containerd-dev by grpcio-tools (a build-time tool only).
CONTAINERD_API := src/lazyoci/containerd/api/__init__.py
$(CONTAINERD_API): tools/containerd_api.py $(VENV)/.installed
	$(PY) -m pip install -q 'grpcio-tools>=1.60'
	$(PY) tools/containerd_api.py

deps: $(VENV)/.installed $(CONTAINERD_API)

# The library's types (mypy, configured in pyproject.toml); make test runs it first.
lint: deps
	$(PY) -m mypy

# The whole suite. Tests that need root skip themselves (with the reason) for other users.
test: lint
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The suite without the tests marked `slow` (over 20 s on two shared cores, or fuzzing for a set time);
# the same as `make test PYTEST_ARGS='-m "not slow"'`.
test-fast: deps
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

# The parsers' fuzz targets for longer (FUZZ_SECONDS each, default 10 min), keeping the corpus
# in .fuzz-corpus/ so that coverage grows from run to run; crashes fail the run with a reproducer.
FUZZ_SECONDS ?= 600
fuzz: deps
	LAZYOCI_FUZZ_SECONDS=$(FUZZ_SECONDS) LAZYOCI_FUZZ_CORPUS=$(CURDIR)/.fuzz-corpus \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_hardening_fuzz.py -k survives $(PYTEST_ARGS)

demo: deps
	$(PY) demo/demo.py

# (bench/run_bench.py compiles the package's bytecode before it times anything: bench/precompile.py)
bench: deps
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run_bench.py --fresh-fs

clean:
	rm -rf $(VENV) .stamp-apt build src/*.egg-info
