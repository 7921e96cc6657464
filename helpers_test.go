package webhooks

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"

	"github.com/outboxhook/webhooks/internal/dbtx"
	"github.com/outboxhook/webhooks/store/sqlite"
)

// openTestDB opens a migrated SQLite database in a fresh file.
func openTestDB(t testing.TB) *sql.DB {
	t.Helper()
	return openTestDBAt(t, filepath.Join(t.TempDir(), "webhooks.db"))
}

func openTestDBAt(t testing.TB, path string) *sql.DB {
	t.Helper()
	ctx := context.Background()
	db, err := sqlite.Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if err := Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	return db
}

// fakeClock is a Clock that moves only when told to.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Now()} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// received is one request a receiver got.
type received struct {
	ID, Timestamp, Signature string
	Body                     []byte
	Header                   http.Header
	VerifyErr                error // from the Standard Webhooks reference library
	Status                   int   // what the receiver answered
}

// receiver is a real HTTP endpoint that verifies every request with the
// Standard Webhooks reference library and answers with respond (200 when
// nil). n counts requests from 1.
type receiver struct {
	t       testing.TB
	srv     *httptest.Server
	respond func(n int, w http.ResponseWriter, r *http.Request) int

	mu       sync.Mutex
	secrets  []string
	got      []received
	ch       chan received
	verifyTS bool // check the timestamp tolerance too (real clocks only)
}

func newReceiver(t testing.TB, respond func(n int, w http.ResponseWriter, r *http.Request) int) *receiver {
	t.Helper()
	rc := &receiver{t: t, respond: respond, ch: make(chan received, 100000), verifyTS: true}
	rc.srv = httptest.NewServer(http.HandlerFunc(rc.serve))
	t.Cleanup(rc.srv.Close)
	return rc
}

func (rc *receiver) URL() string { return rc.srv.URL + "/hook" }

// ignoreTimestamps makes verification skip the timestamp tolerance, for
// tests whose fake clock runs far from the real one.
func (rc *receiver) ignoreTimestamps() {
	rc.mu.Lock()
	rc.verifyTS = false
	rc.mu.Unlock()
}

// setSecrets sets the secrets signatures are checked against (any may match).
func (rc *receiver) setSecrets(secrets ...string) {
	rc.mu.Lock()
	rc.secrets = secrets
	rc.mu.Unlock()
}

func (rc *receiver) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	rc.mu.Lock()
	n := len(rc.got) + 1
	secrets, verifyTS := rc.secrets, rc.verifyTS
	rc.got = append(rc.got, received{})
	rc.mu.Unlock()

	rec := received{
		ID: r.Header.Get("webhook-id"), Timestamp: r.Header.Get("webhook-timestamp"),
		Signature: r.Header.Get("webhook-signature"), Body: body, Header: r.Header.Clone(),
	}
	rec.VerifyErr = fmt.Errorf("no secret matched")
	for _, s := range secrets {
		wh, err := standardwebhooks.NewWebhook(s)
		if err != nil {
			rec.VerifyErr = err
			continue
		}
		if verifyTS {
			err = wh.Verify(body, r.Header)
		} else {
			err = wh.VerifyIgnoringTimestamp(body, r.Header)
		}
		if err == nil {
			rec.VerifyErr = nil
			break
		}
		rec.VerifyErr = err
	}
	status := http.StatusOK
	if rc.respond != nil {
		status = rc.respond(n, w, r)
	}
	if status != 0 {
		w.WriteHeader(status)
	}
	rec.Status = status
	rc.mu.Lock()
	rc.got[n-1] = rec
	rc.mu.Unlock()
	rc.ch <- rec
}

// wait returns the next n requests, failing the test if they do not arrive
// within a generous deadline (a hang guard, not a timing assertion).
func (rc *receiver) wait(n int) []received {
	rc.t.Helper()
	out := make([]received, 0, n)
	deadline := time.NewTimer(60 * time.Second)
	defer deadline.Stop()
	for len(out) < n {
		select {
		case r := <-rc.ch:
			if r.VerifyErr != nil {
				rc.t.Errorf("request %s failed Standard Webhooks verification: %v", r.ID, r.VerifyErr)
			}
			out = append(out, r)
		case <-deadline.C:
			rc.t.Fatalf("got %d of %d requests before the deadline", len(out), n)
		}
	}
	return out
}

// count returns how many requests arrived so far.
func (rc *receiver) count() int {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return len(rc.got)
}

// loopbackNetworks are the ranges the tests' local receivers listen on.
var loopbackNetworks = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}

// allowLoopback lets a test dispatcher's default client reach the local
// receivers, which the dial-time check refuses otherwise.
func allowLoopback(cfg Config) Config {
	if cfg.AllowedNetworks == nil && cfg.HTTPClient == nil {
		cfg.AllowedNetworks = loopbackNetworks
	}
	return cfg
}

// startDispatcher runs a dispatcher until the test ends (or stop is called).
func startDispatcher(t testing.TB, db *sql.DB, cfg Config) (d *Dispatcher, stop func()) {
	t.Helper()
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 5 * time.Millisecond
	}
	d, err := NewDispatcher(db, allowLoopback(cfg))
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- d.Run(context.Background()) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := d.Shutdown(ctx); err != nil {
				t.Errorf("Shutdown: %v", err)
			}
			if err := <-errc; err != ErrDispatcherClosed {
				t.Errorf("Run returned %v, want ErrDispatcherClosed", err)
			}
		})
	}
	t.Cleanup(stop)
	return d, stop
}

// publishTx publishes events in one committed transaction.
func publishTx(t testing.TB, db *sql.DB, events ...Event) []string {
	t.Helper()
	ctx := context.Background()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, e := range events {
		id, err := Publish(ctx, tx, e)
		if err != nil {
			tx.Rollback()
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	return ids
}

// mustSubscribe creates a subscription pointing at rc and teaches rc its
// secret.
func mustSubscribe(t testing.TB, subs *Subscriptions, rc *receiver, tenant string, types ...string) Subscription {
	t.Helper()
	sub, err := subs.Create(context.Background(), Subscription{Tenant: tenant, URL: rc.URL(), EventTypes: types})
	if err != nil {
		t.Fatal(err)
	}
	rc.setSecrets(sub.Secret)
	return sub
}

func newTestSubscriptions(t testing.TB, db *sql.DB, clock Clock) *Subscriptions {
	t.Helper()
	subs, err := NewSubscriptions(db, SubscriptionsConfig{Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	return subs
}

// onlyDelivery returns the one delivery of the tenant's subscription,
// with its attempts, failing the test unless there is exactly one.
func onlyDelivery(t testing.TB, subs *Subscriptions, tenant, subscriptionID string) Delivery {
	t.Helper()
	page, err := subs.ListDeliveries(context.Background(), tenant, subscriptionID, DeliveryListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(page.Deliveries) != 1 {
		t.Fatalf("%d deliveries, want 1", len(page.Deliveries))
	}
	return page.Deliveries[0]
}

// waitGoroutinesGone fails the test unless, soon, no goroutine runs a
// function whose name contains one of the parts. Shutdown waits for its
// goroutines to be done, but one that signalled it may still be on its way
// out for a moment; none may stay.
func waitGoroutinesGone(t testing.TB, what string, parts ...string) {
	t.Helper()
	var left string
	deadline := time.Now().Add(10 * time.Second)
	for {
		left = ""
		buf := make([]byte, 1<<20)
		for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
			for _, p := range parts {
				if strings.Contains(g, p) {
					left = g
				}
			}
		}
		if left == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s left behind after Shutdown:\n%s", what, left)
		}
		time.Sleep(time.Millisecond) // the next look
	}
}

// allAttempts is every recorded attempt, for tests to select from: the first
// attempts kept in delivery rows (direct expansion, SQLite) and the rows of
// webhook_attempts. seq orders a delivery's attempts.
const allAttempts = `(
    SELECT id AS delivery_id, 1 AS attempt, first_started_at AS started_at, first_duration_ms AS duration_ms,
           first_status AS status_code, first_error AS error, first_response AS response_body, 0 AS seq
    FROM webhook_deliveries WHERE first_started_at IS NOT NULL
    UNION ALL
    SELECT delivery_id, attempt, started_at, duration_ms, status_code, error, response_body, id
    FROM webhook_attempts) AS attempts`

// countRows runs a COUNT query.
func countRows(t testing.TB, db *sql.DB, query string, args ...any) int {
	t.Helper()
	var n int
	if err := db.QueryRow(query, args...).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// noRetry is a policy that retries at once, up to max attempts.
type immediateRetry struct{ max int }

func (p immediateRetry) NextAttempt(f FailedAttempt) (time.Duration, bool) {
	return 0, f.Attempt < p.max
}

// testExpand expands every unexpanded event into pending deliveries (no
// slot free), as a step would, and returns how many events it expanded.
func testExpand(ctx context.Context, d *Dispatcher) (int, error) {
	n := 0
	err := d.inTx(ctx, func(tx dbtx.Tx) error {
		var out stepOutput
		in := stepInput{perSub: map[string]int{}, expand: true}
		err := d.expand(ctx, tx, in, 0, map[string]int{}, "", d.clock.Now(), &out)
		n = out.events
		return err
	})
	return n, err
}

// testClaim claims up to n due deliveries in a step of their own; the last
// argument is ignored (it was the probe flag).
func testClaim(ctx context.Context, d *Dispatcher, n int, perSub map[string]int, _ bool) ([]*job, bool, error) {
	out, err := d.step(ctx, stepInput{free: n, claim: n, perSub: perSub})
	return out.jobs, out.moreDue, err
}

// testRecord records finished attempts in a step of their own.
func testRecord(ctx context.Context, d *Dispatcher, results []result) error {
	_, err := d.step(ctx, stepInput{results: results, perSub: map[string]int{}})
	return err
}

// activeSecrets returns the secrets that sign at time now: the current one
// first, then those being rotated out that have not expired.
func activeSecrets(column string, now time.Time) ([]string, error) {
	active, _, err := activeSecretsUntil(column, now.UnixMilli())
	return active, err
}

// directExpansion reports whether dispatchers on db expand new events
// directly, holding them unexpanded while their first attempts run
// (SQLite; see dispatcher_direct.go), rather than through claimed rows.
func directExpansion(t testing.TB, db *sql.DB) bool {
	t.Helper()
	d, err := detectDialect(db, "")
	if err != nil {
		t.Fatal(err)
	}
	q, err := d.Queries()
	if err != nil {
		t.Fatal(err)
	}
	return q.OutboxLease.Take != ""
}
