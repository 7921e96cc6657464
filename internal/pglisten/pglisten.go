// Package pglisten turns PostgreSQL notifications on a channel into calls of
// a wake function, over a dedicated connection of a database/sql pool opened
// with pgx's stdlib driver.
package pglisten

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
)

// ErrNotPgx is returned when the pool's driver is not pgx: there is no way to
// LISTEN then, and the caller falls back to polling.
var ErrNotPgx = errors.New("pglisten: connection is not a pgx connection")

// Run listens on channel until ctx ends, calling wake for every notification
// and once each time listening (re)starts, since notifications sent while it
// was not listening are lost. After a failure (for instance a database
// restart) it calls onErr and tries again with growing delays of up to
// maxBackoff.
func Run(ctx context.Context, db *sql.DB, channel string, wake func(), onErr func(error), maxBackoff time.Duration) error {
	backoff := 50 * time.Millisecond
	for {
		started := time.Now()
		err := listen(ctx, db, channel, wake)
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, ErrNotPgx) {
			return err
		}
		onErr(err)
		if time.Since(started) > maxBackoff {
			backoff = 50 * time.Millisecond // it worked for a while
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(backoff*2, maxBackoff)
	}
}

func listen(ctx context.Context, db *sql.DB, channel string, wake func()) error {
	conn, err := db.Conn(ctx)
	if err != nil {
		return fmt.Errorf("pglisten: connect: %w", err)
	}
	defer func() {
		// Never hand a listening connection back to the pool.
		_ = conn.Raw(func(any) error { return driver.ErrBadConn })
		conn.Close()
	}()
	return conn.Raw(func(dc any) error {
		sc, ok := dc.(*stdlib.Conn)
		if !ok {
			return ErrNotPgx
		}
		pc := sc.Conn()
		if _, err := pc.Exec(ctx, "LISTEN "+pgx.Identifier{channel}.Sanitize()); err != nil {
			return fmt.Errorf("pglisten: listen: %w", err)
		}
		wake()
		for {
			if _, err := pc.WaitForNotification(ctx); err != nil {
				return fmt.Errorf("pglisten: wait: %w", err)
			}
			wake()
		}
	})
}
