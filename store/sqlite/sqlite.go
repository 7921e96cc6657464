// Package sqlite opens SQLite databases (github.com/mattn/go-sqlite3)
// configured for outboxhook: an application's own transactions and the
// dispatcher share one file without "database is locked" errors.
//
// The application should open its database with [Open] (or with a DSN from
// [DSN]) and use that one handle both for its business data and for the
// webhooks package, so Publish joins the application's transactions.
//
// What the DSN sets, and why:
//
//   - _journal_mode=WAL: readers never block the writer and the writer never
//     blocks readers.
//   - _busy_timeout=10000: a connection that finds the write lock taken waits
//     up to 10 s for it instead of failing at once with SQLITE_BUSY.
//   - _synchronous=NORMAL: in WAL mode, commits are durable against
//     application crashes and the database cannot be corrupted by a power
//     loss; only the last transactions before a power loss may roll back.
//     Use [Options] with Synchronous "FULL" to make every commit durable at
//     some cost in throughput (see BENCHMARKS.md).
//   - _txlock=immediate: every transaction takes the write lock when it
//     begins. A deferred transaction that reads first and writes later
//     fails with SQLITE_BUSY, without waiting, if another connection wrote in
//     between; an immediate one waits under the busy timeout instead. This is
//     the setting an application's own DSN must have when it writes from
//     several goroutines.
//   - _foreign_keys=on: enforce the application's own foreign keys.
//   - _stmt_cache_size and _cache_size: each connection keeps StmtCacheSize
//     prepared statements and up to 64 MiB of database pages (performance
//     only).
package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	_ "github.com/mattn/go-sqlite3" // registers the "sqlite3" driver
)

// DriverName is the database/sql driver name go-sqlite3 registers.
const DriverName = "sqlite3"

// StmtCacheSize is how many prepared statements each connection keeps
// (go-sqlite3's _stmt_cache_size): Publish and the dispatcher run the same
// few statements over and over, and preparing them is a third of Publish's
// CPU time.
const StmtCacheSize = 64

// Defaults for [Options].
const (
	BusyTimeoutDefault = 10 * time.Second
	SynchronousDefault = "NORMAL"
)

// Options tunes [OpenWith]. The zero value gives the settings described in
// the package documentation.
type Options struct {
	// BusyTimeout is how long a connection waits for the write lock.
	// Zero means BusyTimeoutDefault.
	BusyTimeout time.Duration
	// Synchronous is SQLite's synchronous pragma: "NORMAL" (default) or
	// "FULL" (or "EXTRA").
	Synchronous string
}

// DSN returns the go-sqlite3 data source name for the database file at path
// with the settings described in the package documentation.
func DSN(path string, opts Options) (string, error) {
	if path == "" {
		return "", fmt.Errorf("sqlite: empty database path")
	}
	if strings.ContainsAny(path, "?#") {
		return "", fmt.Errorf("sqlite: database path %q must not contain '?' or '#'", path)
	}
	busy := opts.BusyTimeout
	if busy == 0 {
		busy = BusyTimeoutDefault
	}
	if busy < 0 {
		return "", fmt.Errorf("sqlite: negative busy timeout %v", busy)
	}
	syncMode := strings.ToUpper(opts.Synchronous)
	switch syncMode {
	case "":
		syncMode = SynchronousDefault
	case "NORMAL", "FULL", "EXTRA":
	default:
		return "", fmt.Errorf("sqlite: synchronous %q: want NORMAL, FULL or EXTRA", opts.Synchronous)
	}
	q := url.Values{}
	q.Set("_journal_mode", "WAL")
	q.Set("_busy_timeout", strconv.FormatInt(busy.Milliseconds(), 10))
	q.Set("_synchronous", syncMode)
	q.Set("_txlock", "immediate")
	q.Set("_foreign_keys", "on")
	q.Set("_stmt_cache_size", strconv.Itoa(StmtCacheSize))
	q.Set("_cache_size", "-65536")
	return "file:" + path + "?" + q.Encode(), nil
}

// Open opens (creating if needed) the SQLite database file at path with the
// default [Options] and checks that it can be used.
func Open(ctx context.Context, path string) (*sql.DB, error) {
	return OpenWith(ctx, path, Options{})
}

// OpenWith is Open with explicit options.
func OpenWith(ctx context.Context, path string, opts Options) (*sql.DB, error) {
	dsn, err := DSN(path, opts)
	if err != nil {
		return nil, err
	}
	db, err := sql.Open(DriverName, dsn)
	if err != nil {
		return nil, fmt.Errorf("sqlite: open %s: %w", path, err)
	}
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("sqlite: open %s: %w", path, err)
	}
	return db, nil
}
