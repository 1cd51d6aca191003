# edgeproxy: `make` builds bin/edgeproxy; see README.md for the rest.
GO ?= go
BPF_CLANG ?= clang-14
BPF_CFLAGS ?= -O2 -g -Wall -Werror -mcpu=v3
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
BIN := bin/edgeproxy

.PHONY: all build generate vmlinux test test-unit test-integration demo demo-stop bench lint geoip-update clean

all: build

build: $(BIN)

$(BIN): $(shell find . -name '*.go' -not -path './.git/*') loader/proxy_bpfel.o go.mod go.sum
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $@ ./cmd/edgeproxy

generate:
	cd loader && BPF_CLANG="$(BPF_CLANG)" BPF_CFLAGS="$(BPF_CFLAGS)" $(GO) generate ./...

vmlinux:
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > vmlinux.h

clean:
	rm -rf bin
