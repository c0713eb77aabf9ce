//! The outbox table: its name (schema-qualified, always quoted) and its DDL.
//!
//! The DDL is generated here for any `--table`; `migrations/0001_outbox.sql` is exactly
//! what it generates for the default table `public.outbox` (a unit test keeps the two
//! equal), so teams with their own migration tool can apply that file instead.

use std::fmt;

/// How the relay finds the rows to publish; the table's read index depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadMode {
    /// Read pending rows by state in id order and mark (or delete) each one once Kafka has
    /// acknowledged it. Per-key order is id order; a late commit with a lower id is still read.
    Claim,
    /// Read the table's inserts (and events emitted with the table's emit function) from a
    /// logical replication slot, in commit order: per-key order is commit order for every
    /// transaction shape; no write per event, no polling. Needs `wal_level = logical`, a role
    /// with REPLICATION, and `migrate --read-mode log` (publication and slot).
    Log,
}

impl ReadMode {
    /// The flag value: `claim` or `log`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadMode::Claim => "claim",
            ReadMode::Log => "log",
        }
    }

    /// Parse `--read-mode`. `append`, a mode of earlier releases, is refused with the way out.
    pub fn parse(s: &str) -> Result<ReadMode, String> {
        match s.to_ascii_lowercase().as_str() {
            "claim" => Ok(ReadMode::Claim),
            "log" => Ok(ReadMode::Log),
            "append" => Err(APPEND_REMOVED.into()),
            _ => Err("use claim or log".into()),
        }
    }
}

/// Why `--read-mode append` is refused, and what to run instead.
pub const APPEND_REMOVED: &str = "append mode was removed: it ordered a key's events by the \
     writing transaction's first write, not its commit, so transactions that lock an aggregate \
     before inserting its event were published out of per-key commit order. Its write-free \
     successor is --read-mode log (run `outbox-relay migrate --read-mode log` first); claim mode \
     needs `outbox-relay migrate`. Either takes over from append mode's cursor: nothing is \
     published twice, nothing is lost (README: \"Upgrading from append mode\")";

/// A validated, schema-qualified table name. Both parts are quoted wherever SQL is built.
#[derive(Clone, PartialEq, Eq)]
pub struct TableName {
    schema: String,
    table: String,
}

impl fmt::Debug for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// Quote an identifier for PostgreSQL: wrap in double quotes, double any embedded quote.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quote a string literal for PostgreSQL (only used in DDL; queries bind parameters).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

impl TableName {
    /// Parse `table` or `schema.table`. Names are taken literally (case-sensitive) and quoted.
    pub fn parse(s: &str) -> Result<TableName, String> {
        let (schema, table) = match s.split_once('.') {
            Some((schema, table)) => (schema, table),
            None => ("public", s),
        };
        for part in [schema, table] {
            if part.is_empty() || part.contains('.') {
                return Err(format!("{s:?} is not `table` or `schema.table`"));
            }
            // Derived names (index, trigger, function) add up to 15 bytes to the table name.
            if part.len() > 48 {
                return Err(format!("{part:?} is longer than 48 bytes"));
            }
            if part.chars().any(|c| c.is_control() || c == '$') {
                return Err(format!("{part:?} contains '$' or a control character"));
            }
        }
        Ok(TableName {
            schema: schema.to_string(),
            table: table.to_string(),
        })
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The quoted, qualified name for use in SQL: `"schema"."table"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }

    /// A quoted object name derived from the table, in the same schema.
    fn derived(&self, suffix: &str) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.schema),
            quote_ident(&format!("{}_{suffix}", self.table))
        )
    }

    /// The quoted name of the one-row leader-lease table that goes with this table.
    pub fn lease_table(&self) -> String {
        self.derived("lease")
    }

    /// The quoted name of the table where each running replica heartbeats (`status` lists it).
    pub fn replicas_table(&self) -> String {
        self.derived("replicas")
    }

    /// The LISTEN/NOTIFY channel for this table.
    pub fn channel(&self) -> String {
        format!("outbox_relay.{}", self.table)
    }

    /// An advisory-lock key for this table (stable across processes and versions).
    pub fn lock_key(&self) -> i64 {
        // FNV-1a over "schema.table": stable, no dependency, no collisions in practice.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in self.to_string().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
        h as i64
    }

    /// The index `mode` reads through, schema-qualified and quoted (for `to_regclass`). Log
    /// mode reads the WAL, not the table: its "index" is the primary key (rows by id, for
    /// `failed` and cleanup).
    pub fn read_index(&self, mode: ReadMode) -> String {
        let suffix = match mode {
            ReadMode::Claim => "pending_idx",
            ReadMode::Log => "pkey",
        };
        format!(
            "{}.{}",
            quote_ident(&self.schema),
            quote_ident(&format!("{}_{suffix}", self.table))
        )
    }

    /// The quoted name of the function that emits an event into the WAL (log mode).
    pub fn emit_function(&self) -> String {
        self.derived("emit")
    }

    /// The prefix of this table's emitted messages.
    pub fn message_prefix(&self) -> String {
        format!("{}{self}", MESSAGE_PREFIX)
    }

    /// `pg_logical_emit_message` of one event in the form the relay decodes (`read::log`):
    /// JSON metadata, 0x00, the payload. The arguments are SQL expressions; `id` is the row a
    /// re-emitted event stands for (`failed retry`), `None` for a new event (its id: its LSN).
    pub fn emit_message_sql(
        &self,
        id: Option<&str>,
        [topic, key, payload, headers]: [&str; 4],
    ) -> String {
        let prefix = quote_literal(&self.message_prefix());
        let id = id.map(|id| format!("'id', {id}, ")).unwrap_or_default();
        format!(
            "pg_logical_emit_message(true, {prefix},\n\
             \x20       convert_to(jsonb_build_object('v', 1, {id}'topic', {topic}, 'key', {key}, 'headers', {headers},\n\
             \x20                                     'null_payload', {payload} IS NULL)::text, 'UTF8')\n\
             \x20       || '\\x00'::bytea || coalesce({payload}, '\\x'::bytea))"
        )
    }

    /// Log mode's objects besides the table: the publication of the table's inserts and the
    /// emit function. Idempotent. (The slot is created by `migrate` after this commits: a slot
    /// must not start before its publication exists.)
    pub fn log_ddl(&self, publication: &str) -> String {
        let t = self.quoted();
        let emit = self.emit_function();
        let message = self.emit_message_sql(None, ["topic", "key", "payload", "headers"]);
        let pubname = quote_literal(publication);
        let pub_ident = quote_ident(publication);
        format!(
            r#"-- --read-mode log: the relay reads this table's inserts from the WAL through this publication.
DO $do$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {pubname}) THEN
        CREATE PUBLICATION {pub_ident} FOR TABLE {t} WITH (publish = 'insert');
    END IF;
END $do$;

-- An event with no row (log mode only): written into the WAL inside the calling transaction and
-- published at its commit, in commit order with the table's rows. Returns the event's LSN, which
-- is its event id (header outbox-event-id: lsn-<hex>/<hex>). Nothing to vacuum or clean up.
--   SELECT {emit}('orders', 'order-42', convert_to('{{"total": 10}}', 'UTF8'), '{{"type": "created"}}');
CREATE OR REPLACE FUNCTION {emit}(topic text, key text, payload bytea, headers jsonb DEFAULT NULL)
RETURNS pg_lsn LANGUAGE sql VOLATILE AS $fn$
    SELECT {message}
$fn$;
"#
        )
    }

    /// The DDL that creates (or upgrades) this outbox table, with the read index `mode` needs
    /// (and without the other mode's). Idempotent.
    pub fn ddl(&self, notify_trigger: bool, mode: ReadMode) -> String {
        let t = self.quoted();
        let pending_idx = quote_ident(&format!("{}_pending_idx", self.table));
        let published_idx = quote_ident(&format!("{}_published_idx", self.table));
        let failed_idx = quote_ident(&format!("{}_failed_idx", self.table));
        let parked_idx = quote_ident(&format!("{}_parked_idx", self.table));
        let emitted_idx = quote_ident(&format!("{}_emitted_idx", self.table));
        let drop_append = format!(
            "-- What an earlier release's --read-mode append (removed) added.\n\
             DROP INDEX IF EXISTS {schema}.{xid_idx};\n\
             DROP TRIGGER IF EXISTS {xid_insert} ON {t};\n\
             DROP TRIGGER IF EXISTS {xid_update} ON {t};\n\
             DROP FUNCTION IF EXISTS {xid_fn}();\n",
            schema = quote_ident(&self.schema),
            xid_idx = quote_ident(&format!("{}_xid_idx", self.table)),
            xid_fn = self.derived("own_xid"),
            xid_insert = quote_ident(&format!("{}_own_xid_insert", self.table)),
            xid_update = quote_ident(&format!("{}_own_xid_update", self.table)),
        );
        let notify_fn = self.derived("notify");
        let lease = self.lease_table();
        let replicas = self.replicas_table();
        let trigger = quote_ident(&format!("{}_notify", self.table));
        let enqueue_fn = self.derived("enqueue_json");
        let channel = quote_literal(&self.channel());
        let mut sql = format!(
            r#"-- outbox-relay schema for {self}. Idempotent: safe to apply again.
CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE IF NOT EXISTS {t} (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        text NOT NULL,
    key          text,
    payload      bytea,
    headers      jsonb,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The writing transaction (claim and log mode's hand-overs use it).
    xid          xid8 DEFAULT pg_current_xact_id(),
    -- Written by the relay only:
    published_at timestamptz,
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    failed_at    timestamptz,
    -- Log mode: the emitted event (no row of its own) this row stands for, set aside.
    emitted_lsn  pg_lsn
);

-- Tables created before the xid column: added without a table rewrite; older rows keep NULL.
ALTER TABLE {t} ADD COLUMN IF NOT EXISTS xid xid8;
ALTER TABLE {t} ALTER COLUMN xid SET DEFAULT pg_current_xact_id();

{read_index}
-- Cleanup finds old published rows here; parked rows (and the keys they block) here.
CREATE INDEX IF NOT EXISTS {published_idx} ON {t} (published_at)
    WHERE published_at IS NOT NULL;
-- Parked rows, by when they failed. Not by (topic, key): parking a row must never depend on
-- its contents fitting a btree entry (a key over ~2.7 KB would make the park fail).
CREATE INDEX IF NOT EXISTS {parked_idx} ON {t} (failed_at)
    WHERE failed_at IS NOT NULL;
DROP INDEX IF EXISTS {schema}.{failed_idx};
-- An emitted event set aside (parked or dead-lettered) is one row, however often it is read.
ALTER TABLE {t} ADD COLUMN IF NOT EXISTS emitted_lsn pg_lsn;
CREATE UNIQUE INDEX IF NOT EXISTS {emitted_idx} ON {t} (emitted_lsn)
    WHERE emitted_lsn IS NOT NULL;

-- Leader election: the replica holding this lease publishes; the others stand by.
-- wake_wanted: the leader is idle and wants a NOTIFY on insert (see the notify function).
CREATE TABLE IF NOT EXISTS {lease} (
    id          smallint PRIMARY KEY CHECK (id = 1),
    holder      text NOT NULL,
    epoch       bigint NOT NULL,
    expires_at  timestamptz NOT NULL,
    wake_wanted boolean NOT NULL DEFAULT true,
    cursor_xid  xid8,
    cursor_id   bigint
);
ALTER TABLE {lease} ADD COLUMN IF NOT EXISTS wake_wanted boolean NOT NULL DEFAULT true;
-- cursor_xid, cursor_id: the last row an earlier release's --read-mode append published (set
-- to NULL when claim or log mode takes over, which marks the rows behind it published).
ALTER TABLE {lease} ADD COLUMN IF NOT EXISTS cursor_xid xid8;
ALTER TABLE {lease} ADD COLUMN IF NOT EXISTS cursor_id bigint;
-- read_mode: the mode the last leader published in (a switch is handed over, see ARCHITECTURE.md).
-- log_check_until: after a switch to log mode, stream rows committed before this position may
-- already be published (and marked) by the mode before: they are checked and skipped.
ALTER TABLE {lease} ADD COLUMN IF NOT EXISTS read_mode text;
ALTER TABLE {lease} ADD COLUMN IF NOT EXISTS log_check_until pg_lsn;
-- log_snapshot: taken when `migrate --read-mode log` created the slot: the rows visible in it
-- are the ones log mode publishes from the table when it takes over (the stream has the rest).
ALTER TABLE {lease} ADD COLUMN IF NOT EXISTS log_snapshot text;

-- Every running replica heartbeats here on the lease cadence, so `outbox-relay status` can
-- list them and what each owns. Informational only: publishing never reads it. Rows of
-- replicas unseen for an hour are deleted by the others' heartbeats.
CREATE TABLE IF NOT EXISTS {replicas} (
    holder        text PRIMARY KEY,
    host          text NOT NULL,
    pid           bigint NOT NULL,
    version       text NOT NULL,
    lease_seconds float8 NOT NULL,
    started_at    timestamptz NOT NULL,
    last_seen     timestamptz NOT NULL,
    epoch         bigint,
    leader_since  timestamptz,
    stopped_at    timestamptz
);

-- Queue table: vacuum early so dead tuples from marking never pile up.
ALTER TABLE {t} SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02
);

-- Convenience for JSON events: SELECT {enqueue_fn}('orders', 'order-42', '{{"total": 10}}');
-- Adds a content-type header (application/json) unless the given headers set one.
CREATE OR REPLACE FUNCTION {enqueue_fn}(topic text, key text, payload jsonb, headers jsonb DEFAULT NULL)
RETURNS bigint LANGUAGE sql AS $$
    INSERT INTO {t} (topic, key, payload, headers)
    VALUES (topic, key, convert_to(payload::text, 'UTF8'),
            jsonb_build_object('content-type', 'application/json') || coalesce(headers, '{{}}'))
    RETURNING id
$$;

-- Wake-up hint for the relay (one notification per inserting statement, delivered at commit),
-- sent only while the leader is idle and asked for it: a notifying commit takes a
-- database-wide lock that serializes commits, so a busy relay polls on its own instead.
CREATE OR REPLACE FUNCTION {notify_fn}() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM {lease} WHERE wake_wanted) THEN
        PERFORM pg_notify({channel}, '');
    END IF;
    RETURN NULL;
END
$$;

"#,
            schema = quote_ident(&self.schema),
            read_index = match mode {
                ReadMode::Claim => format!(
                    "-- The relay (--read-mode claim) reads pending rows in id order through this small partial index.\n\
                     CREATE INDEX IF NOT EXISTS {pending_idx} ON {t} (id)\n    WHERE published_at IS NULL AND failed_at IS NULL;\n\
                     {drop_append}"
                ),
                ReadMode::Log => format!(
                    "-- The relay (--read-mode log) reads inserts from the WAL: no read index (rows are never marked,\n\
                     -- so a pending-rows index would hold every row).\n\
                     DROP INDEX IF EXISTS {schema}.{pending_idx};\n\
                     {drop_append}",
                    schema = quote_ident(&self.schema),
                ),
            },
        );
        let trigger_name = quote_literal(&format!("{}_notify", self.table));
        let regclass = quote_literal(&t);
        if notify_trigger {
            sql.push_str(&format!(
                r#"DO $do$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = {regclass}::regclass AND tgname = {trigger_name}) THEN
        CREATE TRIGGER {trigger} AFTER INSERT ON {t}
            FOR EACH STATEMENT EXECUTE FUNCTION {notify_fn}();
    END IF;
END $do$;
"#
            ));
        } else {
            sql.push_str(&format!(
                "-- No NOTIFY trigger: the relay polls only (no commit-time notify lock).\nDROP TRIGGER IF EXISTS {trigger} ON {t};\n"
            ));
        }
        sql
    }
}

/// What an emitted event's message prefix starts with; the table name follows (`schema.table`).
pub const MESSAGE_PREFIX: &str = "outbox-relay:";

/// The replication slot and publication of log mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogNames {
    pub slot: String,
    pub publication: String,
}

impl LogNames {
    /// Checked names; either defaults to [`default_name`].
    pub fn new(
        table: &TableName,
        slot: Option<&str>,
        publication: Option<&str>,
    ) -> Result<LogNames, String> {
        let slot = slot.map_or_else(|| default_name(table), str::to_string);
        let publication = publication.map_or_else(|| default_name(table), str::to_string);
        check_name("--slot", &slot)?;
        check_name("--publication", &publication)?;
        Ok(LogNames { slot, publication })
    }
}

/// Slot and publication names go into replication commands unquoted: lower-case letters,
/// digits and `_`, at most 63 bytes.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} must be 1-63 characters of a-z, 0-9 and _"
        ))
    }
}

/// The default slot and publication name for a table: `outbox_relay_<schema>_<table>`,
/// lower-cased, other characters as `_`, cut to 63 bytes.
pub fn default_name(table: &TableName) -> String {
    let raw = format!("outbox_relay_{}_{}", table.schema(), table.table());
    raw.chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .take(63)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_quotes_names() {
        let t = TableName::parse("outbox").unwrap();
        assert_eq!(t.quoted(), r#""public"."outbox""#);
        let t = TableName::parse("Events.My\"Box").unwrap();
        assert_eq!(t.quoted(), r#""Events"."My""Box""#);
        assert!(TableName::parse("").is_err());
        assert!(TableName::parse("a.").is_err());
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse(&"x".repeat(49)).is_err());
        assert!(TableName::parse("bad\nname").is_err());
        assert!(
            TableName::parse("a$$b").is_err(),
            "would end a dollar-quoted body"
        );
    }

    #[test]
    fn hostile_names_stay_inside_quotes() {
        let t = TableName::parse("x\"; DROP TABLE users; --").unwrap();
        let ddl = t.ddl(true, ReadMode::Claim);
        assert!(ddl.contains(r#""public"."x""; DROP TABLE users; --""#));
        assert!(ddl.contains(
            r#"CREATE TABLE IF NOT EXISTS "public"."x""; DROP TABLE users; --_replicas""#
        ));
        let t = TableName::parse("o'box").unwrap();
        assert!(t
            .ddl(true, ReadMode::Claim)
            .contains("pg_notify('outbox_relay.o''box', '')"));
    }

    #[test]
    fn lock_key_is_stable_and_distinct() {
        let a = TableName::parse("outbox").unwrap();
        assert_eq!(
            a.lock_key(),
            TableName::parse("public.outbox").unwrap().lock_key()
        );
        assert_ne!(
            a.lock_key(),
            TableName::parse("other.outbox").unwrap().lock_key()
        );
    }

    #[test]
    fn migration_file_matches_generated_ddl() {
        let file = include_str!("../migrations/0001_outbox.sql");
        let generated = TableName::parse("outbox")
            .unwrap()
            .ddl(true, ReadMode::Claim);
        assert_eq!(
            file, generated,
            "migrations/0001_outbox.sql is stale: regenerate it with `outbox-relay migrate --print-sql`"
        );
    }
}
