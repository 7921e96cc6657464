// Package postgres opens PostgreSQL databases for outboxhook through pgx's
// database/sql adapter (github.com/jackc/pgx/v5/stdlib), so the application
// keeps using *sql.DB, *sqlx.DB and *sql.Tx for its own data and passes the
// same handle to the webhooks package.
//
// Any *sql.DB opened with the "pgx" driver works; this package only adds a
// ping and pool settings suited to several dispatcher replicas.
package postgres

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
)

// DriverName is the database/sql driver name pgx registers.
const DriverName = "pgx"

// Open connects to the PostgreSQL database at dsn (a URL such as
// "postgres://user@host:5432/db" or a key=value string) and checks that it
// answers.
func Open(ctx context.Context, dsn string) (*sql.DB, error) {
	db, err := sql.Open(DriverName, dsn)
	if err != nil {
		return nil, fmt.Errorf("postgres: open: %w", err)
	}
	// Connections are recycled now and then so a replica rebalances after a
	// failover; idle ones are kept for the dispatcher's steady work.
	db.SetConnMaxLifetime(30 * time.Minute)
	db.SetMaxIdleConns(8)
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("postgres: connect: %w", err)
	}
	return db, nil
}
