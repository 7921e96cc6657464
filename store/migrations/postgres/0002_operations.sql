-- outboxhook schema, version 2 (PostgreSQL): production operations.

-- Static headers sent with every delivery of a subscription (a JSON object of
-- header name to value), and an optional rate limit in deliveries per second
-- (0: none).
ALTER TABLE webhook_subscriptions ADD COLUMN headers TEXT NOT NULL DEFAULT '{}';
ALTER TABLE webhook_subscriptions ADD COLUMN rate_limit DOUBLE PRECISION NOT NULL DEFAULT 0;

-- Endpoint health: failed deliveries since the last success, when that run of
-- failures began (NULL while healthy), and the last success.
ALTER TABLE webhook_subscriptions ADD COLUMN consecutive_failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE webhook_subscriptions ADD COLUMN failing_since BIGINT;
ALTER TABLE webhook_subscriptions ADD COLUMN last_success_at BIGINT;

-- Retention: finished deliveries by age, and expanded events by age. (IF NOT
-- EXISTS here and below: on a large database, create them CONCURRENTLY
-- beforehand, see the README.)
CREATE INDEX IF NOT EXISTS webhook_deliveries_finished ON webhook_deliveries (updated_at)
    WHERE state IN ('succeeded', 'dead', 'canceled');
CREATE INDEX IF NOT EXISTS webhook_outbox_expanded ON webhook_outbox (expanded_at)
    WHERE expanded_at IS NOT NULL;

-- Paused deliveries (of disabled subscriptions), found per subscription when
-- it is enabled again; only paused rows are in it.
CREATE INDEX IF NOT EXISTS webhook_deliveries_paused ON webhook_deliveries (subscription_id)
    WHERE state = 'paused';
