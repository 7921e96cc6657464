package store

import "fmt"

// Subscription statements that also read and write the operations columns
// (migration sqlite/0003, postgres/0002): headers, rate_limit and the
// endpoint health columns consecutive_failures, failing_since and
// last_success_at. The health columns are written by the dispatcher only;
// these statements read them, and UpdateSubscriptionFull resets them when a
// subscription is enabled again.
const (
	subscriptionColumnsFull = subscriptionColumns + `,
       headers, rate_limit, consecutive_failures, failing_since, last_success_at`

	// InsertSubscriptionFull: the columns of subscriptionColumns in order,
	// then $12 headers (a JSON object), $13 rate_limit.
	InsertSubscriptionFull = `INSERT INTO webhook_subscriptions (` + subscriptionColumns + `, headers, rate_limit)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)`

	// SelectSubscriptionFull: $1 tenant, $2 id.
	SelectSubscriptionFull = `SELECT ` + subscriptionColumnsFull + ` FROM webhook_subscriptions
WHERE tenant = $1 AND id = $2`

	// ListSubscriptionsFull: $1 tenant, $2 cursor (exclusive; '' for the
	// first page), $3 limit.
	ListSubscriptionsFull = `SELECT ` + subscriptionColumnsFull + ` FROM webhook_subscriptions
WHERE tenant = $1 AND id > $2 ORDER BY id LIMIT $3`

	// UpdateSubscriptionFull: $1 url, $2 event_types, $3 secrets,
	// $4 description, $5 metadata, $6 enabled, $7 disabled_reason,
	// $8 headers, $9 rate_limit, $10 updated_at, $11 tenant, $12 id.
	// Enabling a disabled subscription resets its health (no consecutive
	// failures, not failing), so that the health check does not disable it
	// again at once; other updates leave the health columns to the
	// dispatcher.
	UpdateSubscriptionFull = `UPDATE webhook_subscriptions
SET url = $1, event_types = $2, secrets = $3, description = $4, metadata = $5,
    enabled = $6, disabled_reason = $7, headers = $8, rate_limit = $9, updated_at = $10,
    consecutive_failures = CASE WHEN $6 AND NOT enabled THEN 0 ELSE consecutive_failures END,
    failing_since = CASE WHEN $6 AND NOT enabled THEN NULL ELSE failing_since END
WHERE tenant = $11 AND id = $12`

	// SelectReplayBatch returns the IDs of the next deliveries a replay
	// queues again, in ID order: $1 subscription_id, $2 tenant, $3 cursor
	// (exclusive; '' to start), $4 created_at lower bound (inclusive),
	// $5 created_at upper bound (exclusive), $6 whether succeeded
	// deliveries are included, $7 limit. Dead deliveries and pending ones
	// that already failed (attempts > 0) are always included.
	SelectReplayBatch = `SELECT id FROM webhook_deliveries
WHERE subscription_id = $1 AND tenant = $2 AND id > $3 AND created_at >= $4 AND created_at < $5
  AND (state = 'dead' OR (state = 'succeeded' AND $6) OR (state = 'pending' AND attempts > 0))
ORDER BY id LIMIT $7`

	// SelectEventDeliveries returns the IDs of an event's deliveries to
	// subscriptions that still exist: $1 tenant, $2 event_id,
	// $3 subscription_id ('' for every subscription).
	SelectEventDeliveries = `SELECT d.id FROM webhook_deliveries d
JOIN webhook_subscriptions s ON s.id = d.subscription_id
WHERE d.tenant = $1 AND d.event_id = $2 AND ($3 = '' OR d.subscription_id = $3)
ORDER BY d.id`

	// SelectAttemptLog returns a delivery's attempts in the order they were
	// recorded, which stays chronological when a replay numbers attempts
	// from 1 again: the first attempt kept in the delivery row (migration
	// 5), if any, then its rows of webhook_attempts. $1 delivery_id.
	SelectAttemptLog = `SELECT attempt, started_at, duration_ms, status_code, error, response_body FROM (
    SELECT 0 AS ord, 1 AS attempt, first_started_at AS started_at, first_duration_ms AS duration_ms,
           first_status AS status_code, first_error AS error, first_response AS response_body
    FROM webhook_deliveries WHERE id = $1 AND first_started_at IS NOT NULL
    UNION ALL
    SELECT id, attempt, started_at, duration_ms, status_code, error, response_body
    FROM webhook_attempts WHERE delivery_id = $1
) AS a ORDER BY ord`
)

// requeueDeliveries' verbs: the pendingOrPaused expression (a disabled
// subscription's deliveries stay paused), the expansion of the JSON array of
// IDs ($6).
const requeueDeliveries = `UPDATE webhook_deliveries
SET state = %s, next_at = $1, updated_at = $1, claim_token = NULL,
    attempts = CASE WHEN $2 THEN 0 ELSE attempts END
WHERE (state = 'dead' OR (state = 'succeeded' AND $3) OR (state IN ('pending', 'paused') AND attempts > 0 AND $4))
  AND tenant = $5 AND id IN (%s)
  AND EXISTS (SELECT 1 FROM webhook_subscriptions s WHERE s.id = webhook_deliveries.subscription_id)
  AND EXISTS (SELECT 1 FROM webhook_outbox e WHERE e.id = webhook_deliveries.event_id)`

// OpsQueries is the dialect-specific SQL of the subscription operations
// (headers, rate limit, health, replay).
type OpsQueries struct {
	// SelectSubscriptionForUpdate is SelectSubscriptionFull, locking the
	// row for a read-modify-write.
	SelectSubscriptionForUpdate string
	// RequeueDeliveries makes deliveries due again, keeping their attempt
	// log: state pending, next_at now, no claim. Only dead deliveries,
	// succeeded ones when $3 is true and pending ones that already failed
	// when $4 is true are changed, and only while their subscription and
	// event exist (a deleted subscription's deliveries are never queued
	// again). Parameters: $1 now (next_at and updated_at), $2 whether the
	// attempt count restarts from 0 (a fresh retry schedule), $3 include
	// succeeded, $4 include failing pending, $5 tenant, $6 JSON array of
	// delivery IDs.
	RequeueDeliveries string
}

// OpsQueries returns the dialect's operations statements.
func (d Dialect) OpsQueries() (OpsQueries, error) {
	switch d {
	case SQLite:
		return OpsQueries{
			SelectSubscriptionForUpdate: SelectSubscriptionFull,
			RequeueDeliveries:           fmt.Sprintf(requeueDeliveries, SQLite.PendingOrPaused(), fmt.Sprintf(jsonArraySQLite, "$6")),
		}, nil
	case Postgres:
		return OpsQueries{
			SelectSubscriptionForUpdate: SelectSubscriptionFull + "\nFOR UPDATE",
			RequeueDeliveries:           fmt.Sprintf(requeueDeliveries, Postgres.PendingOrPaused(), fmt.Sprintf(jsonArrayPostgres, "$6")),
		}, nil
	}
	return OpsQueries{}, fmt.Errorf("%w: %q", ErrUnknownDialect, string(d))
}
