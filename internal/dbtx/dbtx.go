// Package dbtx runs a function in one database transaction, taking SQLite's
// write lock up front.
package dbtx

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"

	"github.com/jmoiron/sqlx"
)

// Run calls fn inside a transaction on db and commits when fn returns nil.
//
// With immediate set (SQLite), the transaction is opened with BEGIN IMMEDIATE
// on a dedicated connection, whatever the DSN's _txlock says: a deferred
// transaction that reads and then writes fails with SQLITE_BUSY, without
// waiting, when another connection wrote in between; an immediate one waits
// for the write lock under the busy timeout instead.
//
// Without immediate (PostgreSQL), a transaction that the server aborts as a
// deadlock victim or a serialization failure is run again, up to
// MaxAttempts in all, as the PostgreSQL manual advises: the other
// transaction has gone on by then. fn must therefore be safe to call again:
// it starts from scratch each time.
func Run(ctx context.Context, db *sqlx.DB, immediate bool, fn func(tx Tx) error) error {
	if !immediate {
		for attempt := 1; ; attempt++ {
			err := runDeferred(ctx, db, fn)
			if attempt == MaxAttempts || !Retryable(err) || ctx.Err() != nil {
				return err
			}
		}
	}

	conn, err := db.Connx(ctx)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	if err := fn(conn); err != nil {
		rollback(conn)
		return err
	}
	// COMMIT runs without ctx: once fn succeeded, a cancellation must not
	// leave the connection inside a transaction.
	if _, err := conn.ExecContext(context.Background(), "COMMIT"); err != nil {
		rollback(conn)
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// MaxAttempts bounds how many times Run runs a transaction that keeps
// failing as a deadlock victim or by a serialization failure.
const MaxAttempts = 3

// Retryable reports whether err aborted a transaction that can simply be
// run again: SQLSTATE 40P01 (deadlock detected) or 40001 (serialization
// failure). The drivers' errors tell their SQLSTATE through a SQLState
// method (pgconn.PgError does), so no driver is imported here.
func Retryable(err error) bool {
	code := SQLState(err)
	return code == "40P01" || code == "40001"
}

// SQLState returns the SQLSTATE of a PostgreSQL error in err's chain, or
// "" when there is none.
func SQLState(err error) string {
	var e interface{ SQLState() string }
	if !errors.As(err, &e) {
		return ""
	}
	return e.SQLState()
}

func runDeferred(ctx context.Context, db *sqlx.DB, fn func(tx Tx) error) error {
	tx, err := db.BeginTxx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// rollback ends the transaction; if even that fails the connection is
// discarded so it never returns to the pool inside a transaction.
func rollback(conn *sqlx.Conn) {
	if _, err := conn.ExecContext(context.Background(), "ROLLBACK"); err != nil {
		_ = conn.Raw(func(any) error { return driver.ErrBadConn })
	}
}

// Tx is what fn gets: a *sqlx.Tx or, for immediate transactions, a
// *sqlx.Conn inside BEGIN IMMEDIATE.
type Tx interface {
	sqlx.QueryerContext
	sqlx.ExecerContext
	PreparexContext(ctx context.Context, query string) (*sqlx.Stmt, error)
}
