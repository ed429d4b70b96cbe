# kiln — two commands on a fresh Debian machine:
#   make run    install what is missing, build, start kiln serve, build examples/hello through it
#   make test   the whole test suite (what CI runs)

SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
export GOFLAGS ?= -mod=mod

KILN_ADDR ?= 127.0.0.1:7070
KILN_DATA ?= ./kiln-data
APT_PACKAGES := runc skopeo e2fsprogs erofs-utils busybox-static ca-certificates util-linux qemu-system-x86 qemu-user-static linux-image-amd64 curl postgresql openssh-client

.PHONY: run test test-slow build deps generate bench clean bin/kiln builder-image

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@command -v go >/dev/null || { echo "Go is missing: install Go 1.26 at /usr/local/go"; exit 1; }
	@# Emulated arm64 and arm for the process runtime (and its tests): what
	@# qemu-user-static's package does on a host with systemd. As root only,
	@# only what is missing; a host that cannot (a container) still builds
	@# its own platform.
	@if [ "$$(id -u)" = 0 ]; then \
		b=/proc/sys/fs/binfmt_misc; \
		[ -e $$b/register ] || mount -t binfmt_misc binfmt_misc $$b || echo "warning: cannot mount binfmt_misc; the process runtime builds linux/amd64 only"; \
		for a in aarch64 arm; do \
			[ ! -e $$b/register ] || [ -e $$b/qemu-$$a ] || { echo "registering /usr/lib/binfmt.d/qemu-$$a.conf with binfmt_misc"; \
				grep -v '^#' /usr/lib/binfmt.d/qemu-$$a.conf > $$b/register || echo "warning: could not register qemu-$$a"; }; \
		done; \
	fi

build: deps bin/kiln bin/buildkitd builder-image

# The builder VM image (kernel, initramfs, erofs root with kiln-agent,
# buildkitd and runc) that kiln serve --runtime auto boots builds in and
# kiln run boots images with. Identical inputs give identical bytes, so a
# rebuild with nothing changed only checks and keeps it.
builder-image: bin/kiln bin/buildkitd
	bin/kiln builder-image build --data "$(KILN_DATA)"

bin/kiln:
	go build -o bin/kiln ./cmd/kiln

# buildkitd is built from the BuildKit Go module pinned in go.mod (a tool
# directive), so nothing is downloaded outside the Go module proxy. It is
# static and built with exactly the flags internal/builderimage uses for
# the builder VM, so the host and the guest share one compile (it is the
# slowest step of a fresh build).
bin/buildkitd: go.mod go.sum
	CGO_ENABLED=0 GOOS=linux GOARCH=amd64 go build -trimpath -buildvcs=false -ldflags="-s -w -buildid=" -o bin/buildkitd github.com/moby/buildkit/cmd/buildkitd

# A static arm64 busybox for the multi-platform tests (testkit.BusyboxArm64):
# Debian's busybox-static for arm64, unpacked here, never installed.
bin/busybox-arm64:
	@dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
	apt-get update -qq
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
		(cd "$$tmp" && apt-get download -qq -o APT::Sandbox::User=root busybox-static:arm64) && \
		dpkg-deb -x "$$tmp"/busybox-static_*_arm64.deb "$$tmp/root" && \
		mkdir -p bin && install -m 0755 "$$tmp/root/bin/busybox" $@.tmp && mv $@.tmp $@

generate:
	go test ./internal/config -run TestConfigurationDocIsCurrent -update >/dev/null
	cd api && go generate .

# The fast tier first: the core's own tests, which need no buildkitd, VM
# or skopeo (a scripted runtime at the runtime seam, whose real sides the
# rest test), so a broken core fails in seconds. Then everything else, one
# package at a time: the VM tests boot TCG guests with two vCPUs each,
# and several packages doing so at once on a 2-core machine starve them
# (guest soft lockups, timeouts) for little wall time saved. PostgreSQL
# (installed by deps) is required, not skipped when missing.
FAST_PKGS := internal/builds internal/server internal/store internal/errdefs internal/cachevol internal/auth \
	internal/access internal/config internal/cli internal/dockerconfig cmd/kiln
export KILN_REQUIRE_POSTGRES := 1

test: build bin/busybox-arm64
	go vet ./...
	go test -count=1 -timeout 10m $(addprefix ./,$(FAST_PKGS))
	go test -p 1 -count=1 -timeout 25m $$(go list ./... | grep -v -x $(foreach p,$(FAST_PKGS),-e github.com/kiln-build/kiln/$(p)))

# Tests too slow for every CI run (a 2+ GiB image built in a 512 MiB VM
# under TCG takes many minutes).
test-slow: build
	KILN_SLOW_TESTS=1 go test -count=1 -timeout 60m -run 'TestImageLargerThanVMMemory' ./internal/runtime/vm/

bench: build
	go test -run '^$$' -bench . -benchtime 3x -timeout 60m ./test/ ./internal/microvm/ ./internal/runtime/vm/ ./internal/buildcontext/ ./internal/registry/ ./internal/builds/ ./internal/store/

run: build
	@scripts/run-example.sh "$(KILN_ADDR)" "$(KILN_DATA)"

clean:
	rm -rf bin
