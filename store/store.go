// Package store holds the SQL of outboxhook: the schema migrations and the
// queries the webhooks package runs, one set per database dialect.
//
// Nothing here opens connections or imports a driver; the webhooks package
// executes these statements on the *sql.DB it is given. Teams that manage
// their schema with their own migration tool can copy the statements returned
// by [Dialect.Migrations] (or the files under store/migrations/) and skip
// webhooks.Migrate.
//
// Every statement uses $1..$n placeholders, numbered in the order they first
// appear: go-sqlite3 binds $N parameters by position of first appearance, so
// numbers out of order would bind the wrong values.
package store

import (
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"
)

// Dialect names a supported SQL dialect.
type Dialect string

// The supported dialects.
const (
	SQLite   Dialect = "sqlite"
	Postgres Dialect = "postgres"
)

// ErrUnknownDialect is returned for a dialect this package has no SQL for.
var ErrUnknownDialect = errors.New("store: unknown SQL dialect")

//go:embed migrations
var migrationFiles embed.FS

// Migration is one versioned schema change.
type Migration struct {
	Version int    // 1, 2, ...: applied in increasing order
	Name    string // file name, e.g. "0001_init.sql"
	SQL     string // statements separated by semicolons
}

// Migrations returns the dialect's schema migrations in version order.
func (d Dialect) Migrations() ([]Migration, error) {
	dir := path.Join("migrations", string(d))
	entries, err := fs.ReadDir(migrationFiles, dir)
	if err != nil {
		return nil, fmt.Errorf("%w: %q", ErrUnknownDialect, string(d))
	}
	var out []Migration
	for _, e := range entries {
		name := e.Name()
		if !strings.HasSuffix(name, ".sql") {
			continue
		}
		prefix, _, _ := strings.Cut(name, "_")
		v, err := strconv.Atoi(prefix)
		if err != nil {
			return nil, fmt.Errorf("store: migration %s has no numeric version prefix", name)
		}
		b, err := fs.ReadFile(migrationFiles, path.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("store: read migration %s: %w", name, err)
		}
		out = append(out, Migration{Version: v, Name: name, SQL: string(b)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Version < out[j].Version })
	return out, nil
}

// InsertEvent is the one statement webhooks.Publish runs: it adds an event to
// the outbox unless an event with the same ID exists. It is identical in every
// dialect, so publishing needs no dialect knowledge.
//
// Parameters: id, type, tenant, payload, occurred_at, created_at.
const InsertEvent = `INSERT INTO webhook_outbox (id, type, tenant, payload, occurred_at, created_at)
VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING`

// Queries is the dialect-specific SQL the dispatcher and the subscription
// store run. Statements that are the same in every dialect are constants of
// this package instead.
type Queries struct {
	// LockMigrations runs first in the migration transaction and serializes
	// concurrent migrators. Empty when the transaction itself is exclusive.
	LockMigrations string
	// SelectUnexpanded: $1 limit. Returns seq, id, type, tenant, payload.
	SelectUnexpanded string
	// InsertDeliveries inserts many deliveries in one statement (a delivery
	// for an event and subscription that exists already is skipped): $1
	// JSON array of
	// objects with the keys id, event_id, subscription_id, tenant, state,
	// next_at, claim_token (null when not claimed) and at (the time now).
	InsertDeliveries string
	// MarkExpandedBatch: $1 expanded_at, $2 JSON array of event seqs.
	MarkExpandedBatch string
	// RecordDeliveries stores the outcome of many attempts in one statement,
	// each only while the recording dispatcher still holds the claim: $1
	// JSON array of objects with the keys
	// id, claim_token, state, next_at, last_status, last_error, at (the time now) and
	// delivered_at (null unless succeeded).
	RecordDeliveries string
	// SelectRecorded returns, among the deliveries named, those that
	// RecordDeliveries recorded at a time: $1 JSON array of delivery IDs, $2
	// the time (at). Run when it recorded fewer than it was given, to tell
	// which claims were lost.
	SelectRecorded string
	// InsertAttempts records many attempts in one statement: $1 JSON array
	// of objects with the keys delivery_id, attempt, started_at,
	// duration_ms, status_code, error and response_body.
	InsertAttempts string
	// SelectTenantSubscriptions is SelectTenantSubscriptions, on
	// PostgreSQL with FOR KEY SHARE (see pendingOrPaused).
	SelectTenantSubscriptions string
	// RecordHealth updates the health of the subscriptions of a batch of
	// finished attempts: $1 JSON array of objects with the keys id,
	// ok_at (the last success in the batch, or null), failed (failures
	// after it) and fail_at (the first of those, or null). A subscription
	// that stays healthy is rewritten at most once a minute.
	RecordHealth string
	// AutoDisable disables the subscriptions, among those named, that have
	// failed without a success since before a time: $1 reason, $2 now,
	// $3 failing since at most, $4 minimum consecutive failures, $5 JSON
	// array of subscription IDs. Returns id, tenant of each one disabled.
	AutoDisable string
	// SelectDueFirst and SelectDueRetry return due deliveries, first attempts
	// and retries respectively: $1 now, $2 JSON array of subscription IDs to
	// skip, $3 limit.
	SelectDueFirst string
	SelectDueRetry string
	// ClaimDeliveries: $1 lease expiry, $2 claim token, $3 now, $4 JSON array
	// of delivery IDs.
	ClaimDeliveries string
	// LockTenantSubscriptions: $1 tenant. Serializes count-then-create of
	// one tenant's subscriptions. Empty when transactions are exclusive.
	LockTenantSubscriptions string
	// NotifyChannel, when not empty, is the channel a trigger notifies when
	// events are inserted into the outbox (PostgreSQL LISTEN/NOTIFY).
	NotifyChannel string

	// OutboxLease holds the statements of direct expansion: the dispatcher
	// holding the outbox lease starts the deliveries of new events straight
	// from the outbox and records each event expanded, with its deliveries
	// and their attempts, once those attempts are over. Empty (PostgreSQL,
	// where every dispatcher expands and claims rows) when the dialect has
	// none.
	OutboxLease OutboxLeaseQueries
}

// Queries returns the dialect's statements.
func (d Dialect) Queries() (Queries, error) {
	switch d {
	case SQLite:
		// SQLite has one writer at a time: transactions begin with
		// BEGIN IMMEDIATE, so plain selects are already exclusive.
		return Queries{
			SelectUnexpanded:          selectUnexpanded,
			InsertDeliveries:          fmt.Sprintf(insertDeliveries, SQLite.jsonRows(newDeliveryRow)),
			MarkExpandedBatch:         fmt.Sprintf(markExpandedBatch, fmt.Sprintf(jsonArraySQLite, "$2")),
			RecordDeliveries:          fmt.Sprintf(recordDeliveries, SQLite.PendingOrPaused(), SQLite.jsonRows(outcomeRow)),
			SelectTenantSubscriptions: SelectTenantSubscriptions,
			InsertAttempts:            fmt.Sprintf(insertAttempts, SQLite.jsonRows(attemptRow)),
			RecordHealth:              fmt.Sprintf(recordHealth, SQLite.jsonRows(healthRow)),
			AutoDisable:               fmt.Sprintf(autoDisable, fmt.Sprintf(jsonArraySQLite, "$5")),
			SelectDueFirst:            fmt.Sprintf(selectDueSQLite, "= 0"),
			SelectDueRetry:            fmt.Sprintf(selectDueSQLite, "> 0"),
			ClaimDeliveries:           fmt.Sprintf(claimDeliveries, fmt.Sprintf(jsonArraySQLite, "$4")),
			SelectRecorded:            fmt.Sprintf(selectRecorded, fmt.Sprintf(jsonArraySQLite, "$1")),
			OutboxLease: OutboxLeaseQueries{
				Select:               `SELECT owner, until FROM webhook_outbox_lease WHERE id = 1`,
				Take:                 takeOutboxLease,
				Release:              `UPDATE webhook_outbox_lease SET until = 0 WHERE id = 1 AND owner = $1`,
				SelectEvents:         selectUnexpandedAfter,
				InsertDeliveries:     insertMadeDeliveriesSQLite,
				SelectExisting:       `SELECT id FROM webhook_deliveries WHERE id IN (SELECT value FROM json_each($1))`,
				SubscriptionsVersion: `SELECT version FROM webhook_subscriptions_version WHERE id = 1`,
			},
		}, nil
	case Postgres:
		// Several dispatchers work side by side: each locks the rows it
		// takes and skips those another one holds.
		skip := fmt.Sprintf(jsonArrayPostgres, "$2")
		return Queries{
			LockMigrations:            `SELECT pg_advisory_xact_lock(7316101326475121)`,
			SelectUnexpanded:          selectUnexpanded + "\nFOR UPDATE SKIP LOCKED",
			InsertDeliveries:          fmt.Sprintf(insertDeliveries, Postgres.jsonRows(newDeliveryRow)),
			MarkExpandedBatch:         markExpandedBatchPostgres,
			RecordDeliveries:          fmt.Sprintf(recordDeliveries, Postgres.PendingOrPaused(), Postgres.jsonRows(outcomeRow)),
			SelectTenantSubscriptions: SelectTenantSubscriptions + keySharePostgres,
			InsertAttempts:            fmt.Sprintf(insertAttempts, Postgres.jsonRows(attemptRow)),
			RecordHealth:              fmt.Sprintf(recordHealth, Postgres.jsonRows(healthRow)),
			AutoDisable:               fmt.Sprintf(autoDisable, fmt.Sprintf(jsonArrayPostgres, "$5")),
			SelectDueFirst:            fmt.Sprintf(selectDue, "= 0", skip) + "\nFOR UPDATE OF d SKIP LOCKED",
			SelectDueRetry:            fmt.Sprintf(selectDue, "> 0", skip) + "\nFOR UPDATE OF d SKIP LOCKED",
			ClaimDeliveries:           fmt.Sprintf(claimDeliveries, fmt.Sprintf(jsonArrayPostgres, "$4")),
			SelectRecorded:            fmt.Sprintf(selectRecorded, fmt.Sprintf(jsonArrayPostgres, "$1")),
			LockTenantSubscriptions:   `SELECT pg_advisory_xact_lock(7316, hashtext($1))`,
			NotifyChannel:             "webhook_outbox",
		}, nil
	}
	return Queries{}, fmt.Errorf("%w: %q", ErrUnknownDialect, string(d))
}

// jsonArrayPostgres expands a JSON array parameter into a one-column row
// set.
//
// The array is built once (ARRAY(...) is an init plan) and unnested, so a
// plan that probes the list once per candidate row never parses the JSON
// again: with jsonb_array_elements_text directly in the IN list, PostgreSQL
// re-reads the array for every row it considers, which made marking a batch
// of events expanded cost 143 ms instead of 1.5 ms on a table with history.
const jsonArrayPostgres = `SELECT unnest(ARRAY(SELECT jsonb_array_elements_text(CAST(%s AS jsonb))))`

// jsonArraySQLite expands a JSON array parameter into a one-column row set.
const jsonArraySQLite = `SELECT value FROM json_each(%s)`

const selectUnexpanded = `SELECT seq, id, type, tenant, payload FROM webhook_outbox
WHERE expanded_at IS NULL ORDER BY seq LIMIT $1`

// selectDue's first verb is the attempts condition (it selects the partial
// index), the second the JSON array expansion.
const selectDue = `SELECT d.id, d.event_id, d.subscription_id, d.tenant, d.attempts,
       s.url, s.secrets, s.headers, s.rate_limit, e.payload
FROM webhook_deliveries d
JOIN webhook_subscriptions s ON s.id = d.subscription_id
JOIN webhook_outbox e ON e.id = d.event_id
WHERE d.state IN ('pending', 'delivering') AND d.attempts %s
  AND d.next_at <= $1
  AND s.enabled = TRUE
  AND d.subscription_id NOT IN (%s)
ORDER BY d.next_at
LIMIT $3`

// selectDueSQLite is selectDue driven by the enabled subscriptions that are
// not at their in-flight cap: each one's oldest due deliveries are read from
// the (subscription_id, next_at) index, so the backlog of a skipped
// subscription (a hanging endpoint) is never scanned, and only the rows
// finally picked are joined with their payloads. The verb is the attempts
// condition. (p makes $1 appear first: go-sqlite3 binds $N by order of first
// appearance.)
const selectDueSQLite = `WITH p(now_ms) AS (SELECT $1),
subs AS (SELECT id FROM webhook_subscriptions
         WHERE enabled = TRUE AND id NOT IN (SELECT value FROM json_each($2))),
due AS (SELECT x.rowid AS rid, x.next_at AS next_at
        FROM subs s CROSS JOIN p CROSS JOIN webhook_deliveries x
        WHERE x.rowid IN (
            SELECT y.rowid FROM webhook_deliveries y
            WHERE y.subscription_id = s.id AND y.state IN ('pending', 'delivering')
              AND y.attempts %[1]s AND y.next_at <= p.now_ms
            ORDER BY y.next_at, y.state, y.attempts LIMIT $3)
        ORDER BY x.next_at, x.rowid LIMIT $3)
SELECT d.id, d.event_id, d.subscription_id, d.tenant, d.attempts,
       s.url, s.secrets, s.headers, s.rate_limit, e.payload
FROM due CROSS JOIN webhook_deliveries d ON d.rowid = due.rid
JOIN webhook_subscriptions s ON s.id = d.subscription_id
JOIN webhook_outbox e ON e.id = d.event_id
ORDER BY due.next_at, due.rid`

// Set-based statements take their rows as one JSON array parameter ($1), so
// a batch costs one statement whatever its size. jsonRows turns that array
// into a row set with the named columns: on SQLite by extracting each key,
// on PostgreSQL with jsonb_to_recordset and the columns' types.
type column struct{ name, pgType string }

// The columns of each set-based statement's rows.
var (
	newDeliveryRow = []column{{"id", "text"}, {"event_id", "text"}, {"subscription_id", "text"},
		{"tenant", "text"}, {"state", "text"}, {"next_at", "bigint"}, {"claim_token", "text"}, {"at", "bigint"}}
	outcomeRow = []column{{"id", "text"}, {"claim_token", "text"}, {"state", "text"}, {"next_at", "bigint"},
		{"last_status", "integer"}, {"last_error", "text"}, {"at", "bigint"}, {"delivered_at", "bigint"}}
	attemptRow = []column{{"delivery_id", "text"}, {"attempt", "integer"}, {"started_at", "bigint"},
		{"duration_ms", "bigint"}, {"status_code", "integer"}, {"error", "text"}, {"response_body", "text"}}
	healthRow = []column{{"id", "text"}, {"ok_at", "bigint"}, {"failed", "integer"}, {"fail_at", "bigint"}}
)

// jsonRows is the dialect's row set of the JSON array $1 (see column).
func (d Dialect) jsonRows(cols []column) string {
	parts := make([]string, len(cols))
	for i, c := range cols {
		if d == SQLite {
			parts[i] = fmt.Sprintf("value->>'%s' AS %s", c.name, c.name)
		} else {
			parts[i] = c.name + " " + c.pgType
		}
	}
	if d == SQLite {
		return "SELECT " + strings.Join(parts, ", ") + " FROM json_each($1)"
	}
	return "SELECT * FROM jsonb_to_recordset(CAST($1 AS jsonb)) AS r(" + strings.Join(parts, ", ") + ")"
}

// insertDeliveries' verb is the row set. (WHERE TRUE tells SQLite's parser
// that ON CONFLICT belongs to the INSERT, not to a join.)
const insertDeliveries = `INSERT INTO webhook_deliveries
    (id, event_id, subscription_id, tenant, state, attempts, next_at, claim_token, created_at, updated_at)
SELECT id, event_id, subscription_id, tenant, state, 0, next_at, claim_token, at, at
FROM (%s) AS r WHERE TRUE
ON CONFLICT (event_id, subscription_id) DO NOTHING`

const markExpandedBatch = `UPDATE webhook_outbox SET expanded_at = $1
WHERE seq IN (%s) AND expanded_at IS NULL`

// markExpandedBatchPostgres looks the events up by key from an array built
// once (see jsonArrayPostgres).
const markExpandedBatchPostgres = `UPDATE webhook_outbox SET expanded_at = $1
WHERE seq = ANY (ARRAY(SELECT CAST(jsonb_array_elements_text(CAST($2 AS jsonb)) AS bigint)))
  AND expanded_at IS NULL`

// pendingOrPaused is the state of a delivery due again: pending, or paused
// when its subscription is disabled. Its verb is the row lock of the
// subscription read: on PostgreSQL FOR KEY SHARE, which waits for a
// Subscriptions.Update in progress (FOR UPDATE) to commit, so a delivery
// never goes paused after the enabling transaction looked for paused ones
// (it would stay paused). It does not conflict with the dispatchers' own
// health updates.
const pendingOrPaused = `CASE WHEN COALESCE((SELECT s.enabled FROM webhook_subscriptions s
        WHERE s.id = webhook_deliveries.subscription_id%s), FALSE) THEN 'pending' ELSE 'paused' END`

// Row locks of the reads that decide pending or paused (see
// pendingOrPaused).
const (
	keyShareSQLite   = ``
	keySharePostgres = ` FOR KEY SHARE`
)

// PendingOrPaused returns the dialect's SQL expression for the state of a
// delivery made due again: 'pending', or 'paused' while its subscription is
// disabled.
func (d Dialect) PendingOrPaused() string {
	if d == Postgres {
		return fmt.Sprintf(pendingOrPaused, keySharePostgres)
	}
	return fmt.Sprintf(pendingOrPaused, keyShareSQLite)
}

// recordDeliveries pauses a retry whose subscription was disabled while
// the attempt was in flight. Verbs: the pendingOrPaused expression, the row
// set.
const recordDeliveries = `UPDATE webhook_deliveries
SET state = CASE WHEN r.state = 'pending' THEN %s ELSE r.state END,
    attempts = webhook_deliveries.attempts + 1, next_at = r.next_at,
    claim_token = NULL, last_status = r.last_status, last_error = r.last_error,
    updated_at = r.at, delivered_at = r.delivered_at
FROM (%s) AS r
WHERE webhook_deliveries.id = r.id AND webhook_deliveries.claim_token = r.claim_token
  AND webhook_deliveries.state = 'delivering'`

// selectRecorded's verb is the ID array ($1). A delivery RecordDeliveries
// recorded has no claim, a state after an attempt and updated_at = $2; one
// whose claim was lost is still claimed (by another dispatcher), canceled,
// or was recorded at another time. (One claimed again and recorded by
// another dispatcher in the same millisecond would pass for recorded.)
const selectRecorded = `SELECT id FROM webhook_deliveries
WHERE id IN (%s) AND claim_token IS NULL AND state NOT IN ('delivering', 'canceled') AND updated_at = $2`

const insertAttempts = `INSERT INTO webhook_attempts
    (delivery_id, attempt, started_at, duration_ms, status_code, error, response_body)
SELECT delivery_id, attempt, started_at, duration_ms, status_code, error, response_body
FROM (%s) AS r`

// recordHealth's verb is the row set. A batch with a success starts the
// count over from the failures after it.
const recordHealth = `UPDATE webhook_subscriptions
SET consecutive_failures = CASE WHEN r.ok_at IS NULL
        THEN webhook_subscriptions.consecutive_failures + r.failed ELSE r.failed END,
    failing_since = CASE WHEN r.failed = 0 THEN NULL
        WHEN r.ok_at IS NULL THEN COALESCE(webhook_subscriptions.failing_since, r.fail_at)
        ELSE r.fail_at END,
    last_success_at = COALESCE(r.ok_at, webhook_subscriptions.last_success_at)
FROM (%s) AS r
WHERE webhook_subscriptions.id = r.id
  AND (r.failed > 0 OR webhook_subscriptions.consecutive_failures <> 0
       OR webhook_subscriptions.failing_since IS NOT NULL
       OR webhook_subscriptions.last_success_at IS NULL
       OR webhook_subscriptions.last_success_at < r.ok_at - 60000)`

// autoDisable's verb is the ID array ($5).
const autoDisable = `UPDATE webhook_subscriptions
SET enabled = FALSE, disabled_reason = $1, updated_at = $2
WHERE enabled = TRUE AND failing_since IS NOT NULL AND failing_since <= $3
  AND consecutive_failures >= $4 AND id IN (%s)
RETURNING id, tenant`

const claimDeliveries = `UPDATE webhook_deliveries
SET state = 'delivering', next_at = $1, claim_token = $2, updated_at = $3
WHERE id IN (%s)`

// Statements that are the same in every dialect.
const (
	// SelectTenantSubscriptions: $1 tenant. The enabled subscriptions an
	// event of that tenant may reach.
	// Returns id, event_types, url, secrets, headers, rate_limit, enabled,
	// of every subscription of the tenant, enabled or not: a disabled
	// one's deliveries are made paused and wait until it is enabled again.
	SelectTenantSubscriptions = `SELECT id, event_types, url, secrets, headers, rate_limit, enabled
FROM webhook_subscriptions WHERE tenant = $1`

	// InsertDelivery: $1 id, $2 event_id, $3 subscription_id, $4 tenant,
	// $5 next_at, $6 created_at, $7 updated_at. A second expansion of the
	// same event never makes a second delivery for the same subscription.
	InsertDelivery = `INSERT INTO webhook_deliveries
    (id, event_id, subscription_id, tenant, state, attempts, next_at, created_at, updated_at)
VALUES ($1, $2, $3, $4, 'pending', 0, $5, $6, $7)
ON CONFLICT (event_id, subscription_id) DO NOTHING`

	// ProbeUnexpanded returns the ID of an unexpanded event, if any.
	ProbeUnexpanded = `SELECT id FROM webhook_outbox WHERE expanded_at IS NULL ORDER BY seq LIMIT 1`

	// DisableSubscription: $1 reason, $2 updated_at, $3 id.
	DisableSubscription = `UPDATE webhook_subscriptions
SET enabled = FALSE, disabled_reason = $1, updated_at = $2 WHERE id = $3 AND enabled = TRUE
RETURNING tenant`
)

// Subscription statements.
const (
	subscriptionColumns = `id, tenant, url, event_types, secrets, description, metadata,
       enabled, disabled_reason, created_at, updated_at`

	// CountSubscriptions: $1 tenant.
	CountSubscriptions = `SELECT COUNT(*) FROM webhook_subscriptions WHERE tenant = $1`

	// DeleteSubscription: $1 tenant, $2 id.
	DeleteSubscription = `DELETE FROM webhook_subscriptions WHERE tenant = $1 AND id = $2`

	// CancelSubscriptionDeliveries stops the pending deliveries of a deleted
	// subscription: $1 updated_at, $2 subscription_id.
	CancelSubscriptionDeliveries = `UPDATE webhook_deliveries
SET state = 'canceled', claim_token = NULL, updated_at = $1
WHERE subscription_id = $2 AND state IN ('pending', 'delivering', 'paused')`

	// PauseDeliveries and PauseRetries park the pending first attempts
	// and retries of a subscription that was disabled: paused deliveries
	// are outside the due indexes, so no claim reads them. Each reads one
	// due index (its conditions repeat the index's), not the
	// subscription's history. $1 updated_at, $2 subscription_id.
	PauseDeliveries = `UPDATE webhook_deliveries SET state = 'paused', updated_at = $1
WHERE subscription_id = $2 AND state IN ('pending', 'delivering') AND attempts = 0 AND state = 'pending'`
	PauseRetries = `UPDATE webhook_deliveries SET state = 'paused', updated_at = $1
WHERE subscription_id = $2 AND state IN ('pending', 'delivering') AND attempts > 0 AND state = 'pending'`

	// ResumeDeliveries makes a re-enabled subscription's paused deliveries
	// pending again, each due when it was: $1 updated_at, $2
	// subscription_id.
	ResumeDeliveries = `UPDATE webhook_deliveries SET state = 'pending', updated_at = $1
WHERE subscription_id = $2 AND state = 'paused'`
)

// Delivery statements.
const (
	deliveryColumns = `id, event_id, subscription_id, tenant, state, attempts, next_at,
       last_status, last_error, created_at, updated_at, delivered_at`

	// SelectDelivery: $1 tenant, $2 id.
	SelectDelivery = `SELECT ` + deliveryColumns + ` FROM webhook_deliveries
WHERE tenant = $1 AND id = $2`

	// ListDeliveries: $1 tenant, $2 subscription_id, $3 state ('' for
	// any), $4 cursor (exclusive; '' for the first page), $5 limit.
	ListDeliveries = `SELECT ` + deliveryColumns + ` FROM webhook_deliveries
WHERE tenant = $1 AND subscription_id = $2 AND ($3 = '' OR state = $3) AND id > $4
ORDER BY id LIMIT $5`
)

// Migration bookkeeping, the same in every dialect.
const (
	// CreateMigrationsTable records which migrations were applied.
	CreateMigrationsTable = `CREATE TABLE IF NOT EXISTS webhook_schema_migrations (
    version    INTEGER PRIMARY KEY,
    applied_at BIGINT  NOT NULL
)`
	// CountMigration: $1 version.
	CountMigration = `SELECT COUNT(*) FROM webhook_schema_migrations WHERE version = $1`
	// RecordMigration: $1 version, $2 applied_at.
	RecordMigration = `INSERT INTO webhook_schema_migrations (version, applied_at) VALUES ($1, $2)`
)

// InsertEventBatch returns the statement PublishBatch runs for n events: it
// inserts all n rows, or none when any of their IDs exists already.
// Parameters: the six InsertEvent parameters of each event in turn.
func InsertEventBatch(n int) string {
	var b strings.Builder
	b.WriteString(`INSERT INTO webhook_outbox (id, type, tenant, payload, occurred_at, created_at)
SELECT column1, column2, column3, column4, column5, column6 FROM (VALUES `)
	for i := 0; i < n; i++ {
		if i > 0 {
			b.WriteString(", ")
		}
		p := i*6 + 1
		fmt.Fprintf(&b, "($%d, $%d, $%d, $%d, CAST($%d AS BIGINT), CAST($%d AS BIGINT))", p, p+1, p+2, p+3, p+4, p+5)
	}
	b.WriteString(`) AS v
WHERE NOT EXISTS (SELECT 1 FROM webhook_outbox o WHERE o.id IN (`)
	for i := 0; i < n; i++ {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "$%d", i*6+1)
	}
	b.WriteString(`))
ON CONFLICT (id) DO NOTHING`)
	return b.String()
}

// InsertExpandedEvent adds an event that needs no expansion because its
// deliveries are inserted with it (a test event for one subscription).
// Parameters: as InsertEvent, then $7 expanded_at.
const InsertExpandedEvent = `INSERT INTO webhook_outbox (id, type, tenant, payload, occurred_at, created_at, expanded_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)`

// SelectPendingStats returns the count and the oldest created_at of the
// unfinished deliveries. It reads them through the two partial due indexes
// (first attempts and retries), so its cost grows with the unfinished
// deliveries, not with the table: on a table of 1M deliveries of which 10k
// are unfinished it takes about 15 ms on SQLite and 10-40 ms on PostgreSQL
// (one row fetch per unfinished delivery for created_at), where a plain
// WHERE state IN (...) scans the whole table (80-100 ms). It runs once per
// collection, on every dispatcher with a MeterProvider.
const SelectPendingStats = `SELECT COUNT(*), MIN(created_at) FROM (
    SELECT created_at FROM webhook_deliveries WHERE state IN ('pending', 'delivering') AND attempts = 0
    UNION ALL
    SELECT created_at FROM webhook_deliveries WHERE state IN ('pending', 'delivering') AND attempts > 0
) AS unfinished`
