package webhooks

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/outboxhook/webhooks/store/postgres"
)

// The conformance suite: tests written as forEachBackend(t, ...) run every
// behaviour against SQLite and against PostgreSQL.
//
// PostgreSQL runs when OUTBOXHOOK_TEST_POSTGRES_DSN names a server (a URL
// DSN; .ci/start-postgres starts one). Without it those subtests skip, unless
// OUTBOXHOOK_REQUIRE_POSTGRES is set (CI sets it), which makes a missing
// server a failure instead.
const (
	envPostgresDSN     = "OUTBOXHOOK_TEST_POSTGRES_DSN"
	envRequirePostgres = "OUTBOXHOOK_REQUIRE_POSTGRES"
)

// forEachBackend runs f as a subtest per database backend, passing the
// function that opens a fresh, migrated database of that backend.
func forEachBackend(t *testing.T, f func(t *testing.T, openTestDB func(testing.TB) *sql.DB)) {
	t.Run("sqlite", func(t *testing.T) { f(t, openTestDB) })
	t.Run("postgres", func(t *testing.T) { f(t, openPostgresTestDB) })
}

// postgresDSN returns the test server's DSN, skipping (or failing, when
// PostgreSQL is required) the test without one.
func postgresDSN(t testing.TB) string {
	t.Helper()
	dsn := os.Getenv(envPostgresDSN)
	if dsn == "" {
		if os.Getenv(envRequirePostgres) != "" {
			t.Fatalf("%s is set but %s is empty: PostgreSQL tests cannot run", envRequirePostgres, envPostgresDSN)
		}
		t.Skipf("PostgreSQL tests skipped: set %s to a server's URL (e.g. from .ci/start-postgres) to run them", envPostgresDSN)
	}
	return dsn
}

var (
	pgAdminOnce sync.Once
	pgAdmin     *sql.DB
	pgAdminErr  error
)

// openPostgresTestDB returns a handle whose tables live in a fresh schema of
// their own, dropped when the test ends.
func openPostgresTestDB(t testing.TB) *sql.DB {
	t.Helper()
	dsn := postgresDSN(t)
	ctx := context.Background()
	pgAdminOnce.Do(func() { pgAdmin, pgAdminErr = postgres.Open(ctx, dsn) })
	if pgAdminErr != nil {
		t.Fatalf("PostgreSQL at %s: %v", envPostgresDSN, pgAdminErr)
	}
	b := make([]byte, 6)
	rand.Read(b)
	schema := "test_" + hex.EncodeToString(b)
	if _, err := pgAdmin.ExecContext(ctx, "CREATE SCHEMA "+schema); err != nil {
		t.Fatal(err)
	}
	db, err := postgres.Open(ctx, withSearchPath(t, dsn, schema))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		db.Close()
		if _, err := pgAdmin.ExecContext(context.Background(), "DROP SCHEMA "+schema+" CASCADE"); err != nil {
			t.Errorf("drop schema %s: %v", schema, err)
		}
	})
	if err := Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	return db
}

func withSearchPath(t testing.TB, dsn, schema string) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil || !strings.HasPrefix(u.Scheme, "postgres") {
		t.Fatalf("%s must be a postgres:// URL", envPostgresDSN)
	}
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	return u.String()
}
