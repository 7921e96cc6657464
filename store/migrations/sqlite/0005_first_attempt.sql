-- outboxhook schema, version 5 (SQLite): a delivery's first attempt in its
-- own row.

-- Direct expansion (see webhook_outbox_lease) writes each delivery it made
-- once, in its final state, together with its first attempt. That attempt is
-- kept in these columns of the delivery row instead of a row of
-- webhook_attempts: one row written per delivery instead of two, which is a
-- quarter of what recording a delivery costs. first_started_at is NULL when
-- the delivery has no attempt here (every attempt of it is then in
-- webhook_attempts); later attempts are rows of webhook_attempts as before.
-- A delivery's attempt log is this attempt, if any, followed by its rows of
-- webhook_attempts in id order.
ALTER TABLE webhook_deliveries ADD COLUMN first_started_at INTEGER;
ALTER TABLE webhook_deliveries ADD COLUMN first_duration_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE webhook_deliveries ADD COLUMN first_status INTEGER NOT NULL DEFAULT 0;
ALTER TABLE webhook_deliveries ADD COLUMN first_error TEXT NOT NULL DEFAULT '';
ALTER TABLE webhook_deliveries ADD COLUMN first_response TEXT NOT NULL DEFAULT '';
