-- outboxhook schema, version 3 (PostgreSQL): a delivery's first attempt in its
-- own row.

-- On SQLite, direct expansion keeps the first attempt of a delivery it made
-- in these columns instead of a row of webhook_attempts (one row written per
-- delivery instead of two). The PostgreSQL dispatcher records every attempt
-- as a row of webhook_attempts and leaves first_started_at NULL; the columns
-- exist here too so that both dialects read a delivery's attempt log with the
-- same statement: this attempt, if any, then its rows of webhook_attempts in
-- id order. Adding columns with constant defaults rewrites no rows.
ALTER TABLE webhook_deliveries ADD COLUMN first_started_at BIGINT;
ALTER TABLE webhook_deliveries ADD COLUMN first_duration_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE webhook_deliveries ADD COLUMN first_status INTEGER NOT NULL DEFAULT 0;
ALTER TABLE webhook_deliveries ADD COLUMN first_error TEXT NOT NULL DEFAULT '';
ALTER TABLE webhook_deliveries ADD COLUMN first_response TEXT NOT NULL DEFAULT '';
