-- outbox-relay schema for public.outbox. Idempotent: safe to apply again.
CREATE SCHEMA IF NOT EXISTS "public";

CREATE TABLE IF NOT EXISTS "public"."outbox" (
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
ALTER TABLE "public"."outbox" ADD COLUMN IF NOT EXISTS xid xid8;
ALTER TABLE "public"."outbox" ALTER COLUMN xid SET DEFAULT pg_current_xact_id();

-- The relay (--read-mode claim) reads pending rows in id order through this small partial index.
CREATE INDEX IF NOT EXISTS "outbox_pending_idx" ON "public"."outbox" (id)
    WHERE published_at IS NULL AND failed_at IS NULL;
-- What an earlier release's --read-mode append (removed) added.
DROP INDEX IF EXISTS "public"."outbox_xid_idx";
DROP TRIGGER IF EXISTS "outbox_own_xid_insert" ON "public"."outbox";
DROP TRIGGER IF EXISTS "outbox_own_xid_update" ON "public"."outbox";
DROP FUNCTION IF EXISTS "public"."outbox_own_xid"();

-- Cleanup finds old published rows here; parked rows (and the keys they block) here.
CREATE INDEX IF NOT EXISTS "outbox_published_idx" ON "public"."outbox" (published_at)
    WHERE published_at IS NOT NULL;
-- Parked rows, by when they failed. Not by (topic, key): parking a row must never depend on
-- its contents fitting a btree entry (a key over ~2.7 KB would make the park fail).
CREATE INDEX IF NOT EXISTS "outbox_parked_idx" ON "public"."outbox" (failed_at)
    WHERE failed_at IS NOT NULL;
DROP INDEX IF EXISTS "public"."outbox_failed_idx";
-- An emitted event set aside (parked or dead-lettered) is one row, however often it is read.
ALTER TABLE "public"."outbox" ADD COLUMN IF NOT EXISTS emitted_lsn pg_lsn;
CREATE UNIQUE INDEX IF NOT EXISTS "outbox_emitted_idx" ON "public"."outbox" (emitted_lsn)
    WHERE emitted_lsn IS NOT NULL;

-- Leader election: the replica holding this lease publishes; the others stand by.
-- wake_wanted: the leader is idle and wants a NOTIFY on insert (see the notify function).
CREATE TABLE IF NOT EXISTS "public"."outbox_lease" (
    id          smallint PRIMARY KEY CHECK (id = 1),
    holder      text NOT NULL,
    epoch       bigint NOT NULL,
    expires_at  timestamptz NOT NULL,
    wake_wanted boolean NOT NULL DEFAULT true,
    cursor_xid  xid8,
    cursor_id   bigint
);
ALTER TABLE "public"."outbox_lease" ADD COLUMN IF NOT EXISTS wake_wanted boolean NOT NULL DEFAULT true;
-- cursor_xid, cursor_id: the last row an earlier release's --read-mode append published (set
-- to NULL when claim or log mode takes over, which marks the rows behind it published).
ALTER TABLE "public"."outbox_lease" ADD COLUMN IF NOT EXISTS cursor_xid xid8;
ALTER TABLE "public"."outbox_lease" ADD COLUMN IF NOT EXISTS cursor_id bigint;
-- read_mode: the mode the last leader published in (a switch is handed over, see ARCHITECTURE.md).
-- log_check_until: after a switch to log mode, stream rows committed before this position may
-- already be published (and marked) by the mode before: they are checked and skipped.
ALTER TABLE "public"."outbox_lease" ADD COLUMN IF NOT EXISTS read_mode text;
ALTER TABLE "public"."outbox_lease" ADD COLUMN IF NOT EXISTS log_check_until pg_lsn;
-- log_snapshot: taken when `migrate --read-mode log` created the slot: the rows visible in it
-- are the ones log mode publishes from the table when it takes over (the stream has the rest).
ALTER TABLE "public"."outbox_lease" ADD COLUMN IF NOT EXISTS log_snapshot text;

-- Every running replica heartbeats here on the lease cadence, so `outbox-relay status` can
-- list them and what each owns. Informational only: publishing never reads it. Rows of
-- replicas unseen for an hour are deleted by the others' heartbeats.
CREATE TABLE IF NOT EXISTS "public"."outbox_replicas" (
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
ALTER TABLE "public"."outbox" SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02
);

-- Convenience for JSON events: SELECT "public"."outbox_enqueue_json"('orders', 'order-42', '{"total": 10}');
-- Adds a content-type header (application/json) unless the given headers set one.
CREATE OR REPLACE FUNCTION "public"."outbox_enqueue_json"(topic text, key text, payload jsonb, headers jsonb DEFAULT NULL)
RETURNS bigint LANGUAGE sql AS $$
    INSERT INTO "public"."outbox" (topic, key, payload, headers)
    VALUES (topic, key, convert_to(payload::text, 'UTF8'),
            jsonb_build_object('content-type', 'application/json') || coalesce(headers, '{}'))
    RETURNING id
$$;

-- Wake-up hint for the relay (one notification per inserting statement, delivered at commit),
-- sent only while the leader is idle and asked for it: a notifying commit takes a
-- database-wide lock that serializes commits, so a busy relay polls on its own instead.
CREATE OR REPLACE FUNCTION "public"."outbox_notify"() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM "public"."outbox_lease" WHERE wake_wanted) THEN
        PERFORM pg_notify('outbox_relay.outbox', '');
    END IF;
    RETURN NULL;
END
$$;

DO $do$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = '"public"."outbox"'::regclass AND tgname = 'outbox_notify') THEN
        CREATE TRIGGER "outbox_notify" AFTER INSERT ON "public"."outbox"
            FOR EACH STATEMENT EXECUTE FUNCTION "public"."outbox_notify"();
    END IF;
END $do$;
