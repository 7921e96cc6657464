package store

import (
	"fmt"
	"strings"
)

// OutboxLeaseQueries are the statements of direct expansion (see
// Queries.OutboxLease).
type OutboxLeaseQueries struct {
	// Select returns owner, until of the lease.
	Select string
	// Take takes or renews the lease unless another owner holds it: $1
	// owner, $2 until, $3 now. One row affected means it is held.
	Take string
	// Release ends the lease if $1 holds it.
	Release string
	// SelectEvents: $1 seq after which to read, $2 limit. Returns seq, id,
	// type, tenant, payload of unexpanded events, in seq order.
	SelectEvents string
	// InsertDeliveries returns the statement that inserts n deliveries made
	// or to be made, skipping those of deleted subscriptions and those that
	// exist already; a pending one of a disabled subscription goes in
	// paused. Parameters, per delivery in turn: id, event_id,
	// subscription_id, tenant, state, attempts, next_at, last_status,
	// last_error, created_at, updated_at, delivered_at (NULL unless
	// succeeded), then its first attempt (see migration 5): started_at
	// (NULL when it made none), duration_ms, response_body (its status
	// code and error are the delivery's last ones). (Rows bound as
	// parameters cost about a third of a JSON row set here; keep n to about
	// 50, as SQLite prepares long statements in more than linear time.)
	InsertDeliveries func(n int) string
	// SelectExisting returns which of the delivery IDs in the JSON array $1
	// exist.
	SelectExisting string
	// SubscriptionsVersion returns a number that changes, in the
	// transaction of the change, whenever a subscription that
	// SelectTenantSubscriptions would read is created, deleted or updated
	// (migration 6).
	SubscriptionsVersion string
}

// valuesInsert returns INSERT INTO head SELECT sel FROM (VALUES n rows of
// cols parameters) AS v tail, the parameters numbered row by row.
func valuesInsert(head, sel string, n, cols int, tail string) string {
	var b strings.Builder
	b.WriteString(head)
	b.WriteString("\nSELECT ")
	b.WriteString(sel)
	b.WriteString("\nFROM (VALUES ")
	for i := 0; i < n; i++ {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteByte('(')
		for c := 0; c < cols; c++ {
			if c > 0 {
				b.WriteString(", ")
			}
			fmt.Fprintf(&b, "$%d", i*cols+c+1)
		}
		b.WriteByte(')')
	}
	b.WriteString(") AS v")
	b.WriteString(tail)
	return b.String()
}

// insertMadeDeliveriesSQLite is OutboxLease.InsertDeliveries on SQLite (see
// insertDeliveries for WHERE TRUE).
func insertMadeDeliveriesSQLite(n int) string {
	return valuesInsert(`INSERT INTO webhook_deliveries
    (id, event_id, subscription_id, tenant, state, attempts, next_at, last_status, last_error,
     created_at, updated_at, delivered_at,
     first_started_at, first_duration_ms, first_status, first_error, first_response)`,
		`v.column1, v.column2, v.column3, v.column4,
       CASE WHEN v.column5 = 'pending' AND NOT s.enabled THEN 'paused' ELSE v.column5 END,
       v.column6, v.column7, v.column8, v.column9, v.column10, v.column11, v.column12,
       v.column13, v.column14, v.column8, v.column9, v.column15`,
		n, MadeDeliveryColumns, `
JOIN webhook_subscriptions s ON s.id = v.column3 WHERE TRUE
ON CONFLICT (event_id, subscription_id) DO NOTHING`)
}

// MadeDeliveryColumns is how many parameters OutboxLease.InsertDeliveries
// binds per delivery.
const MadeDeliveryColumns = 15

const selectUnexpandedAfter = `SELECT seq, id, type, tenant, payload FROM webhook_outbox
WHERE expanded_at IS NULL AND seq > $1 ORDER BY seq LIMIT $2`

// takeOutboxLease never moves its holder's lease back: a group commit that
// computed its renewal before waiting for the write lock must not shorten a
// renewal the loop wrote meanwhile.
const takeOutboxLease = `UPDATE webhook_outbox_lease
SET owner = $1, until = CASE WHEN owner = $1 AND until > $2 THEN until ELSE $2 END
WHERE id = 1 AND (owner = $1 OR until <= $3)`
