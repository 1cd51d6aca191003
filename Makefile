# edgeproxy. `make` builds bin/edgeproxy. The README's two commands:
#   sudo make demo   build, sample routing.db, three echo backends, edgeproxy on :8080
#   sudo make test   unit tests and the privileged integration tests
GO ?= go
BPF_CLANG ?= clang-14
BPF_CFLAGS ?= -O2 -g -Wall -Werror -mcpu=v3
# -dirty only for changes outside docs/: `make bench` rewrites docs/ before it
# builds, and documentation does not change the binary.
VERSION ?= $(shell git describe --always 2>/dev/null || echo dev)$(shell git status --porcelain --untracked-files=no -- . ':!docs' 2>/dev/null | grep -q . && echo -dirty)
BIN := bin/edgeproxy
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
TEST_TIMEOUT ?= 20m

.PHONY: all build generate generate-check vmlinux deps test test-unit fuzz demo bench lint geoip-update install clean

all: build

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/edgeproxy

# Regenerates loader/proxy_bpfel.{go,o} from bpf/ (needs clang-14 and
# libbpf headers); the outputs are committed so `go build` needs no clang.
generate:
	cd loader && BPF_CLANG="$(BPF_CLANG)" BPF_CFLAGS="$(BPF_CFLAGS)" $(GO) generate ./...

# Fails when the committed BPF objects do not match bpf/.
generate-check: generate
	git diff --exit-code -- loader/ || { echo "loader/ is stale: run 'make generate' and commit its output" >&2; exit 1; }

vmlinux:
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > vmlinux.h

# What the tests and the demo need on a fresh Debian/Ubuntu host.
deps:
	@bash scripts/deps.sh

test: deps
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...
	bash scripts/fuzz.sh

# Every fuzz target for FUZZ_TIME each (make test runs them for 8 s).
fuzz:
	bash scripts/fuzz.sh

test-unit:
	$(GO) test -count=1 ./routing/ ./loader/ ./userspace/ ./overlay/ ./fleet/ ./cmd/...

demo: deps build
	bash scripts/demo.sh

# Routing decision benchmarks first (no root), then the netns side by side;
# the report includes both.
bench: build
	bash scripts/bench-routing.sh
	bash scripts/bench.sh

# gofmt, a tidy go.mod, vet, staticcheck and the import boundaries of DESIGN.md.
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	@$(GO) mod tidy -diff || { echo "go.mod/go.sum are not tidy: run 'go mod tidy' and commit the result" >&2; exit 1; }
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...
	bash scripts/check-boundaries.sh

geoip-update:
	bash scripts/geoip-update.sh

PREFIX ?= /usr/local
DESTDIR ?=

# Binary, systemd unit, example environment file and the service user.
install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/edgeproxy
	install -D -m 0644 packaging/edgeproxy.service $(DESTDIR)/etc/systemd/system/edgeproxy.service
	@if [ -e $(DESTDIR)/etc/edgeproxy/edgeproxy.env ]; then \
		echo "keeping $(DESTDIR)/etc/edgeproxy/edgeproxy.env; the new example is edgeproxy.env.example"; \
		install -D -m 0644 packaging/edgeproxy.env $(DESTDIR)/etc/edgeproxy/edgeproxy.env.example; \
	else install -D -m 0644 packaging/edgeproxy.env $(DESTDIR)/etc/edgeproxy/edgeproxy.env; fi
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/doc/edgeproxy docs/*.md README.md NOTICE
	@if [ -z "$(DESTDIR)" ] && ! id edgeproxy >/dev/null 2>&1; then \
		useradd --system --no-create-home --home-dir /var/lib/edgeproxy --shell /usr/sbin/nologin edgeproxy; \
		echo "created system user edgeproxy"; fi
	@if [ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; start with: systemctl enable --now edgeproxy"

clean:
	rm -rf bin
