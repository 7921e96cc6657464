// Package webhooks gives a Go service reliable outbound webhooks from a
// transactional outbox, with no infrastructure beyond the database it already
// has.
//
// The service calls [Publish] inside the same database transaction that
// changes its business data, so the event commits or rolls back with it. An
// embedded [Dispatcher] polls the outbox, expands each event into one delivery
// per matching [Subscription], and delivers each one on its own, signed with
// the Standard Webhooks scheme (HMAC-SHA256), retried on failure, with every
// attempt recorded in the same database. [Subscriptions] manages the
// endpoints, scoped by tenant.
//
// # Guarantees
//
// Delivery is at least once: a dispatcher that dies mid-request leaves its
// claims to expire and be delivered again, so receivers must deduplicate on
// the webhook-id header, which is the event ID and the same on every retry and
// for every subscription. Deliveries are not ordered.
//
// # Databases
//
// SQLite (github.com/mattn/go-sqlite3) is the default; open it with
// store/sqlite.Open, which configures WAL, a busy timeout and immediate
// transactions. The schema is created by [Migrate]; its SQL lives in package
// store.
package webhooks

import (
	"context"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/outboxhook/webhooks/internal/dbtx"
	"github.com/outboxhook/webhooks/store"
)

// Sentinel errors. Errors returned by this package wrap one of these (or a
// database or context error) with details; test for them with errors.Is.
var (
	// ErrInvalidEvent is returned by Publish for an event that cannot be
	// published: a missing or malformed type, data that is not a JSON
	// object, an ID or tenant that is not allowed. Nothing is written.
	ErrInvalidEvent = errors.New("webhooks: invalid event")
	// ErrPayloadTooLarge is returned by Publish when the delivered body would
	// exceed the size limit. Nothing is written.
	ErrPayloadTooLarge = errors.New("webhooks: event payload too large")
	// ErrDuplicateEvent is returned by Publish when an event with the same ID
	// already exists. Nothing is written, so publishing is idempotent.
	ErrDuplicateEvent = errors.New("webhooks: duplicate event ID")
	// ErrInvalidSubscription is returned for a subscription that fails
	// validation. Nothing is written.
	ErrInvalidSubscription = errors.New("webhooks: invalid subscription")
	// ErrSubscriptionLimit is returned when a tenant already has as many
	// subscriptions as allowed.
	ErrSubscriptionLimit = errors.New("webhooks: subscription limit reached")
	// ErrNotFound is returned when a subscription or delivery does not exist
	// within the caller's tenant.
	ErrNotFound = errors.New("webhooks: not found")
	// ErrInvalidConfig is returned by NewDispatcher for a configuration that
	// cannot work.
	ErrInvalidConfig = errors.New("webhooks: invalid configuration")
	// ErrDispatcherClosed is returned by Run after Shutdown, and by Run on a
	// dispatcher that is already running or was shut down.
	ErrDispatcherClosed = errors.New("webhooks: dispatcher closed")
	// ErrUnknownDialect is returned when the SQL dialect of a *sql.DB cannot
	// be told from its driver and none was configured.
	ErrUnknownDialect = errors.New("webhooks: cannot detect SQL dialect; set it in the config")
)

// Clock tells the time. The dispatcher and the subscription store take one so
// tests can drive time-dependent behaviour (retry schedules, leases) without
// sleeping. A nil Clock means the system clock.
type Clock interface {
	Now() time.Time
}

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }

func clockOrSystem(c Clock) Clock {
	if c == nil {
		return systemClock{}
	}
	return c
}

// Dialect names the SQL dialect of a database. The zero value means "detect
// from the driver".
type Dialect = store.Dialect

// The supported dialects.
const (
	DialectSQLite   = store.SQLite
	DialectPostgres = store.Postgres
)

// detectDialect tells the dialect from the driver's type name, so this
// package need not import (and link) every driver.
func detectDialect(db *sql.DB, configured Dialect) (Dialect, error) {
	if configured != "" {
		if _, err := configured.Migrations(); err != nil {
			return "", fmt.Errorf("webhooks: dialect %q: %w", string(configured), ErrUnknownDialect)
		}
		return configured, nil
	}
	t := reflect.TypeOf(db.Driver()).String()
	switch {
	case strings.Contains(t, "sqlite"):
		return DialectSQLite, nil
	case strings.Contains(t, "stdlib"), strings.Contains(t, "pq."), strings.Contains(t, "pgx"):
		return DialectPostgres, nil
	}
	return "", fmt.Errorf("%w (driver %s)", ErrUnknownDialect, t)
}

// driverName is the name sqlx uses to pick a bind style; every statement of
// this package uses $N placeholders, which both dialects accept.
func driverName(d Dialect) string {
	if d == DialectPostgres {
		return "pgx"
	}
	return "sqlite3"
}

// Migrate creates or upgrades the outboxhook tables in db. It is idempotent
// and safe to call from several processes at once: each migration runs in its
// own exclusive transaction and is recorded in webhook_schema_migrations.
// The dialect is detected from db's driver.
func Migrate(ctx context.Context, db *sql.DB) error {
	return MigrateDialect(ctx, db, "")
}

// MigrateDialect is Migrate with an explicit dialect ("" detects it).
func MigrateDialect(ctx context.Context, db *sql.DB, dialect Dialect) error {
	d, err := detectDialect(db, dialect)
	if err != nil {
		return err
	}
	migrations, err := d.Migrations()
	if err != nil {
		return fmt.Errorf("webhooks: migrate: %w", err)
	}
	queries, err := d.Queries()
	if err != nil {
		return fmt.Errorf("webhooks: migrate: %w", err)
	}
	dbx := sqlx.NewDb(db, driverName(d))
	for _, m := range migrations {
		err := dbtx.Run(ctx, dbx, d == DialectSQLite, func(tx dbtx.Tx) error {
			if queries.LockMigrations != "" {
				if _, err := tx.ExecContext(ctx, queries.LockMigrations); err != nil {
					return fmt.Errorf("lock: %w", err)
				}
			}
			if _, err := tx.ExecContext(ctx, store.CreateMigrationsTable); err != nil {
				return fmt.Errorf("create migrations table: %w", err)
			}
			var n int
			if err := sqlx.GetContext(ctx, tx, &n, store.CountMigration, m.Version); err != nil {
				return fmt.Errorf("read applied migrations: %w", err)
			}
			if n > 0 {
				return nil
			}
			for _, stmt := range splitStatements(m.SQL) {
				if _, err := tx.ExecContext(ctx, stmt); err != nil {
					return fmt.Errorf("%s: %w", m.Name, err)
				}
			}
			_, err := tx.ExecContext(ctx, store.RecordMigration, m.Version, time.Now().UnixMilli())
			return err
		})
		if err != nil {
			return fmt.Errorf("webhooks: migrate to version %d: %w", m.Version, err)
		}
	}
	return nil
}

// splitStatements splits a migration file on semicolons that end a line.
// A semicolon inside a literal or a body (SQLite's trigger bodies) never
// ends a line in the migrations.
func splitStatements(sqlText string) []string {
	var out []string
	for _, part := range strings.Split(sqlText, ";\n") {
		var lines []string
		for _, line := range strings.Split(part, "\n") {
			if t := strings.TrimSpace(line); t == "" || strings.HasPrefix(t, "--") {
				continue
			}
			lines = append(lines, line)
		}
		if stmt := strings.TrimSuffix(strings.TrimSpace(strings.Join(lines, "\n")), ";"); stmt != "" {
			out = append(out, stmt)
		}
	}
	return out
}

// newID returns prefix followed by the 32 hex digits of a UUIDv7, which sort
// by creation time.
func newID(prefix string) (string, error) {
	u, err := uuid.NewV7()
	if err != nil {
		return "", fmt.Errorf("webhooks: generate ID: %w", err)
	}
	var buf [64]byte // on the stack: the string is the one allocation
	if len(prefix) > len(buf)-32 {
		return prefix + hex.EncodeToString(u[:]), nil
	}
	n := copy(buf[:], prefix)
	hex.Encode(buf[n:], u[:])
	return string(buf[:n+32]), nil
}

func unixMilli(t time.Time) int64 { return t.UnixMilli() }

func fromMilli(ms int64) time.Time { return time.UnixMilli(ms).UTC() }
