//! outbox-relay: publishes a PostgreSQL transactional outbox table to Apache Kafka,
//! at-least-once, per-key order kept, never a rolled-back or lost row.
//!
//! # Layout
//! Dependencies point one way, down this list (nothing imports anything above it):
//! - [`app`]: `run`: start order, the loop, drain order; the monitor and cleanup tasks.
//! - [`relay`]: the loop (read, prepare, publish holding the lease, settle, set aside, record
//!   progress), its pacing and poison policy. Knows no read mode.
//! - [`settings`]: the validated settings `run` takes (the binary's CLI produces them).
//! - [`read`]: the read boundary: [`read::Reader`] (where committed rows come from) and
//!   [`read::Ledger`] (how progress is made durable); `claim` and `log` implement it.
//! - [`settle`]: each row's fate from its own delivery report; the only maker of
//!   [`settle::Delivered`].
//! - [`spans`]: W3C trace context: outbox-wait and publish spans, optional OTLP export.
//! - [`replica`]: this process's replica id and heartbeat row; how `status` lists replicas.
//! - [`lease`]: leadership: the lease row, its epoch, its state, the heartbeat channel.
//! - [`store`]: the table's shared statements, pool, migrate, LISTEN; [`store::errors`]: the
//!   one database-error policy (retry or fix, with the hint).
//! - [`kafka`]: the sink boundary ([`kafka::Sink`]) and the idempotent producer; the error
//!   classifier and the producer's properties beside it.
//! - [`event`]: a row and the Kafka message it becomes (validation, standard headers).
//! - [`table`]: the table's name (always quoted), its read modes and DDL.
//! - [`http`]: the `/metrics`, `/healthz` and `/readyz` server (hyper, axum's router).
//! - [`telemetry`]: metrics, health, logging. [`secret`]: redacted strings.
//! - Operator commands: [`doctor`] (preflight), [`admin`] (`status`, `failed ...`), [`adopt`]
//!   (publish an existing Debezium-style table). [`shutdown`]: signals to a cancellation token.

pub mod admin;
pub mod adopt;
pub mod app;
pub mod doctor;
pub mod event;
pub mod http;
pub mod kafka;
pub mod lease;
pub mod read;
pub mod relay;
pub mod replica;
pub mod secret;
pub mod settings;
pub mod settle;
pub mod shutdown;
pub mod spans;
pub mod store;
pub mod table;
pub mod telemetry;

pub use app::run;

/// Make ring the process-wide TLS provider, once, before any connection. Two providers are
/// compiled in (the replication crate's manifest enables rustls's aws-lc-rs beside the ring
/// that sqlx and the OTLP client use), and rustls then refuses to pick one for code that asks
/// for the default (sqlx's `sslmode=verify-ca` verifier does): it panics instead. Embedding
/// programs call this too; calling it again changes nothing.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Keep freed memory in the process instead of handing it back to the kernel after every
/// batch. glibc's default returns the free top of a heap once it passes 128 KiB (and raises
/// that bound only as large blocks come and go): the relay frees each batch and its delivery
/// reports as it goes, and the next batch faults the same pages in again (about two minor page
/// faults per event at 5,000 events/s; none with these bounds; figures and the command in
/// ARCHITECTURE.md, "Memory"). The relay's memory is bounded by its batch and in-flight bounds,
/// so keeping up to 8 MiB of free heap costs a few MiB of peak RSS. Blocks of 4 MiB or more
/// still come from and go back to the kernel. Operators who set glibc's own knobs
/// (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, `glibc.malloc.*` in `GLIBC_TUNABLES`)
/// keep theirs. Call it first thing in `main`.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |v| std::env::var_os(v).is_some();
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        if set("MALLOC_TRIM_THRESHOLD_")
            || set("MALLOC_MMAP_THRESHOLD_")
            || tunables.contains("glibc.malloc.")
        {
            return;
        }
        // SAFETY: mallopt takes no pointers and only sets the allocator's parameters (under
        // glibc's own arena lock); they apply to the allocations and frees after it.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        }
    }
}
