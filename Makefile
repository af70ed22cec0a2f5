# loopkit: build, test, lint, bench, demo, install.
# `make test` and `make demo` need root; `make test-unit` does not.

SHELL := /bin/bash
# pipefail: a `go test -json | testsummary` pass fails when go test does.
.SHELLFLAGS := -o pipefail -c
# Go 1.26 from /usr/local/go (where go.dev's tarball installs) wins over an
# older distribution Go on PATH.
export PATH := $(if $(wildcard /usr/local/go/bin/go),/usr/local/go/bin:)$(PATH):$(CURDIR)/bin/tools

GO       ?= go
PREFIX   ?= /usr/local
DESTDIR  ?=
BINDIR   := $(DESTDIR)$(PREFIX)/bin
LIBEXEC  := $(DESTDIR)$(PREFIX)/libexec

VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT   ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
LDFLAGS  := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)

STATICCHECK_VERSION ?= v0.8.2
CRICTL_VERSION      ?= v1.37.0
CONTAINERD2_VERSION ?= v2.4.2
TOOLS               := $(CURDIR)/bin/tools
# containerd 2.x (containerd, ctr, containerd-shim-runc-v2) built from the
# module proxy, one directory per version so a bump rebuilds and an old build
# is reused. Tests find it through LOOPKIT_CONTAINERD2_DIR.
CONTAINERD2_DIR     := $(TOOLS)/containerd-$(CONTAINERD2_VERSION:v%=%)
export LOOPKIT_CONTAINERD2_DIR := $(CONTAINERD2_DIR)

# Extra flags for every `go test` (for example GOTESTFLAGS=-v).
GOTESTFLAGS ?=
# Debian packages the tests use; `make test` installs the missing ones
# without starting their services (scripts/test-setup.sh). gcc and
# libc6-dev: the race-detector pass needs cgo.
TEST_PACKAGES ?= containerd runc podman e2fsprogs erofs-utils squashfs-tools xfsprogs btrfs-progs fdisk \
	dosfstools util-linux mount busybox-static udev kmod jq systemd gcc libc6-dev
# Under `make test` a test whose tool is missing fails, naming the tool and
# how to install it; `make test-unit` and plain `go test` skip instead.
TEST_REQUIRE := LOOPKIT_TEST_REQUIRE=1
# Every `make test` pass runs `go test -json` through testsummary: go test's
# usual lines, then each skip with its reason and one line
# "PASS: N ran, N skipped, N passed, N failed".
SUMMARY     := $(CURDIR)/bin/testsummary
summary      = $(SUMMARY) $(if $(filter -v,$(GOTESTFLAGS)),-v) -pass
# Tests of pkg/loopdev re-run with systemd-udevd running, and their env
# (LOOPKIT_TEST_SCALE=1: the scaled stress run, 32 goroutines x 20 + 4 procs).
LOOPDEV_STRESS_RUN ?= TestR01_|TestR19|HeavyDuty|Stress
LOOPDEV_STRESS_ENV ?= LOOPKIT_TEST_SCALE=1
# pkg/loopdev is its own Go module: `go test ./...` at the root does not
# enter it, so every target runs go in both (go -C pkg/loopdev).
LOOPDEV_MOD := pkg/loopdev
# Benchmark knobs: bench/loopbench flags.
BENCH_FLAGS ?= -workers 1,8,32 -n 512 -rounds 3
BENCH_TIME  ?= 200x

.PHONY: all build test test-setup test-unit bench bench-loop bench-hook bench-snapshotter bench-containerd demo lint install tools clean

all: build

build:
	@mkdir -p bin
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/ ./cmd/...

# Everything, as root: vet; all packages with the integration tag, one
# package at a time (a test that unshares a mount namespace copies the other
# packages' mounts and pins their devices); the loopdev suite on the legacy
# (LOOP_SET_FD) path; the allocation and heavy-duty tests under the race
# detector; the scaled stress run (32 goroutines x 20 iterations plus 4
# processes) without and then with systemd-udevd probing every device; then
# the whole loopdev suite again with systemd-udevd probing every device
# (stress scaled), and while another process loops losetup on its own files.
# Stops at the first failing step; each pass ends with its summary line
# (skips with their reasons, then "N ran, N skipped, N passed, N failed").
test: require-root test-setup tools $(SUMMARY)
	$(GO) vet -tags integration ./...
	$(GO) vet -C $(LOOPDEV_MOD) -tags integration ./...
	$(TEST_REQUIRE) $(GO) test -json $(GOTESTFLAGS) -p 1 -tags integration -count=1 -timeout 60m ./... | $(summary) integration
	$(TEST_REQUIRE) $(GO) test -C $(LOOPDEV_MOD) -json $(GOTESTFLAGS) -p 1 -tags integration -count=1 -timeout 30m ./... | $(summary) loopdev
	$(TEST_REQUIRE) LOOPKIT_TEST_FORCE_LEGACY=1 $(GO) test -C $(LOOPDEV_MOD) -json $(GOTESTFLAGS) -count=1 -timeout 20m ./... | $(summary) loopdev-legacy
	$(TEST_REQUIRE) $(GO) test -C $(LOOPDEV_MOD) -json $(GOTESTFLAGS) -race -count=1 -timeout 20m -run 'TestR01_|TestR19|TestR22|TestAuditMethodsRace' . | $(summary) loopdev-race
	$(TEST_REQUIRE) $(LOOPDEV_STRESS_ENV) $(GO) test -C $(LOOPDEV_MOD) -json $(GOTESTFLAGS) -count=1 -timeout 20m -run '$(LOOPDEV_STRESS_RUN)' . | $(summary) loopdev-stress
	scripts/with-udevd.sh env $(TEST_REQUIRE) LOOPKIT_TEST_UDEV=1 $(LOOPDEV_STRESS_ENV) $(GO) test -C $(LOOPDEV_MOD) -json $(GOTESTFLAGS) -count=1 -timeout 30m ./... | $(summary) loopdev-udevd
	scripts/with-losetup-churn.sh env $(TEST_REQUIRE) $(GO) test -C $(LOOPDEV_MOD) -json $(GOTESTFLAGS) -count=1 -timeout 30m ./... | $(summary) loopdev-losetup-churn

# Packages, Go modules, no daemon left running by the install.
test-setup: require-root
	scripts/test-setup.sh $(TEST_PACKAGES)

$(SUMMARY): internal/testsummary/main.go
	@mkdir -p bin
	$(GO) build -o $@ ./internal/testsummary

test-unit:
	$(GO) test $(GOTESTFLAGS) -short -count=1 ./...
	$(GO) test -C $(LOOPDEV_MOD) $(GOTESTFLAGS) -short -count=1 ./...

# Benchmarks: markdown reports on stdout, progress on stderr. `make bench`
# runs them all; BENCHMARKS.md records their output.
bench: bench-loop bench-hook bench-snapshotter bench-containerd

# Loop attach+detach side by side (loopkit, containerd, losetup) without and
# with systemd-udevd, then the in-package Go benchmarks.
# The systemd row drives Debian 12's libsystemd-shared-252.so (package
# systemd) from a small C harness; the loopctl row runs bin/loopctl.
SYSTEMD_SHARED ?= /usr/lib/x86_64-linux-gnu/systemd/libsystemd-shared-252.so
bench-loop: require-root build
	@mkdir -p bin
	@[ -e $(SYSTEMD_SHARED) ] || scripts/apt-install.sh systemd
	@command -v cc >/dev/null || scripts/apt-install.sh gcc libc6-dev
	cc -O2 -Wall -o bin/sdloop bench/loopbench/sdloop/sdloop.c $(SYSTEMD_SHARED) -Wl,-rpath,$(dir $(SYSTEMD_SHARED))
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/loopbench ./bench/loopbench
	bin/loopbench $(BENCH_FLAGS)
	scripts/with-udevd.sh bin/loopbench $(BENCH_FLAGS)
	$(GO) test -run '^$$' -bench . -benchtime $(BENCH_TIME) ./pkg/...
	$(GO) test -C $(LOOPDEV_MOD) -run '^$$' -bench . -benchtime $(BENCH_TIME) ./...

# oci-loop-hook latency under runc, state directory on tmpfs and on disk.
bench-hook: require-root build
	$(GO) build -o bin/hookbench ./bench/hookbench
	bin/hookbench -hook bin/oci-loop-hook -n 50 -work /dev/shm
	bin/hookbench -hook bin/oci-loop-hook -n 50 -work /tmp

# loop-snapshotter against overlayfs and blockfile on ext4 and XFS.
bench-snapshotter: require-root build
	$(GO) build -o bin/snapbench ./bench/snapbench
	bin/snapbench -fs ext4,xfs

# `ctr run --rm` on containerd 2.x: loop (each mode) against containerd's
# overlayfs, erofs and blockfile, same image, interleaved.
CTR_BENCH_RUNS ?= 40
bench-containerd: require-root tools
	$(GO) test -tags integration -count=1 -run '^$$' -bench BenchmarkContainerdRunRm -benchtime $(CTR_BENCH_RUNS)x -v ./integration

demo: require-root
	scripts/demo.sh

lint: $(TOOLS)/staticcheck
	@unformatted="$$(gofmt -l .)"; \
	if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet -tags integration ./...
	$(GO) vet -C $(LOOPDEV_MOD) -tags integration ./...
	$(TOOLS)/staticcheck -tags integration ./...
	cd $(LOOPDEV_MOD) && $(TOOLS)/staticcheck -tags integration ./...
	@if command -v shellcheck >/dev/null; then \
		echo shellcheck -x .ci/run scripts/*.sh scripts/demo.d/*.sh; \
		shellcheck -x .ci/run scripts/*.sh scripts/demo.d/*.sh; \
	else echo "shellcheck not installed; shell scripts not checked (apt-get install shellcheck)"; fi

tools: $(TOOLS)/staticcheck $(TOOLS)/crictl $(CONTAINERD2_DIR)/containerd-shim-runc-v2

# Tags and flags as in containerd's own Makefile; CGO off, so no libseccomp
# or libbtrfs headers are needed. The shim is built last (and without gRPC):
# its presence marks a complete build.
CONTAINERD2_PKG := github.com/containerd/containerd/v2
CONTAINERD2_LD  := -s -w -X $(CONTAINERD2_PKG)/version.Version=$(CONTAINERD2_VERSION) -X $(CONTAINERD2_PKG)/version.Package=$(CONTAINERD2_PKG)
$(CONTAINERD2_DIR)/containerd-shim-runc-v2:
	@mkdir -p $(CONTAINERD2_DIR)
	GOBIN=$(CONTAINERD2_DIR) CGO_ENABLED=0 $(GO) install -trimpath \
		-tags 'urfave_cli_no_docs no_btrfs no_devmapper no_zfs' -ldflags '$(CONTAINERD2_LD)' \
		$(CONTAINERD2_PKG)/cmd/containerd@$(CONTAINERD2_VERSION) $(CONTAINERD2_PKG)/cmd/ctr@$(CONTAINERD2_VERSION)
	GOBIN=$(CONTAINERD2_DIR) CGO_ENABLED=0 $(GO) install -trimpath \
		-tags 'urfave_cli_no_docs no_btrfs no_devmapper no_zfs no_grpc' -ldflags '$(CONTAINERD2_LD)' \
		$(CONTAINERD2_PKG)/cmd/containerd-shim-runc-v2@$(CONTAINERD2_VERSION)

$(TOOLS)/staticcheck:
	GOBIN=$(TOOLS) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

$(TOOLS)/crictl:
	GOBIN=$(TOOLS) $(GO) install sigs.k8s.io/cri-tools/cmd/crictl@$(CRICTL_VERSION)

# The hook lives at $(PREFIX)/libexec/oci-loop-hook, the path hooks.d names.
install: build
	install -d $(BINDIR) $(LIBEXEC)
	@for b in bin/*; do \
		[ -f "$$b" ] || continue; \
		case "$$(basename $$b)" in \
		oci-loop-hook) t=$(LIBEXEC)/oci-loop-hook ;; \
		*bench) continue ;; \
		*) t=$(BINDIR)/ ;; \
		esac; \
		echo install -m 0755 $$b $$t; install -m 0755 $$b $$t; \
	done
	scripts/install-contrib.sh contrib "$(DESTDIR)"

clean:
	rm -rf bin _output

.PHONY: require-root
require-root:
	@if [ "$$(id -u)" != 0 ]; then echo "this target needs root (try: make test-unit)" >&2; exit 1; fi
