package webhooks

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/outboxhook/webhooks/internal/dbtx"
	"github.com/outboxhook/webhooks/store"
)

// The retention cleaner: while Run runs, every CleanupInterval it deletes
// the delivery history that Config.Retention and Config.DeadRetention let
// go, in transactions of at most CleanupBatchSize rows with a pause between
// them, so that on SQLite the write lock is never held for longer than one
// small batch and deliveries are not held up. Nothing that still matters is
// deleted: pending and delivering deliveries are never touched, and an event
// goes only once it is expanded and has no delivery left.

// cleanCounts is what the cleaner deleted.
type cleanCounts struct {
	Deliveries, Attempts, Events int64
}

func (n *cleanCounts) add(m cleanCounts) {
	n.Deliveries += m.Deliveries
	n.Attempts += m.Attempts
	n.Events += m.Events
}

// Pacing of the cleaner.
const (
	// cleanMinPause is the shortest pause between two batches. The pause
	// is also at least as long as the batch before it took, so the cleaner
	// holds the write lock at most about half the time while it works.
	cleanMinPause = 10 * time.Millisecond
	// cleanMaxBackoff bounds how long the cleaner waits after failures
	// (unless CleanupInterval is longer).
	cleanMaxBackoff = 30 * time.Minute
)

// setRetentionDefaults validates the retention fields and fills in their
// defaults.
func (c *Config) setRetentionDefaults() error {
	switch {
	case c.CleanupInterval < 0:
		return fmt.Errorf("%w: negative CleanupInterval", ErrInvalidConfig)
	case c.CleanupBatchSize < 0:
		return fmt.Errorf("%w: negative CleanupBatchSize", ErrInvalidConfig)
	}
	setDefault(&c.CleanupInterval, CleanupIntervalDefault)
	setDefault(&c.CleanupBatchSize, CleanupBatchSizeDefault)
	if c.Retention < 0 {
		if c.DeadRetention > 0 {
			return fmt.Errorf("%w: DeadRetention %v with Retention forever: dead deliveries must be kept at least as long as the others",
				ErrInvalidConfig, c.DeadRetention)
		}
		return nil
	}
	setDefault(&c.Retention, RetentionDefault)
	if c.DeadRetention == 0 {
		c.DeadRetention = max(DeadRetentionDefault, c.Retention)
	}
	if c.DeadRetention > 0 && c.DeadRetention < c.Retention {
		return fmt.Errorf("%w: DeadRetention %v must not be shorter than Retention %v",
			ErrInvalidConfig, c.DeadRetention, c.Retention)
	}
	return nil
}

// startCleaner starts the cleaner, unless retention is off, and returns the
// function that stops it and waits for its goroutines to exit. The cleaner
// stops by itself when ctx ends or Shutdown is called.
func (d *Dispatcher) startCleaner(ctx context.Context) (stop func()) {
	if d.cfg.Retention < 0 {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		select {
		case <-d.stopping:
			cancel() // stop at once, even in the middle of a pass
		case <-ctx.Done():
		}
	}()
	go func() {
		defer wg.Done()
		d.runCleaner(ctx)
	}()
	return func() {
		cancel()
		wg.Wait()
	}
}

// runCleaner runs a cleaner pass every CleanupInterval until ctx ends.
// Failures are logged and retried later, with growing delays while they go
// on; they never stop the dispatcher.
func (d *Dispatcher) runCleaner(ctx context.Context) {
	timer := time.NewTimer(d.cfg.CleanupInterval)
	defer timer.Stop()
	failures := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		n, err := d.cleanOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		delay := d.cfg.CleanupInterval
		if err != nil {
			failures++
			delay = cleanBackoff(d.cfg.CleanupInterval, failures)
			d.log.Error("webhooks: cleaner: deleting expired history failed", slog.Any("error", err),
				slog.Duration("retry_in", delay), slog.Int64("deliveries", n.Deliveries), slog.Int64("events", n.Events))
		} else {
			failures = 0
			if n != (cleanCounts{}) {
				d.log.Debug("webhooks: cleaner: deleted expired history", slog.Int64("deliveries", n.Deliveries),
					slog.Int64("attempts", n.Attempts), slog.Int64("events", n.Events))
			}
		}
		timer.Reset(delay)
	}
}

// cleanBackoff is the wait after the given number of consecutive failed
// passes: the interval doubled per failure beyond the first, up to
// cleanMaxBackoff (or the interval itself, if that is longer).
func cleanBackoff(interval time.Duration, failures int) time.Duration {
	limit := max(interval, cleanMaxBackoff)
	delay := interval
	for i := 1; i < failures && delay < limit; i++ {
		delay *= 2
	}
	return min(delay, limit)
}

// cleanOnce deletes, in batches, the finished deliveries (with their
// attempts) and then the events that retention lets go, as of the clock's
// now. It returns what it deleted, also when it fails part way (the
// batches committed before stay deleted). It stops when ctx ends.
func (d *Dispatcher) cleanOnce(ctx context.Context) (cleanCounts, error) {
	var n cleanCounts
	if d.cfg.Retention < 0 {
		return n, nil
	}
	q, err := d.dialect.RetentionQueries()
	if err != nil {
		return n, fmt.Errorf("webhooks: cleaner: %w", err)
	}
	now := d.clock.Now()
	cutoff := now.Add(-d.cfg.Retention).UnixMilli()
	deadCutoff := int64(math.MinInt64) // dead deliveries kept forever
	if d.cfg.DeadRetention >= 0 {
		deadCutoff = now.Add(-d.cfg.DeadRetention).UnixMilli()
	}
	// Between two transactions the cleaner pauses at least as long as the
	// last one took, so other writers get the lock.
	var took time.Duration
	first := true
	batches := func(batch func() (cleanCounts, int64, error)) error {
		for {
			if !first {
				if err := pause(ctx, max(took, cleanMinPause)); err != nil {
					return err
				}
			}
			first = false
			start := time.Now()
			m, rows, err := batch()
			took = time.Since(start)
			n.add(m)
			if err != nil || rows < int64(d.cfg.CleanupBatchSize) {
				return err
			}
		}
	}
	from := int64(math.MinInt64)
	err = batches(func() (cleanCounts, int64, error) {
		m, err := d.cleanDeliveryBatch(ctx, q, cutoff, deadCutoff, &from)
		return m, m.Deliveries, err
	})
	if err == nil {
		err = batches(func() (cleanCounts, int64, error) {
			m, err := d.cleanEventBatch(ctx, q, cutoff)
			return m, m.Events, err
		})
	}
	return n, err
}

// cleanDeliveryBatch deletes up to CleanupBatchSize expired deliveries and
// their attempts in one transaction.
// from is where the pass is (an update time, inclusive); it moves to the
// last deleted delivery's.
func (d *Dispatcher) cleanDeliveryBatch(ctx context.Context, q store.RetentionQueries, cutoff, deadCutoff int64, from *int64) (cleanCounts, error) {
	var n cleanCounts
	last := *from
	err := d.inTx(ctx, func(tx dbtx.Tx) error {
		n = cleanCounts{}
		var rows []struct {
			ID        string `db:"id"`
			UpdatedAt int64  `db:"updated_at"`
			Inline    bool   `db:"inline"` // its first attempt goes with it
		}
		if err := sqlx.SelectContext(ctx, tx, &rows, q.SelectExpiredDeliveries, cutoff, deadCutoff, *from, d.cfg.CleanupBatchSize); err != nil {
			return fmt.Errorf("select expired deliveries: %w", err)
		}
		if len(rows) == 0 {
			return nil
		}
		ids := make([]string, len(rows))
		for i, r := range rows {
			ids[i] = r.ID
		}
		last = rows[len(rows)-1].UpdatedAt
		idsJSON, err := json.Marshal(ids)
		if err != nil {
			return fmt.Errorf("encode delivery IDs: %w", err)
		}
		res, err := tx.ExecContext(ctx, q.DeleteDeliveryAttempts, string(idsJSON))
		if err != nil {
			return fmt.Errorf("delete attempts: %w", err)
		}
		if n.Attempts, err = res.RowsAffected(); err != nil {
			return fmt.Errorf("delete attempts: %w", err)
		}
		for _, r := range rows {
			if r.Inline {
				n.Attempts++
			}
		}
		if res, err = tx.ExecContext(ctx, q.DeleteDeliveries, string(idsJSON)); err != nil {
			return fmt.Errorf("delete deliveries: %w", err)
		}
		if n.Deliveries, err = res.RowsAffected(); err != nil {
			return fmt.Errorf("delete deliveries: %w", err)
		}
		return nil
	})
	if err != nil {
		return cleanCounts{}, fmt.Errorf("webhooks: cleaner: %w", err)
	}
	*from = last
	return n, nil
}

// cleanEventBatch deletes up to CleanupBatchSize expired events that have
// no delivery left, in one transaction.
func (d *Dispatcher) cleanEventBatch(ctx context.Context, q store.RetentionQueries, cutoff int64) (cleanCounts, error) {
	var n cleanCounts
	err := d.inTx(ctx, func(tx dbtx.Tx) error {
		res, err := tx.ExecContext(ctx, q.DeleteExpiredEvents, cutoff, d.cfg.CleanupBatchSize)
		if err != nil {
			return fmt.Errorf("delete expired events: %w", err)
		}
		n.Events, err = res.RowsAffected()
		if err != nil {
			return fmt.Errorf("delete expired events: %w", err)
		}
		return nil
	})
	if err != nil {
		return cleanCounts{}, fmt.Errorf("webhooks: cleaner: %w", err)
	}
	return n, nil
}

// pause waits for d, or returns ctx's error when ctx ends first.
func pause(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
