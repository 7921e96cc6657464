package webhooks

import (
	"context"
	"database/sql"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/outboxhook/webhooks/store"
	"github.com/outboxhook/webhooks/store/postgres"
	"github.com/outboxhook/webhooks/store/sqlite"
)

func TestMigrateIsIdempotentAndSafeConcurrently(t *testing.T) {
	path := filepath.Join(t.TempDir(), "m.db")
	ctx := context.Background()
	const procs = 6
	var wg sync.WaitGroup
	errs := make(chan error, procs)
	for i := 0; i < procs; i++ {
		// Separate handles, as separate processes would have.
		db, err := sqlite.Open(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- Migrate(ctx, db)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent Migrate: %v", err)
		}
	}
	db := openTestDBAt(t, path) // migrates once more
	migrations, err := store.SQLite.Migrations()
	if err != nil {
		t.Fatal(err)
	}
	if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_schema_migrations`); n != len(migrations) {
		t.Fatalf("%d recorded migrations, want %d", n, len(migrations))
	}
	for _, table := range []string{"webhook_outbox", "webhook_subscriptions", "webhook_deliveries", "webhook_attempts"} {
		countRows(t, db, `SELECT COUNT(*) FROM `+table)
	}
}

func TestMigrationsAreExported(t *testing.T) {
	ms, err := store.SQLite.Migrations()
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) == 0 || ms[0].Version != 1 || !strings.Contains(ms[0].SQL, "CREATE TABLE webhook_outbox") {
		t.Fatalf("migrations %+v", ms)
	}
	if _, err := store.Dialect("oracle").Migrations(); !errors.Is(err, store.ErrUnknownDialect) {
		t.Fatalf("unknown dialect: %v", err)
	}
}

func TestUnknownDriverNeedsAConfiguredDialect(t *testing.T) {
	db := sql.OpenDB(nopConnector{})
	defer db.Close()
	if _, err := NewDispatcher(db, Config{}); !errors.Is(err, ErrUnknownDialect) {
		t.Fatalf("err = %v, want ErrUnknownDialect", err)
	}
	if _, err := NewSubscriptions(db, SubscriptionsConfig{Dialect: "oracle"}); !errors.Is(err, ErrUnknownDialect) {
		t.Fatalf("err = %v, want ErrUnknownDialect", err)
	}
}

func TestSQLiteDSN(t *testing.T) {
	dsn, err := sqlite.DSN("/tmp/x.db", sqlite.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"_journal_mode=WAL", "_busy_timeout=10000", "_synchronous=NORMAL", "_txlock=immediate"} {
		if !strings.Contains(dsn, want) {
			t.Errorf("DSN %q lacks %s", dsn, want)
		}
	}
	if _, err := sqlite.DSN("", sqlite.Options{}); err == nil {
		t.Error("empty path accepted")
	}
	if _, err := sqlite.DSN("x.db?mode=ro", sqlite.Options{}); err == nil {
		t.Error("path with a query accepted")
	}
	if _, err := sqlite.DSN("x.db", sqlite.Options{Synchronous: "OFF"}); err == nil {
		t.Error("synchronous=OFF accepted")
	}
	// The pragmas are in force on every connection.
	db := openTestDB(t)
	var mode string
	var sync, busy int
	if err := db.QueryRow(`PRAGMA journal_mode`).Scan(&mode); err != nil || mode != "wal" {
		t.Errorf("journal_mode %q %v", mode, err)
	}
	if err := db.QueryRow(`PRAGMA synchronous`).Scan(&sync); err != nil || sync != 1 {
		t.Errorf("synchronous %d %v (1 is NORMAL)", sync, err)
	}
	if err := db.QueryRow(`PRAGMA busy_timeout`).Scan(&busy); err != nil || busy != 10000 {
		t.Errorf("busy_timeout %d %v", busy, err)
	}
}

func TestMigrateConcurrentlyOnPostgres(t *testing.T) {
	dsn := postgresDSN(t)
	ctx := context.Background()
	first := openPostgresTestDB(t) // a fresh, migrated schema
	var schema string
	if err := first.QueryRow(`SELECT current_schema()`).Scan(&schema); err != nil {
		t.Fatal(err)
	}
	// Start over in that schema, then migrate from several handles at once.
	for _, stmt := range []string{
		"DROP TABLE webhook_outbox, webhook_subscriptions, webhook_deliveries, webhook_attempts, webhook_schema_migrations",
		"DROP FUNCTION webhook_outbox_notify()",
	} {
		if _, err := first.Exec(stmt); err != nil {
			t.Fatal(err)
		}
	}
	const procs = 6
	errs := make(chan error, procs)
	var wg sync.WaitGroup
	for i := 0; i < procs; i++ {
		db, err := postgres.Open(ctx, withSearchPath(t, dsn, schema))
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- Migrate(ctx, db)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent Migrate: %v", err)
		}
	}
	migrations, err := store.Postgres.Migrations()
	if err != nil {
		t.Fatal(err)
	}
	if n := countRows(t, first, `SELECT COUNT(*) FROM webhook_schema_migrations`); n != len(migrations) {
		t.Fatalf("%d recorded migrations, want %d", n, len(migrations))
	}
}
