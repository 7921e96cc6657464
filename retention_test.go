package webhooks

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

const day = 24 * time.Hour

// retentionHistory writes delivery history with direct SQL, as of times the
// test picks.
type retentionHistory struct {
	t  testing.TB
	db *sql.DB
}

func (h retentionHistory) exec(query string, args ...any) {
	h.t.Helper()
	if _, err := h.db.ExecContext(context.Background(), query, args...); err != nil {
		h.t.Fatalf("%s: %v", query, err)
	}
}

// event adds an event created at at, expanded then too when expanded is set.
func (h retentionHistory) event(id string, at time.Time, expanded bool) {
	h.t.Helper()
	exp := sql.NullInt64{Int64: at.UnixMilli(), Valid: expanded}
	h.exec(`INSERT INTO webhook_outbox (id, type, tenant, payload, occurred_at, created_at, expanded_at)
VALUES ($1, 'a.b', '', '{}', $2, $3, $4)`, id, at.UnixMilli(), at.UnixMilli(), exp)
}

// delivery adds a delivery of eventID last updated at updated, with
// attempts attempt rows.
func (h retentionHistory) delivery(id, eventID string, state DeliveryState, updated time.Time, attempts int) {
	h.t.Helper()
	ms := updated.UnixMilli()
	h.exec(`INSERT INTO webhook_deliveries (id, event_id, subscription_id, tenant, state, attempts, next_at, created_at, updated_at)
VALUES ($1, $2, $3, '', $4, $5, $6, $7, $8)`, id, eventID, "sub_"+id, string(state), attempts, ms, ms, ms)
	for i := 1; i <= attempts; i++ {
		h.exec(`INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration_ms) VALUES ($1, $2, $3, 1)`, id, i, ms)
	}
}

// ids returns the sorted first column of a query.
func (h retentionHistory) ids(query string) []string {
	h.t.Helper()
	rows, err := h.db.Query(query)
	if err != nil {
		h.t.Fatal(err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			h.t.Fatal(err)
		}
		out = append(out, s)
	}
	if err := rows.Err(); err != nil {
		h.t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

// tableSizes counts events, deliveries and attempts.
func tableSizes(t testing.TB, db *sql.DB) cleanCounts {
	t.Helper()
	return cleanCounts{
		Events:     int64(countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox`)),
		Deliveries: int64(countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries`)),
		Attempts:   int64(countRows(t, db, `SELECT COUNT(*) FROM `+allAttempts)),
	}
}

func newCleaner(t testing.TB, db *sql.DB, cfg Config) *Dispatcher {
	t.Helper()
	d, err := NewDispatcher(db, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func mustClean(t testing.TB, d *Dispatcher, want cleanCounts) {
	t.Helper()
	got, err := d.cleanOnce(context.Background())
	if err != nil {
		t.Fatalf("cleanOnce: %v", err)
	}
	if got != want {
		t.Fatalf("cleanOnce deleted %+v, want %+v", got, want)
	}
}

// waitUntil polls cond, as a hang guard with a generous deadline.
func waitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestRetentionConfig(t *testing.T) {
	for _, tc := range []struct {
		name                   string
		cfg                    Config
		retention, dead, every time.Duration
		batch                  int
		bad                    bool
	}{
		{name: "zero", retention: RetentionDefault, dead: DeadRetentionDefault, every: CleanupIntervalDefault, batch: CleanupBatchSizeDefault},
		{name: "long retention stretches dead", cfg: Config{Retention: 100 * day}, retention: 100 * day, dead: 100 * day,
			every: CleanupIntervalDefault, batch: CleanupBatchSizeDefault},
		{name: "explicit", cfg: Config{Retention: time.Hour, DeadRetention: 2 * time.Hour, CleanupInterval: time.Second, CleanupBatchSize: 3},
			retention: time.Hour, dead: 2 * time.Hour, every: time.Second, batch: 3},
		{name: "equal", cfg: Config{Retention: time.Hour, DeadRetention: time.Hour}, retention: time.Hour, dead: time.Hour,
			every: CleanupIntervalDefault, batch: CleanupBatchSizeDefault},
		{name: "off", cfg: Config{Retention: RetentionForever}, retention: RetentionForever,
			every: CleanupIntervalDefault, batch: CleanupBatchSizeDefault},
		{name: "dead forever", cfg: Config{Retention: time.Hour, DeadRetention: RetentionForever}, retention: time.Hour,
			dead: RetentionForever, every: CleanupIntervalDefault, batch: CleanupBatchSizeDefault},
		{name: "dead shorter", cfg: Config{Retention: 2 * time.Hour, DeadRetention: time.Hour}, bad: true},
		{name: "dead shorter than default", cfg: Config{DeadRetention: day}, bad: true},
		{name: "dead shorter than forever", cfg: Config{Retention: RetentionForever, DeadRetention: day}, bad: true},
		{name: "negative interval", cfg: Config{CleanupInterval: -time.Second}, bad: true},
		{name: "negative batch", cfg: Config{CleanupBatchSize: -1}, bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			err := cfg.setDefaults()
			if tc.bad {
				if !errors.Is(err, ErrInvalidConfig) {
					t.Fatalf("setDefaults: %v, want ErrInvalidConfig", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Retention != tc.retention || cfg.DeadRetention != tc.dead || cfg.CleanupInterval != tc.every || cfg.CleanupBatchSize != tc.batch {
				t.Fatalf("got Retention %v, DeadRetention %v, CleanupInterval %v, CleanupBatchSize %d; want %v, %v, %v, %d",
					cfg.Retention, cfg.DeadRetention, cfg.CleanupInterval, cfg.CleanupBatchSize, tc.retention, tc.dead, tc.every, tc.batch)
			}
		})
	}
	if _, err := NewDispatcher(openTestDB(t), Config{Retention: 2 * time.Hour, DeadRetention: time.Hour}); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("NewDispatcher: %v, want ErrInvalidConfig", err)
	}
}

func TestRetentionCleanBackoff(t *testing.T) {
	for _, tc := range []struct {
		interval time.Duration
		failures int
		want     time.Duration
	}{
		{time.Minute, 1, time.Minute},
		{time.Minute, 2, 2 * time.Minute},
		{time.Minute, 4, 8 * time.Minute},
		{time.Minute, 6, cleanMaxBackoff},
		{time.Minute, 1000, cleanMaxBackoff},
		{2 * time.Hour, 3, 2 * time.Hour}, // never more often than the interval
	} {
		if got := cleanBackoff(tc.interval, tc.failures); got != tc.want {
			t.Errorf("cleanBackoff(%v, %d) = %v, want %v", tc.interval, tc.failures, got, tc.want)
		}
	}
}

func TestRetentionDeletesOnlyExpiredHistory(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		d := newCleaner(t, db, Config{Clock: clock}) // default retention: 30 and 90 days
		h := retentionHistory{t, db}
		now := clock.Now()
		old, young, ancient := now.Add(-31*day), now.Add(-29*day), now.Add(-91*day)

		h.event("e_old_ok", old, true)
		h.delivery("d_old_ok", "e_old_ok", DeliverySucceeded, old, 2)
		h.event("e_young_ok", young, true)
		h.delivery("d_young_ok", "e_young_ok", DeliverySucceeded, young, 1)
		h.event("e_old_canceled", old, true)
		h.delivery("d_old_canceled", "e_old_canceled", DeliveryCanceled, old, 1)
		h.event("e_old_dead", old, true)
		h.delivery("d_old_dead", "e_old_dead", DeliveryDead, old, 3)
		h.event("e_ancient_dead", ancient, true)
		h.delivery("d_ancient_dead", "e_ancient_dead", DeliveryDead, ancient, 2)
		h.event("e_pending", ancient, true)
		h.delivery("d_pending", "e_pending", DeliveryPending, ancient, 4)
		h.event("e_delivering", ancient, true)
		h.delivery("d_delivering", "e_delivering", DeliveryDelivering, ancient, 1)
		h.event("e_unexpanded", ancient, false)
		h.event("e_old_none", old, true)
		h.event("e_young_none", young, true)
		h.event("e_mixed", old, true) // one delivery done, one still pending
		h.delivery("d_mixed_ok", "e_mixed", DeliverySucceeded, old, 1)
		h.delivery("d_mixed_pending", "e_mixed", DeliveryPending, old, 1)
		h.event("e_retried", old, true) // old event, succeeded only lately
		h.delivery("d_retried", "e_retried", DeliverySucceeded, young, 5)

		mustClean(t, d, cleanCounts{Deliveries: 4, Attempts: 2 + 1 + 2 + 1, Events: 4})
		wantDeliveries := []string{"d_delivering", "d_mixed_pending", "d_old_dead", "d_pending", "d_retried", "d_young_ok"}
		wantEvents := []string{"e_delivering", "e_mixed", "e_old_dead", "e_pending", "e_retried", "e_unexpanded", "e_young_none", "e_young_ok"}
		check := func() {
			t.Helper()
			if got := h.ids(`SELECT id FROM webhook_deliveries`); !slices.Equal(got, wantDeliveries) {
				t.Fatalf("deliveries left %v, want %v", got, wantDeliveries)
			}
			if got := h.ids(`SELECT id FROM webhook_outbox`); !slices.Equal(got, wantEvents) {
				t.Fatalf("events left %v, want %v", got, wantEvents)
			}
			if got := h.ids(`SELECT DISTINCT delivery_id FROM ` + allAttempts); !slices.Equal(got, wantDeliveries) {
				t.Fatalf("attempts left for %v, want those of %v", got, wantDeliveries)
			}
		}
		check()
		mustClean(t, d, cleanCounts{}) // nothing more is due

		// 60 days on, the dead delivery (91 days) goes with its event, and
		// so does everything finished but pending and delivering ones.
		clock.Advance(60 * day)
		mustClean(t, d, cleanCounts{Deliveries: 3, Attempts: 1 + 3 + 5, Events: 4})
		wantDeliveries = []string{"d_delivering", "d_mixed_pending", "d_pending"}
		wantEvents = []string{"e_delivering", "e_mixed", "e_pending", "e_unexpanded"}
		check()
		if n := countRows(t, db, `SELECT COUNT(*) FROM `+allAttempts); n != 4+1+1 {
			t.Fatalf("%d attempts left, want 6", n)
		}
	})
}

func TestRetentionDeadForeverAndDisabled(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		h := retentionHistory{t, db}
		ancient := clock.Now().Add(-1000 * day)
		h.event("e_ok", ancient, true)
		h.delivery("d_ok", "e_ok", DeliverySucceeded, ancient, 1)
		h.event("e_dead", ancient, true)
		h.delivery("d_dead", "e_dead", DeliveryDead, ancient, 1)
		h.event("e_none", ancient, true)

		off := newCleaner(t, db, Config{Clock: clock, Retention: RetentionForever})
		mustClean(t, off, cleanCounts{})
		if got := tableSizes(t, db); got != (cleanCounts{Deliveries: 2, Attempts: 2, Events: 3}) {
			t.Fatalf("retention off deleted rows: %+v left", got)
		}

		deadForever := newCleaner(t, db, Config{Clock: clock, Retention: time.Hour, DeadRetention: RetentionForever})
		mustClean(t, deadForever, cleanCounts{Deliveries: 1, Attempts: 1, Events: 2})
		if got := h.ids(`SELECT id FROM webhook_deliveries`); !slices.Equal(got, []string{"d_dead"}) {
			t.Fatalf("deliveries left %v, want only the dead one", got)
		}
		if got := h.ids(`SELECT id FROM webhook_outbox`); !slices.Equal(got, []string{"e_dead"}) {
			t.Fatalf("events left %v, want only the dead delivery's", got)
		}
	})
}

func TestRetentionDeletesInBatches(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		const batch, n, bare = 7, 3*7 + 2, 10
		d := newCleaner(t, db, Config{Clock: clock, Retention: time.Hour, CleanupBatchSize: batch})
		h := retentionHistory{t, db}
		old := clock.Now().Add(-2 * time.Hour)
		for i := 0; i < n; i++ {
			h.event(fmt.Sprintf("e%02d", i), old, true)
			h.delivery(fmt.Sprintf("d%02d", i), fmt.Sprintf("e%02d", i), DeliverySucceeded, old.Add(time.Duration(i)*time.Millisecond), 2)
		}
		for i := 0; i < bare; i++ {
			h.event(fmt.Sprintf("bare%02d", i), old, true)
		}
		q, err := d.dialect.RetentionQueries()
		if err != nil {
			t.Fatal(err)
		}
		cutoff := clock.Now().Add(-time.Hour).UnixMilli()

		// One transaction deletes one batch, oldest first.
		from := int64(math.MinInt64)
		got, err := d.cleanDeliveryBatch(context.Background(), q, cutoff, cutoff, &from)
		if err != nil {
			t.Fatal(err)
		}
		if got != (cleanCounts{Deliveries: batch, Attempts: 2 * batch}) {
			t.Fatalf("one delivery batch deleted %+v", got)
		}
		if left := h.ids(`SELECT id FROM webhook_deliveries`); left[0] != fmt.Sprintf("d%02d", batch) {
			t.Fatalf("the batch did not take the oldest deliveries: %v left", left)
		}
		got, err = d.cleanEventBatch(context.Background(), q, cutoff)
		if err != nil {
			t.Fatal(err)
		}
		if got != (cleanCounts{Events: batch}) {
			t.Fatalf("one event batch deleted %+v (candidates: %d)", got, batch+bare)
		}

		// A pass runs batches until nothing is left.
		mustClean(t, d, cleanCounts{Deliveries: n - batch, Attempts: 2 * (n - batch), Events: n + bare - batch})
		if got := tableSizes(t, db); got != (cleanCounts{}) {
			t.Fatalf("rows left after a pass: %+v", got)
		}
	})
}

func TestRetentionStopsWhenContextEnds(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		d := newCleaner(t, db, Config{Clock: clock, Retention: time.Hour})
		h := retentionHistory{t, db}
		old := clock.Now().Add(-2 * time.Hour)
		h.event("e", old, true)
		h.delivery("d", "e", DeliverySucceeded, old, 1)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := d.cleanOnce(ctx); !errors.Is(err, context.Canceled) {
			t.Fatalf("cleanOnce with an ended context: %v, want context.Canceled", err)
		}
		if got := tableSizes(t, db); got != (cleanCounts{Deliveries: 1, Attempts: 1, Events: 1}) {
			t.Fatalf("rows deleted after the context ended: %+v left", got)
		}
	})
}

func TestRetentionConcurrentCleaners(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		const n, cleaners = 300, 4
		h := retentionHistory{t, db}
		old := clock.Now().Add(-2 * time.Hour)
		for i := 0; i < n; i++ {
			h.event(fmt.Sprintf("e%03d", i), old, true)
			h.delivery(fmt.Sprintf("d%03d", i), fmt.Sprintf("e%03d", i), DeliverySucceeded, old, 1)
		}
		var (
			wg    sync.WaitGroup
			mu    sync.Mutex
			total cleanCounts
			errs  []error
		)
		for i := 0; i < cleaners; i++ {
			d := newCleaner(t, db, Config{Clock: clock, Retention: time.Hour, CleanupBatchSize: 5})
			wg.Add(1)
			go func() {
				defer wg.Done()
				got, err := d.cleanOnce(context.Background())
				mu.Lock()
				defer mu.Unlock()
				total.add(got)
				if err != nil {
					errs = append(errs, err)
				}
			}()
		}
		wg.Wait()
		if len(errs) > 0 {
			t.Fatalf("concurrent cleaners failed: %v", errs)
		}
		// Every row is deleted exactly once, and none is left behind.
		if total != (cleanCounts{Deliveries: n, Attempts: n, Events: n}) {
			t.Fatalf("cleaners deleted %+v in all, want %d of each", total, n)
		}
		if got := tableSizes(t, db); got != (cleanCounts{}) {
			t.Fatalf("rows left: %+v", got)
		}
	})
}

// TestRetentionKeepsTablesBoundedUnderLoad delivers rounds of events through
// a running dispatcher to real receivers, an hour of (fake) time apart, and
// cleans after each: with three hours' retention the tables settle at four
// rounds' worth of rows instead of growing.
func TestRetentionKeepsTablesBoundedUnderLoad(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		var rcs []*receiver
		for i := 0; i < 2; i++ {
			rc := newReceiver(t, nil)
			rc.ignoreTimestamps() // the fake clock runs hours ahead
			mustSubscribe(t, subs, rc, "", "*")
			rcs = append(rcs, rc)
		}
		// The background cleaner is left to its (far) interval; the test
		// cleans itself after each round, while the dispatcher runs.
		d, _ := startDispatcher(t, db, Config{Clock: clock, Retention: 3 * time.Hour, CleanupInterval: time.Hour, CleanupBatchSize: 16})
		const perRound, rounds = 20, 8
		for round := 0; round < rounds; round++ {
			clock.Advance(time.Hour)
			before := tableSizes(t, db)
			events := make([]Event, perRound)
			for i := range events {
				events[i] = Event{Type: "order.placed", Data: map[string]any{"round": round, "i": i}}
			}
			publishTx(t, db, events...)
			d.Notify()
			for _, rc := range rcs {
				rc.wait(perRound)
			}
			want := before.Deliveries + 2*perRound
			waitUntil(t, "the round's deliveries to be recorded", func() bool {
				return countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'succeeded'`) == int(want) &&
					countRows(t, db, `SELECT COUNT(*) FROM `+allAttempts) == int(want)
			})
			got, err := d.cleanOnce(context.Background())
			if err != nil {
				t.Fatalf("round %d: cleanOnce: %v", round, err)
			}
			kept := int64(min(round+1, 4)) // rows of the last three hours and of now
			if sizes := tableSizes(t, db); sizes != (cleanCounts{Events: kept * perRound, Deliveries: kept * 2 * perRound, Attempts: kept * 2 * perRound}) {
				t.Fatalf("round %d: table sizes %+v after cleaning (deleted %+v), want %d rounds' worth", round, sizes, got, kept)
			}
			if round >= 4 && got != (cleanCounts{Events: perRound, Deliveries: 2 * perRound, Attempts: 2 * perRound}) {
				t.Fatalf("round %d: deleted %+v, want one round's worth", round, got)
			}
		}
	})
}

// retentionLogs records the dispatcher's log records.
type retentionLogs struct{ ch chan slog.Record }

func (h *retentionLogs) Enabled(context.Context, slog.Level) bool { return true }
func (h *retentionLogs) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *retentionLogs) WithGroup(string) slog.Handler            { return h }
func (h *retentionLogs) Handle(_ context.Context, r slog.Record) error {
	select {
	case h.ch <- r.Clone():
	default:
	}
	return nil
}

// TestRetentionCleanerRunsInRun checks the cleaner Run starts: it deletes
// expired history by itself, logs database errors and retries with growing
// delays instead of failing, and has exited when Shutdown returns.
func TestRetentionCleanerRunsInRun(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		rc := newReceiver(t, nil)
		rc.ignoreTimestamps()
		mustSubscribe(t, subs, rc, "", "*")
		logs := &retentionLogs{ch: make(chan slog.Record, 1000)}
		const every = 2 * time.Millisecond
		_, stop := startDispatcher(t, db, Config{Clock: clock, Retention: time.Hour, CleanupInterval: every, Logger: slog.New(logs)})

		// Through real delivery: the delivery goes once it is an hour old.
		publishTx(t, db, Event{Type: "a.b"})
		rc.wait(1)
		waitUntil(t, "the delivery to be recorded", func() bool {
			return countRows(t, db, `SELECT COUNT(*) FROM `+allAttempts) == 1
		})
		if got := tableSizes(t, db); got != (cleanCounts{Events: 1, Deliveries: 1, Attempts: 1}) {
			t.Fatalf("young history deleted: %+v left", got)
		}
		clock.Advance(time.Hour + time.Millisecond)
		waitUntil(t, "the cleaner to delete the history", func() bool { return tableSizes(t, db) == cleanCounts{} })

		// A failing database is logged, with a growing retry delay.
		h := retentionHistory{t, db}
		h.exec(`ALTER TABLE webhook_attempts RENAME TO webhook_attempts_away`)
		old := clock.Now().Add(-2 * time.Hour)
		h.event("e", old, true)
		h.delivery("d", "e", DeliverySucceeded, old, 0)
		var delays []time.Duration
		deadline := time.After(60 * time.Second)
		for len(delays) < 3 {
			select {
			case r := <-logs.ch:
				if r.Level != slog.LevelError || !strings.HasPrefix(r.Message, "webhooks: cleaner:") {
					continue
				}
				r.Attrs(func(a slog.Attr) bool {
					if a.Key == "retry_in" {
						delays = append(delays, a.Value.Duration())
					}
					return true
				})
			case <-deadline:
				t.Fatalf("no cleaner error logged (%d so far)", len(delays))
			}
		}
		if delays[0] != every || delays[1] != 2*every || delays[2] != 4*every {
			t.Fatalf("retry delays %v, want %v doubling", delays, every)
		}
		h.exec(`ALTER TABLE webhook_attempts_away RENAME TO webhook_attempts`)
		waitUntil(t, "the cleaner to recover", func() bool { return tableSizes(t, db) == cleanCounts{} })

		stop() // fails the test unless Run returns ErrDispatcherClosed
		waitGoroutinesGone(t, "the cleaner's goroutines", "(*Dispatcher).runCleaner", "(*Dispatcher).startCleaner")
	})
}
