-- outboxhook schema, version 2 (SQLite).
-- Due deliveries are looked up per subscription from the index alone, so a
-- claim never scans the backlog of a subscription at its in-flight cap (a
-- hanging endpoint).
DROP INDEX webhook_deliveries_due_first;
DROP INDEX webhook_deliveries_due_retry;
CREATE INDEX webhook_deliveries_due_first ON webhook_deliveries (subscription_id, next_at, state, attempts)
    WHERE state IN ('pending', 'delivering') AND attempts = 0;
CREATE INDEX webhook_deliveries_due_retry ON webhook_deliveries (subscription_id, next_at, state, attempts)
    WHERE state IN ('pending', 'delivering') AND attempts > 0;
