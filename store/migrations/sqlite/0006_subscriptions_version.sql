-- outboxhook schema, version 6 (SQLite): a version number of the
-- subscriptions.

-- Direct expansion keeps the subscriptions it read in memory and reads them
-- again only once this number has changed: every change that expansion could
-- see (a subscription created or deleted, or one of the columns it reads
-- updated) adds one to it, in the transaction of the change. Health
-- bookkeeping (consecutive_failures, failing_since, last_success_at) leaves it
-- alone.
CREATE TABLE webhook_subscriptions_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL DEFAULT 0
);
INSERT INTO webhook_subscriptions_version (id) VALUES (1);

CREATE TRIGGER webhook_subscriptions_inserted AFTER INSERT ON webhook_subscriptions
BEGIN UPDATE webhook_subscriptions_version SET version = version + 1 WHERE id = 1; END;

CREATE TRIGGER webhook_subscriptions_deleted AFTER DELETE ON webhook_subscriptions
BEGIN UPDATE webhook_subscriptions_version SET version = version + 1 WHERE id = 1; END;

CREATE TRIGGER webhook_subscriptions_updated
AFTER UPDATE OF tenant, url, event_types, secrets, headers, rate_limit, enabled ON webhook_subscriptions
BEGIN UPDATE webhook_subscriptions_version SET version = version + 1 WHERE id = 1; END;
