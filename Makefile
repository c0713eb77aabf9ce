# Local workflow. Services (PostgreSQL + Kafka) run from scripts/, data in .local/.
SHELL := /bin/bash
.PHONY: deps services-up services-down services-status test lint demo clean-local helm-check image-check

deps:
	scripts/services.sh deps

services-up:
	scripts/services.sh up

services-down:
	scripts/services.sh down

services-status:
	scripts/services.sh status

test: services-up
	export OUTBOX_TEST_DATABASE_URL="$$(scripts/pg.sh url)" OUTBOX_TEST_KAFKA_BROKERS="$$(scripts/kafka.sh url)" \
	  OUTBOX_TEST_KAFKA_SASL_BROKERS="$$(scripts/kafka.sh url-sasl)" OUTBOX_TEST_CERTS_DIR="$$(scripts/certs.sh dir)"; \
	cargo test --locked -- --test-threads=4
	scripts/helm-check.sh
	scripts/image-check.sh --profile dev

lint: deps
	cargo fmt --check
	cargo clippy --all-targets --locked -- -D warnings

# Helm chart: lint + tests on the rendered objects (builds helm into .local/bin once).
helm-check:
	scripts/helm-check.sh

# Container image without an engine: Dockerfile rules, ldd against the runtime base image, and
# a run in an image-like root filesystem (release binary, as the Dockerfile ships).
image-check:
	scripts/image-check.sh

demo: services-up
	scripts/demo.sh

clean-local:
	-scripts/services.sh down
	rm -rf .local

# Benchmarks (bench/): own PostgreSQL + Kafka instances on other ports. `bench` runs everything
# (about 80 minutes, Debezium included; printed at its start) and writes BENCHMARKS.md;
# `bench-smoke` runs each arm for seconds (CI).
.PHONY: bench bench-smoke
bench:
	bench/run.sh full
bench-smoke:
	bench/run.sh smoke

# `outbox-relay adopt` side by side with a real Debezium Server 3.0, byte for byte, on its own
# PostgreSQL + Kafka (bench/adopt-compare.sh; a few minutes, a JVM; not part of `test` or CI).
.PHONY: adopt-compare
adopt-compare:
	bench/adopt-compare.sh
