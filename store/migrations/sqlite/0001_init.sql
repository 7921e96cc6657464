-- outboxhook schema, version 1 (SQLite).
-- All *_at columns hold Unix time in milliseconds (UTC).

-- The transactional outbox: one row per published event, written by
-- webhooks.Publish inside the application's own transaction. The dispatcher
-- expands each row into one delivery per matching subscription and then sets
-- expanded_at.
CREATE TABLE webhook_outbox (
    seq         INTEGER PRIMARY KEY,
    id          TEXT    NOT NULL UNIQUE,
    type        TEXT    NOT NULL,
    tenant      TEXT    NOT NULL DEFAULT '',
    payload     TEXT    NOT NULL,
    occurred_at INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    expanded_at INTEGER
);
CREATE INDEX webhook_outbox_unexpanded ON webhook_outbox (seq) WHERE expanded_at IS NULL;

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
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX webhook_subscriptions_tenant ON webhook_subscriptions (tenant, enabled, id);

-- One row per (event, subscription): the unit of work the dispatcher claims.
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
    next_at         INTEGER NOT NULL,
    claim_token     TEXT,
    last_status     INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT    NOT NULL DEFAULT '',
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    delivered_at    INTEGER,
    UNIQUE (event_id, subscription_id)
);
CREATE INDEX webhook_deliveries_due_first ON webhook_deliveries (next_at)
    WHERE state IN ('pending', 'delivering') AND attempts = 0;
CREATE INDEX webhook_deliveries_due_retry ON webhook_deliveries (next_at)
    WHERE state IN ('pending', 'delivering') AND attempts > 0;
CREATE INDEX webhook_deliveries_subscription ON webhook_deliveries (subscription_id, id);

-- Every HTTP attempt of a delivery.
CREATE TABLE webhook_attempts (
    id            INTEGER PRIMARY KEY,
    delivery_id   TEXT    NOT NULL,
    attempt       INTEGER NOT NULL,
    started_at    INTEGER NOT NULL,
    duration_ms   INTEGER NOT NULL,
    status_code   INTEGER NOT NULL DEFAULT 0,
    error         TEXT    NOT NULL DEFAULT '',
    response_body TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, attempt);
