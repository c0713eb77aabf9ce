# Local workflow. Services (PostgreSQL + Kafka) run from scripts/, data in .local/.
SHELL := /bin/bash
.PHONY: deps services-up services-down services-status test lint demo clean-local

deps:
	scripts/services.sh deps

services-up:
	scripts/services.sh up

services-down:
	scripts/services.sh down

services-status:
	scripts/services.sh status

test: services-up
	export OUTBOX_TEST_DATABASE_URL="$$(scripts/pg.sh url)" OUTBOX_TEST_KAFKA_BROKERS="$$(scripts/kafka.sh url)"; \
	cargo test --locked -- --test-threads=4

lint: deps
	cargo fmt --check
	cargo clippy --all-targets --locked -- -D warnings

demo: services-up
	scripts/demo.sh

clean-local:
	-scripts/services.sh down
	rm -rf .local
