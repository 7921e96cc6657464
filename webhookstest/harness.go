package webhookstest

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outboxhook/webhooks"
	"github.com/outboxhook/webhooks/store/sqlite"
)

// Harness defaults that differ from webhooks.Config's.
const (
	// PollIntervalDefault is the Harness's Config.PollInterval when the
	// caller leaves it zero: short, so that immediate retries
	// (ImmediateRetries) happen within milliseconds.
	PollIntervalDefault = 10 * time.Millisecond
	// CloseTimeout bounds how long the Harness's cleanup waits for the
	// deliveries in flight before it aborts them.
	CloseTimeout = 10 * time.Second
)

// LoopbackNetworks returns 127.0.0.0/8 and ::1/128, where Receivers listen.
// A Harness allows them in Config.AllowedNetworks.
func LoopbackNetworks() []netip.Prefix {
	return []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}
}

// ImmediateRetries returns a retry policy that retries a failed delivery at
// once, n times, before the delivery is dead (n <= 0: never retries). A
// Retry-After header still delays a retry, as with any ExponentialBackoff.
func ImmediateRetries(n int) webhooks.ExponentialBackoff {
	return webhooks.ExponentialBackoff{Schedule: make([]time.Duration, max(n, 0)), Jitter: -1}
}

// Harness is a running webhooks.Dispatcher over its own migrated SQLite
// database, with the Subscriptions store of that database.
type Harness struct {
	// DB is the SQLite database, opened with store/sqlite.Open and migrated.
	DB *sql.DB
	// Subscriptions manages the subscriptions and reads the deliveries.
	Subscriptions *webhooks.Subscriptions
	// Dispatcher is running (Run in its own goroutine) until Stop or Close.
	Dispatcher *webhooks.Dispatcher
	// Config is the configuration the dispatcher was created with, harness
	// defaults applied.
	Config webhooks.Config

	runErr chan error

	mu        sync.Mutex
	receivers []*Receiver

	stopMu  sync.Mutex
	stopped bool
	stopErr error

	closeOnce sync.Once
	closeErr  error
}

// NewHarness starts a Harness whose database lives in t.TempDir(), and
// stops it when the test ends (t.Cleanup): it releases the requests held by
// the subscribed Receivers, shuts the dispatcher down (waiting up to
// CloseTimeout for the deliveries in flight), waits for Run to return, so no
// goroutine is left behind, and closes the database. Errors end the test
// (t.Fatal); call it from the test's goroutine.
//
// cfg is given to webhooks.NewDispatcher with these changes:
//
//   - AllowedNetworks, when nil and HTTPClient is nil, is LoopbackNetworks().
//     The dispatcher's default HTTP client refuses loopback and private
//     addresses at dial time (SSRF protection), and Receivers listen on
//     127.0.0.1; without this every delivery to a Receiver would fail. A
//     non-nil AllowedNetworks (or an HTTPClient) is kept as given.
//   - PollInterval, when zero, is PollIntervalDefault.
//   - Logger, when nil, writes warnings and errors to t.Log.
//
// cfg.Clock, if set, is also the clock of the Subscriptions store and of
// Publish.
func NewHarness(t testing.TB, cfg webhooks.Config) *Harness {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(testLog{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	h, err := StartHarness(context.Background(), filepath.Join(t.TempDir(), "webhooks.db"), cfg)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), CloseTimeout)
		defer cancel()
		if err := h.Close(ctx); err != nil {
			if errors.Is(err, context.DeadlineExceeded) {
				// Deliveries still in flight were aborted: not a failure of
				// the test, but worth knowing.
				t.Logf("%v", err)
				return
			}
			t.Errorf("%v", err)
		}
	})
	return h
}

// StartHarness is NewHarness outside a test (for example in a runnable
// example or a TestMain): the database is the file at path (created if
// needed), errors are returned, and the caller must call Close. A nil
// cfg.Logger means slog.Default().
func StartHarness(ctx context.Context, path string, cfg webhooks.Config) (*Harness, error) {
	if cfg.Dialect != "" && cfg.Dialect != webhooks.DialectSQLite {
		return nil, fmt.Errorf("webhookstest: %w: the harness database is SQLite, not %q", webhooks.ErrInvalidConfig, string(cfg.Dialect))
	}
	if cfg.AllowedNetworks == nil && cfg.HTTPClient == nil {
		cfg.AllowedNetworks = LoopbackNetworks()
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = PollIntervalDefault
	}
	db, err := sqlite.Open(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("webhookstest: %w", err)
	}
	if err := webhooks.Migrate(ctx, db); err != nil {
		db.Close()
		return nil, fmt.Errorf("webhookstest: %w", err)
	}
	subs, err := webhooks.NewSubscriptions(db, webhooks.SubscriptionsConfig{Dialect: cfg.Dialect, Clock: cfg.Clock})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("webhookstest: %w", err)
	}
	disp, err := webhooks.NewDispatcher(db, cfg)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("webhookstest: %w", err)
	}
	h := &Harness{DB: db, Subscriptions: subs, Dispatcher: disp, Config: cfg, runErr: make(chan error, 1)}
	go func() { h.runErr <- disp.Run(context.Background()) }()
	return h, nil
}

// Publish publishes events in one transaction, commits it and wakes the
// dispatcher (Notify). It returns the events' IDs. An event without
// OccurredAt gets the time of Config.Clock. Errors of
// webhooks.PublishBatch are wrapped (errors.Is works with
// webhooks.ErrInvalidEvent, webhooks.ErrDuplicateEvent, ...), and then
// nothing is published.
func (h *Harness) Publish(ctx context.Context, events ...webhooks.Event) ([]string, error) {
	if len(events) == 0 {
		return nil, nil
	}
	tx, err := h.DB.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("webhookstest: publish: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // no-op after Commit
	p := webhooks.Publisher{Clock: h.Config.Clock}
	ids, err := p.PublishBatch(ctx, tx, events...)
	if err != nil {
		return nil, fmt.Errorf("webhookstest: publish: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("webhookstest: publish: commit: %w", err)
	}
	h.Dispatcher.Notify()
	return ids, nil
}

// Subscribe creates a subscription of tenant to eventTypes ("*" when none
// are given) whose URL is the receiver's, and makes the receiver accept its
// generated secret (Receiver.AddSecret) and, when the Harness has a
// Config.Clock, judge timestamps by that clock (Receiver.SetClock). The
// receiver's held requests are released when the Harness closes.
func (h *Harness) Subscribe(ctx context.Context, r *Receiver, tenant string, eventTypes ...string) (webhooks.Subscription, error) {
	if r == nil {
		return webhooks.Subscription{}, errors.New("webhookstest: subscribe: nil Receiver")
	}
	if len(eventTypes) == 0 {
		eventTypes = []string{"*"}
	}
	sub, err := h.Subscriptions.Create(ctx, webhooks.Subscription{
		Tenant: tenant, URL: r.URL(), EventTypes: append([]string(nil), eventTypes...),
	})
	if err != nil {
		return webhooks.Subscription{}, fmt.Errorf("webhookstest: subscribe: %w", err)
	}
	if err := r.AddSecret(sub.Secret); err != nil {
		return webhooks.Subscription{}, fmt.Errorf("webhookstest: subscribe: %w", err)
	}
	if h.Config.Clock != nil {
		r.SetClock(h.Config.Clock)
	}
	h.mu.Lock()
	h.receivers = append(h.receivers, r)
	h.mu.Unlock()
	return sub, nil
}

// Deliveries returns every delivery of the subscription sub, oldest first,
// with their attempts.
func (h *Harness) Deliveries(ctx context.Context, sub webhooks.Subscription) ([]webhooks.Delivery, error) {
	var out []webhooks.Delivery
	opts := webhooks.DeliveryListOptions{Limit: webhooks.ListLimitMax}
	for {
		page, err := h.Subscriptions.ListDeliveries(ctx, sub.Tenant, sub.ID, opts)
		if err != nil {
			return out, fmt.Errorf("webhookstest: deliveries of %s: %w", sub.ID, err)
		}
		out = append(out, page.Deliveries...)
		if page.NextCursor == "" {
			return out, nil
		}
		opts.Cursor = page.NextCursor
	}
}

// WaitDeliveries reads the deliveries of sub at every Config.PollInterval
// until done returns true for them, and returns them. The dispatcher
// records an attempt shortly after the receiver answered it; this waits for
// that. When ctx ends first it returns the last deliveries read and an error
// wrapping ctx's error. To wait for everything in flight to be recorded
// without polling, use Stop.
func (h *Harness) WaitDeliveries(ctx context.Context, sub webhooks.Subscription, done func([]webhooks.Delivery) bool) ([]webhooks.Delivery, error) {
	ticker := time.NewTicker(h.Config.PollInterval)
	defer ticker.Stop()
	for {
		ds, err := h.Deliveries(ctx, sub)
		if err == nil && done(ds) {
			return ds, nil
		}
		if err != nil && ctx.Err() == nil {
			return ds, err
		}
		select {
		case <-ticker.C:
		case <-ctx.Done():
			return ds, fmt.Errorf("webhookstest: waiting for the deliveries of %s (%s): %w", sub.ID, summary(ds), ctx.Err())
		}
	}
}

// summary describes deliveries for an error message.
func summary(ds []webhooks.Delivery) string {
	if len(ds) == 0 {
		return "none"
	}
	parts := make([]string, len(ds))
	for i, d := range ds {
		parts[i] = fmt.Sprintf("%s %s after %d attempts", d.EventID, d.State, d.Attempts)
	}
	return strings.Join(parts, ", ")
}

// Stop shuts the dispatcher down gracefully: it claims nothing more, waits
// for the deliveries in flight and records them, and returns once Run has
// returned. If ctx ends first the requests in flight are aborted and Stop
// returns an error wrapping ctx's error. The database stays open, so the
// recorded deliveries can be read afterwards. Later calls return the first
// call's result.
func (h *Harness) Stop(ctx context.Context) error {
	h.stopMu.Lock()
	defer h.stopMu.Unlock()
	if h.stopped {
		return h.stopErr
	}
	shutdownErr := h.Dispatcher.Shutdown(ctx)
	runErr := <-h.runErr // Shutdown returns only after Run did
	h.stopped = true
	switch {
	case shutdownErr != nil:
		h.stopErr = fmt.Errorf("webhookstest: stop dispatcher: %w", shutdownErr)
	case !errors.Is(runErr, webhooks.ErrDispatcherClosed):
		h.stopErr = fmt.Errorf("webhookstest: dispatcher Run returned %v, want webhooks.ErrDispatcherClosed", runErr)
	}
	return h.stopErr
}

// Close releases the requests held by the subscribed Receivers, stops the
// dispatcher (Stop) and closes the database. Later calls return the first
// call's result. NewHarness calls it when the test ends.
func (h *Harness) Close(ctx context.Context) error {
	h.closeOnce.Do(func() {
		h.mu.Lock()
		receivers := h.receivers
		h.mu.Unlock()
		for _, r := range receivers {
			r.ReleaseAll()
		}
		stopErr := h.Stop(ctx)
		var dbErr error
		if err := h.DB.Close(); err != nil {
			dbErr = fmt.Errorf("webhookstest: close database: %w", err)
		}
		h.closeErr = errors.Join(stopErr, dbErr)
	})
	return h.closeErr
}

// testLog is an io.Writer that passes each write to t.Log.
type testLog struct{ t testing.TB }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Logf("%s", strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}
