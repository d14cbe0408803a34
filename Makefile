# haven — build, test and try it out. `make test` is what CI runs (.ci/run).

GO ?= go

# Fuzz targets run briefly by `make test`, as package:FuzzFunc pairs; add one
# line per decoder. (go test -fuzz passes silently when a package has no
# matching target, so name the package that holds it.)
FUZZ_TARGETS = \
	./proto/wire/:FuzzDecode \
	./agent/:FuzzCopyTextRoundTrip
FUZZ_TIME ?= 10s

.PHONY: all build deps test fuzz demo bench generate lint

all: build

build:
	$(GO) build -o bin/haven ./cmd/haven

# Integration tests start real PostgreSQL clusters from the machine's
# initdb/pg_ctl; this installs the server if it is missing.
deps:
	scripts/ensure-postgres.sh

# -count=1: the e2e tests build the haven binary themselves, which go test's
# cache does not see, so a cached pass could hide a change.
test: deps
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 20m ./...
	$(MAKE) --no-print-directory fuzz

fuzz:
	@set -e; for target in $(FUZZ_TARGETS); do \
		pkg=$${target%%:*}; fn=$${target##*:}; \
		echo "$(GO) test -run='^$$' -fuzz='^$$fn\$$' -fuzztime=$(FUZZ_TIME) $$pkg"; \
		$(GO) test -run='^$$' -fuzz="^$$fn\$$" -fuzztime=$(FUZZ_TIME) $$pkg; \
	done

demo: deps
	$(GO) run ./demo

# Microbenchmarks of the hot paths (encoding, decoding, SQL generation), then
# failover RTO and switchover pause on real clusters (bench/failover), then
# haven against native logical replication with the CRM workload
# (bench/replication); results in bench/results/.
bench: deps
	$(GO) test -run='^$$' -bench=. -benchmem ./proto/wire/ ./replicator/
	$(GO) run ./bench/failover -runs 3
	$(GO) run ./bench/replication -runs 3

generate:
	$(GO) generate ./proto/...

lint:
	@unformatted=$$(gofmt -l .); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed on:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...
