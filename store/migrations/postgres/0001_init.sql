-- outboxhook schema, version 1 (PostgreSQL).
-- All *_at columns hold Unix time in milliseconds (UTC).

-- The transactional outbox: one row per published event, written by
-- webhooks.Publish inside the application's own transaction. The dispatcher
-- expands each row into one delivery per matching subscription and then sets
-- expanded_at. Dispatchers find unexpanded rows by that flag, never by an
-- "id > last seen" cursor: a transaction that took a lower seq may commit
-- after one that took a higher seq.
CREATE TABLE webhook_outbox (
    seq         BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          TEXT    NOT NULL UNIQUE,
    type        TEXT    NOT NULL,
    tenant      TEXT    NOT NULL DEFAULT '',
    payload     TEXT    NOT NULL,
    occurred_at BIGINT  NOT NULL,
    created_at  BIGINT  NOT NULL,
    expanded_at BIGINT
);
CREATE INDEX webhook_outbox_unexpanded ON webhook_outbox (seq) WHERE expanded_at IS NULL;

-- Wakes listening dispatchers when events commit (NOTIFY is delivered at
-- commit, and not at all on rollback), so Publish stays a plain INSERT.
CREATE FUNCTION webhook_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('webhook_outbox', ''); RETURN NULL; END $$;
CREATE TRIGGER webhook_outbox_notify AFTER INSERT ON webhook_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_outbox_notify();

-- Endpoints registered by tenants. event_types and secrets are JSON arrays.
CREATE TABLE webhook_subscriptions (
    id              TEXT    PRIMARY KEY,
    tenant          TEXT    NOT NULL DEFAULT '',
    url             TEXT    NOT NULL,
    event_types     TEXT    NOT NULL,
    secrets         TEXT    NOT NULL,
    description     TEXT    NOT NULL DEFAULT '',
    metadata        TEXT    NOT NULL DEFAULT '{}',
    enabled         BOOLEAN NOT NULL DEFAULT TRUE,
    disabled_reason TEXT    NOT NULL DEFAULT '',
    created_at      BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL
);
CREATE INDEX webhook_subscriptions_tenant ON webhook_subscriptions (tenant, enabled, id);

-- One row per (event, subscription): the unit of work the dispatcher claims
-- with FOR UPDATE SKIP LOCKED.
-- state: pending | delivering | succeeded | dead | canceled.
-- next_at is when it is next due; while delivering it is the lease expiry, so
-- a delivery whose dispatcher died becomes due again by itself.
CREATE TABLE webhook_deliveries (
    id              TEXT    PRIMARY KEY,
    event_id        TEXT    NOT NULL,
    subscription_id TEXT    NOT NULL,
    tenant          TEXT    NOT NULL DEFAULT '',
    state           TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_at         BIGINT  NOT NULL,
    claim_token     TEXT,
    last_status     INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT    NOT NULL DEFAULT '',
    created_at      BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL,
    delivered_at    BIGINT,
    UNIQUE (event_id, subscription_id)
);
CREATE INDEX webhook_deliveries_due_first ON webhook_deliveries (next_at)
    WHERE state IN ('pending', 'delivering') AND attempts = 0;
CREATE INDEX webhook_deliveries_due_retry ON webhook_deliveries (next_at)
    WHERE state IN ('pending', 'delivering') AND attempts > 0;
CREATE INDEX webhook_deliveries_subscription ON webhook_deliveries (subscription_id, id);

-- Every HTTP attempt of a delivery.
CREATE TABLE webhook_attempts (
    id            BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id   TEXT    NOT NULL,
    attempt       INTEGER NOT NULL,
    started_at    BIGINT  NOT NULL,
    duration_ms   BIGINT  NOT NULL,
    status_code   INTEGER NOT NULL DEFAULT 0,
    error         TEXT    NOT NULL DEFAULT '',
    response_body TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, attempt);
