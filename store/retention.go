package store

import "fmt"

// RetentionQueries is the SQL of the retention cleaner, which deletes old
// delivery history in small batches, each in a short transaction of its own.
// On PostgreSQL every batch locks the rows it takes with FOR UPDATE SKIP
// LOCKED, so several cleaners (one per dispatcher) never wait for one another
// nor deadlock; on SQLite the transaction itself is exclusive.
type RetentionQueries struct {
	// SelectExpiredDeliveries returns the IDs, update times and whether
	// the row holds the first attempt (columns id, updated_at, inline) of
	// up to $4 finished deliveries to delete, oldest
	// first: succeeded and canceled ones last updated before $1, dead ones
	// last updated before $2 (which is never after $1), none updated
	// before $3. It reads the webhook_deliveries_finished index; $3 lets a
	// pass go on where its last batch stopped, so the dead deliveries it
	// keeps are read once per pass, not once per batch.
	SelectExpiredDeliveries string
	// DeleteDeliveryAttempts deletes the attempts of the deliveries in $1,
	// a JSON array of delivery IDs.
	DeleteDeliveryAttempts string
	// DeleteDeliveries deletes the deliveries in $1, a JSON array of IDs.
	DeleteDeliveries string
	// DeleteExpiredEvents deletes up to $2 events, oldest first, that were
	// expanded before $1 and have no delivery left. Unexpanded events, and
	// events with a delivery in any state, are never deleted.
	DeleteExpiredEvents string
}

// RetentionQueries returns the dialect's retention statements.
func (d Dialect) RetentionQueries() (RetentionQueries, error) {
	switch d {
	case SQLite:
		return RetentionQueries{
			SelectExpiredDeliveries: selectExpiredDeliveries,
			DeleteDeliveryAttempts:  fmt.Sprintf(deleteDeliveryAttempts, fmt.Sprintf(jsonArraySQLite, "$1")),
			DeleteDeliveries:        fmt.Sprintf(deleteDeliveries, fmt.Sprintf(jsonArraySQLite, "$1")),
			DeleteExpiredEvents:     fmt.Sprintf(deleteExpiredEvents, ""),
		}, nil
	case Postgres:
		return RetentionQueries{
			SelectExpiredDeliveries: selectExpiredDeliveries + "\nFOR UPDATE SKIP LOCKED",
			DeleteDeliveryAttempts:  fmt.Sprintf(deleteDeliveryAttempts, fmt.Sprintf(jsonArrayPostgres, "$1")),
			DeleteDeliveries:        fmt.Sprintf(deleteDeliveries, fmt.Sprintf(jsonArrayPostgres, "$1")),
			DeleteExpiredEvents:     fmt.Sprintf(deleteExpiredEvents, "\n    FOR UPDATE SKIP LOCKED"),
		}, nil
	}
	return RetentionQueries{}, fmt.Errorf("%w: %q", ErrUnknownDialect, string(d))
}

// selectExpiredDeliveries repeats the predicate of the
// webhook_deliveries_finished partial index word for word, so that both
// SQLite and PostgreSQL see the index applies.
const selectExpiredDeliveries = `SELECT id, updated_at, first_started_at IS NOT NULL AS inline
FROM webhook_deliveries
WHERE state IN ('succeeded', 'dead', 'canceled') AND updated_at < $1
  AND (state <> 'dead' OR updated_at < $2) AND updated_at >= $3
ORDER BY updated_at
LIMIT $4`

const deleteDeliveryAttempts = `DELETE FROM webhook_attempts WHERE delivery_id IN (%s)`

const deleteDeliveries = `DELETE FROM webhook_deliveries WHERE id IN (%s)`

// deleteExpiredEvents' verb is the row locking clause of the subselect. The
// NOT EXISTS reads the (event_id, subscription_id) unique index.
const deleteExpiredEvents = `DELETE FROM webhook_outbox WHERE seq IN (
    SELECT e.seq FROM webhook_outbox e
    WHERE e.expanded_at IS NOT NULL AND e.expanded_at < $1
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id)
    ORDER BY e.expanded_at
    LIMIT $2%s)`
