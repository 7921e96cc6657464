package webhooks

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"
)

func TestCommitDeliversToExactlyTheMatchingSubscriptions(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		ctx := context.Background()

		all := newReceiver(t, nil)         // acme, "*"
		orders := newReceiver(t, nil)      // acme, "order.*"
		shipped := newReceiver(t, nil)     // acme, "order.shipped"
		payments := newReceiver(t, nil)    // acme, "payment.failed"
		disabled := newReceiver(t, nil)    // acme, "*", disabled
		otherTenant := newReceiver(t, nil) // globex, "*"
		mustSubscribe(t, subs, all, "acme", "*")
		mustSubscribe(t, subs, orders, "acme", "order.*")
		mustSubscribe(t, subs, shipped, "acme", "order.shipped")
		mustSubscribe(t, subs, payments, "acme", "payment.failed")
		off := mustSubscribe(t, subs, disabled, "acme", "*")
		yes := true
		if _, err := subs.Update(ctx, "acme", off.ID, SubscriptionUpdate{Disabled: &yes}); err != nil {
			t.Fatal(err)
		}
		mustSubscribe(t, subs, otherTenant, "globex", "*")

		// A rolled-back transaction publishes nothing.
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := Publish(ctx, tx, Event{Type: "order.shipped", Tenant: "acme"}); err != nil {
			t.Fatal(err)
		}
		if err := tx.Rollback(); err != nil {
			t.Fatal(err)
		}

		d, stop := startDispatcher(t, db, Config{})
		ids := publishTx(t, db, Event{Type: "order.shipped", Tenant: "acme", Data: map[string]string{"orderId": "or_1"}})
		d.Notify()

		for _, rc := range []*receiver{all, orders, shipped} {
			got := rc.wait(1)
			if got[0].ID != ids[0] {
				t.Fatalf("webhook-id %q, want %q", got[0].ID, ids[0])
			}
			var env struct {
				ID, Type, Timestamp string
				Data                map[string]string
			}
			if err := json.Unmarshal(got[0].Body, &env); err != nil {
				t.Fatal(err)
			}
			if env.ID != ids[0] || env.Type != "order.shipped" || env.Data["orderId"] != "or_1" || env.Timestamp == "" {
				t.Fatalf("body %s", got[0].Body)
			}
			if ct := got[0].Header.Get("Content-Type"); ct != "application/json" {
				t.Fatalf("Content-Type %q", ct)
			}
			if ua := got[0].Header.Get("User-Agent"); ua != UserAgentDefault {
				t.Fatalf("User-Agent %q", ua)
			}
		}
		stop() // records everything in flight
		for name, rc := range map[string]*receiver{"non-matching": payments, "disabled": disabled, "other tenant": otherTenant} {
			if n := rc.count(); n != 0 {
				t.Errorf("%s subscription received %d requests", name, n)
			}
		}
		for name, rc := range map[string]*receiver{"*": all, "order.*": orders, "order.shipped": shipped} {
			if n := rc.count(); n != 1 {
				t.Errorf("%s subscription received %d requests, want exactly 1", name, n)
			}
		}
		// Three sent, and one paused for the disabled subscription: it goes
		// out if the subscription is enabled again.
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries`); n != 4 {
			t.Fatalf("%d deliveries, want 4 (rollback must add none)", n)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE subscription_id = $1 AND state = 'paused' AND attempts = 0`, off.ID); n != 1 {
			t.Fatalf("%d paused deliveries for the disabled subscription, want 1", n)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'succeeded' AND attempts = 1 AND delivered_at IS NOT NULL`); n != 3 {
			t.Fatalf("%d succeeded deliveries, want 3", n)
		}
	})
}

func TestFailingReceiverGetsTheSameEventUntilItSucceeds(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		const failures = 4
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) int {
			if n <= failures {
				w.WriteHeader(http.StatusInternalServerError)
				w.Write([]byte("boom " + strings.Repeat("x", 5000)))
				return 0
			}
			return http.StatusNoContent
		})
		sub := mustSubscribe(t, subs, rc, "", "order.shipped")
		_, stop := startDispatcher(t, db, Config{RetryPolicy: immediateRetry{max: 10}})
		ids := publishTx(t, db, Event{Type: "order.shipped"})

		got := rc.wait(failures + 1)
		stop()
		for i, r := range got {
			if r.ID != ids[0] {
				t.Fatalf("attempt %d had webhook-id %q, want %q", i+1, r.ID, ids[0])
			}
		}
		dl := onlyDelivery(t, subs, "", sub.ID)
		if dl.State != DeliverySucceeded || dl.Attempts != failures+1 || len(dl.AttemptLog) != failures+1 {
			t.Fatalf("delivery %+v", dl)
		}
		for i, a := range dl.AttemptLog[:failures] {
			if a.Attempt != i+1 || a.StatusCode != 500 || a.Error != "HTTP 500" {
				t.Fatalf("attempt %d: %+v", i+1, a)
			}
			if len(a.Response) != ResponseExcerptBytes || !strings.HasPrefix(a.Response, "boom") {
				t.Fatalf("attempt %d: response excerpt of %d bytes", i+1, len(a.Response))
			}
		}
		if last := dl.AttemptLog[failures]; last.StatusCode != 204 || last.Error != "" {
			t.Fatalf("last attempt %+v", last)
		}
		// Direct expansion (SQLite) keeps the first attempt in the
		// delivery row; the retries are rows of webhook_attempts.
		want := failures + 1
		if directExpansion(t, db) {
			want = failures
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_attempts`); n != want {
			t.Fatalf("%d rows in webhook_attempts, want %d", n, want)
		}
	})
}

func TestExhaustedDeliveryIsDeadAndReplayable(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		fail := true
		rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) int {
			if n <= 3 {
				return http.StatusFound // a redirect is a failure, never followed
			}
			return http.StatusOK
		})
		_ = fail
		sub := mustSubscribe(t, subs, rc, "t1", "*")
		_, stop := startDispatcher(t, db, Config{RetryPolicy: immediateRetry{max: 3}})
		publishTx(t, db, Event{Type: "a.b", Tenant: "t1"})
		rc.wait(3)
		stop()

		page, err := subs.ListDeliveries(context.Background(), "t1", sub.ID, DeliveryListOptions{State: DeliveryDead})
		if err != nil {
			t.Fatal(err)
		}
		if len(page.Deliveries) != 1 || page.Deliveries[0].Attempts != 3 {
			t.Fatalf("dead deliveries: %+v", page.Deliveries)
		}
		dl := page.Deliveries[0]
		if !strings.Contains(dl.AttemptLog[0].Error, "redirect") || dl.LastStatus != 302 {
			t.Fatalf("attempt log %+v", dl.AttemptLog)
		}

		// Another tenant cannot replay it; the owner can.
		if err := subs.RetryDelivery(context.Background(), "t2", dl.ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("other tenant's retry: %v", err)
		}
		if err := subs.RetryDelivery(context.Background(), "t1", dl.ID); err != nil {
			t.Fatal(err)
		}
		_, stop = startDispatcher(t, db, Config{RetryPolicy: immediateRetry{max: 3}})
		got := rc.wait(1)
		stop()
		if got[0].Status != 200 {
			t.Fatalf("replay answered %d", got[0].Status)
		}
		dl, err = subs.Delivery(context.Background(), "t1", dl.ID)
		if err != nil {
			t.Fatal(err)
		}
		if dl.State != DeliverySucceeded || dl.Attempts != 4 {
			t.Fatalf("after replay: %+v", dl)
		}
		// A succeeded delivery can be replayed; a pending one cannot.
		if err := subs.RetryDelivery(context.Background(), "t1", "dlv_missing"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("missing delivery: %v", err)
		}
	})
}

func TestGoneDisablesTheSubscription(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		gone := newReceiver(t, func(int, http.ResponseWriter, *http.Request) int { return http.StatusGone })
		sub := mustSubscribe(t, subs, gone, "", "*")
		d, stop := startDispatcher(t, db, Config{RetryPolicy: immediateRetry{max: 10}})
		publishTx(t, db, Event{Type: "a.b"})
		gone.wait(1)
		stop()

		got, err := subs.Get(context.Background(), "", sub.ID)
		if err != nil {
			t.Fatal(err)
		}
		if !got.Disabled || !strings.Contains(got.DisabledReason, "410") {
			t.Fatalf("subscription after 410: disabled=%v reason=%q", got.Disabled, got.DisabledReason)
		}
		// The delivery is kept, waiting (paused), not retried while disabled.
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'paused' AND attempts = 1`); n != 1 {
			t.Fatalf("%d paused deliveries, want 1", n)
		}
		// A new event's delivery to the disabled subscription is paused
		// too, and no paused delivery is claimed.
		publishTx(t, db, Event{Type: "a.c"})
		n, err := testExpand(context.Background(), d)
		if err != nil || n != 1 {
			t.Fatalf("expand: %d %v", n, err)
		}
		jobs, _, err := testClaim(context.Background(), d, 10, map[string]int{}, false)
		if err != nil || len(jobs) != 0 {
			t.Fatalf("claimed %d deliveries of a disabled subscription (err %v)", len(jobs), err)
		}
		if c := gone.count(); c != 1 {
			t.Fatalf("disabled endpoint got %d requests", c)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'paused'`); n != 2 {
			t.Fatalf("%d paused deliveries, want 2", n)
		}
		// Enabled again, both are due again.
		no := false
		if _, err := subs.Update(context.Background(), "", sub.ID, SubscriptionUpdate{Disabled: &no}); err != nil {
			t.Fatal(err)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'pending'`); n != 2 {
			t.Fatalf("%d pending deliveries after enabling, want 2", n)
		}
	})
}

func TestRetryAfterIsRespected(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) int {
			if n == 1 {
				w.Header().Set("Retry-After", "120")
				return http.StatusTooManyRequests
			}
			return http.StatusOK
		})
		sub := mustSubscribe(t, subs, rc, "", "*")
		policy := ExponentialBackoff{Schedule: []time.Duration{time.Second, time.Second}, Jitter: -1}
		cfg := Config{Clock: clock, RetryPolicy: policy}
		_, stop := startDispatcher(t, db, cfg)
		publishTx(t, db, Event{Type: "a.b"})
		rc.wait(1)
		stop()

		dl := onlyDelivery(t, subs, "", sub.ID)
		if want := clock.Now().Add(120 * time.Second).Truncate(time.Millisecond); !dl.NextAttemptAt.Equal(want) {
			t.Fatalf("next attempt at %v, want %v (Retry-After 120 s instead of the 1 s schedule)", dl.NextAttemptAt, want)
		}

		// Not due a second early; due at 120 s.
		d, err := NewDispatcher(db, cfg)
		if err != nil {
			t.Fatal(err)
		}
		clock.Advance(119 * time.Second)
		if jobs, _, err := testClaim(context.Background(), d, 10, map[string]int{}, false); err != nil || len(jobs) != 0 {
			t.Fatalf("claimed %d deliveries before Retry-After elapsed (err %v)", len(jobs), err)
		}
		clock.Advance(time.Second)
		jobs, _, err := testClaim(context.Background(), d, 10, map[string]int{}, false)
		if err != nil || len(jobs) != 1 {
			t.Fatalf("claimed %d deliveries after Retry-After (err %v)", len(jobs), err)
		}
	})
}

func TestClaimIsALease(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		rc := newReceiver(t, nil)
		mustSubscribe(t, subs, rc, "", "*")
		publishTx(t, db, Event{Type: "a.b"})
		cfg := Config{Clock: clock, RequestTimeout: 10 * time.Second, LeaseDuration: time.Minute}
		d1, err := NewDispatcher(db, cfg)
		if err != nil {
			t.Fatal(err)
		}
		d2, err := NewDispatcher(db, cfg)
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		if _, err := testExpand(ctx, d1); err != nil {
			t.Fatal(err)
		}
		if n, err := testExpand(ctx, d2); err != nil || n != 0 {
			t.Fatalf("second expansion expanded %d events (err %v)", n, err)
		}
		jobs, _, err := testClaim(ctx, d1, 10, map[string]int{}, false)
		if err != nil || len(jobs) != 1 {
			t.Fatalf("first claim: %d %v", len(jobs), err)
		}
		// While the lease runs (longer than the request timeout), nobody else
		// can claim it.
		clock.Advance(59 * time.Second)
		if again, _, err := testClaim(ctx, d2, 10, map[string]int{}, false); err != nil || len(again) != 0 {
			t.Fatalf("claimed during the lease: %d %v", len(again), err)
		}
		// After it lapses (the first dispatcher died), another one takes over,
		// and the first one's late result no longer changes the delivery.
		clock.Advance(2 * time.Second)
		again, _, err := testClaim(ctx, d2, 10, map[string]int{}, false)
		if err != nil || len(again) != 1 {
			t.Fatalf("claim after the lease: %d %v", len(again), err)
		}
		if err := testRecord(ctx, d1, []result{{job: jobs[0], started: clock.Now(), status: 500, errText: "HTTP 500"}}); err != nil {
			t.Fatal(err)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'delivering' AND attempts = 0`); n != 1 {
			t.Fatal("a stale claim's result overwrote the new claim")
		}
		if err := testRecord(ctx, d2, []result{{job: again[0], started: clock.Now(), status: 200}}); err != nil {
			t.Fatal(err)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'succeeded' AND attempts = 1`); n != 1 {
			t.Fatal("the current claim's result was not recorded")
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM `+allAttempts); n != 2 {
			t.Fatalf("%d attempts recorded, want both (2)", n)
		}
	})
}

func TestLeaseMustOutlastRequestTimeout(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		_, err := NewDispatcher(db, Config{RequestTimeout: time.Minute, LeaseDuration: 30 * time.Second})
		if !errors.Is(err, ErrInvalidConfig) {
			t.Fatalf("err = %v, want ErrInvalidConfig", err)
		}
		for _, cfg := range []Config{{PollInterval: -1}, {Concurrency: -1}, {BatchSize: -1}, {RequestTimeout: -1}} {
			if _, err := NewDispatcher(db, cfg); !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("%+v: err = %v, want ErrInvalidConfig", cfg, err)
			}
		}
		d, err := NewDispatcher(db, Config{})
		if err != nil {
			t.Fatal(err)
		}
		if d.cfg.LeaseDuration != RequestTimeoutDefault+LeaseMarginDefault || d.cfg.PollInterval != PollIntervalDefault {
			t.Fatalf("defaults not applied: %+v", d.cfg)
		}
	})
}

func TestDeletingASubscriptionStopsItsPendingDeliveries(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		rc := newReceiver(t, nil)
		sub := mustSubscribe(t, subs, rc, "acme", "*")
		publishTx(t, db, Event{Type: "a.b", Tenant: "acme"}, Event{Type: "a.c", Tenant: "acme"})
		d, err := NewDispatcher(db, Config{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := testExpand(context.Background(), d); err != nil {
			t.Fatal(err)
		}
		if err := subs.Delete(context.Background(), "globex", sub.ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("another tenant deleted it: %v", err)
		}
		if err := subs.Delete(context.Background(), "acme", sub.ID); err != nil {
			t.Fatal(err)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'canceled'`); n != 2 {
			t.Fatalf("%d canceled deliveries, want 2", n)
		}
		_, stop := startDispatcher(t, db, Config{})
		publishTx(t, db, Event{Type: "a.d", Tenant: "acme"})
		stop()
		if jobs, _, err := testClaim(context.Background(), d, 10, map[string]int{}, false); err != nil || len(jobs) != 0 {
			t.Fatalf("claimed %d deliveries of a deleted subscription", len(jobs))
		}
		if n := rc.count(); n != 0 {
			t.Fatalf("deleted subscription received %d requests", n)
		}
	})
}

func TestRotatedSecretsBothSign(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		rc := newReceiver(t, nil)
		sub := mustSubscribe(t, subs, rc, "", "*")
		oldSecret := sub.Secret
		rotated, err := subs.RotateSecret(context.Background(), "", sub.ID, "", time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if rotated.Secret == oldSecret {
			t.Fatal("secret unchanged")
		}
		_, stop := startDispatcher(t, db, Config{Clock: clock})
		publishTx(t, db, Event{Type: "a.b"})
		// The receiver still knows only the old secret: it must verify.
		rc.setSecrets(oldSecret)
		got := rc.wait(1)
		stop()
		sigs := strings.Fields(got[0].Signature)
		if len(sigs) != 2 {
			t.Fatalf("webhook-signature %q: want two space-separated signatures", got[0].Signature)
		}
		for _, secret := range []string{oldSecret, rotated.Secret} {
			v, err := NewVerifier(secret)
			if err != nil {
				t.Fatal(err)
			}
			v.Now = clock.Now
			if err := v.Verify(got[0].Header, got[0].Body); err != nil {
				t.Fatalf("verify with one of the secrets: %v", err)
			}
		}

		// After the grace period only the new secret signs.
		clock.Advance(time.Hour + time.Second)
		rc.setSecrets(rotated.Secret)
		rc.ignoreTimestamps() // the fake clock is an hour ahead of the reference library's
		_, stop = startDispatcher(t, db, Config{Clock: clock})
		publishTx(t, db, Event{Type: "a.c"})
		got = rc.wait(1)
		stop()
		if n := len(strings.Fields(got[0].Signature)); n != 1 {
			t.Fatalf("%d signatures after the grace period, want 1", n)
		}
	})
}

func TestShutdownFinishesInFlightAndLeavesNoGoroutine(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		release := make(chan struct{})
		entered := make(chan struct{}, 10)
		rc := newReceiver(t, func(int, http.ResponseWriter, *http.Request) int {
			entered <- struct{}{}
			<-release
			return http.StatusOK
		})
		mustSubscribe(t, subs, rc, "", "*")
		d, err := NewDispatcher(db, allowLoopback(Config{PollInterval: 5 * time.Millisecond}))
		if err != nil {
			t.Fatal(err)
		}
		runErr := make(chan error, 1)
		go func() { runErr <- d.Run(context.Background()) }()
		publishTx(t, db, Event{Type: "a.b"})
		<-entered

		shutdownErr := make(chan error, 1)
		go func() { shutdownErr <- d.Shutdown(context.Background()) }()
		select {
		case err := <-shutdownErr:
			t.Fatalf("Shutdown returned (%v) while a delivery was in flight", err)
		case <-time.After(50 * time.Millisecond): // a bounded check that it waits, not a wait for a result
		}
		publishTx(t, db, Event{Type: "a.c"}) // must not be claimed any more
		close(release)
		if err := <-shutdownErr; err != nil {
			t.Fatal(err)
		}
		if err := <-runErr; !errors.Is(err, ErrDispatcherClosed) {
			t.Fatalf("Run: %v", err)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'succeeded'`); n != 1 {
			t.Fatalf("in-flight delivery not recorded: %d succeeded", n)
		}
		if n := rc.count(); n != 1 {
			t.Fatalf("%d requests; nothing may be claimed after Shutdown", n)
		}
		waitGoroutinesGone(t, "the dispatcher's goroutines", "webhooks.(*Dispatcher)", "webhooks.(*loop)")
		if err := d.Run(context.Background()); !errors.Is(err, ErrDispatcherClosed) {
			t.Fatalf("second Run: %v", err)
		}
	})
}

func TestShutdownDeadlineAbortsInFlight(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		entered := make(chan struct{}, 10)
		rc := newReceiver(t, func(_ int, _ http.ResponseWriter, r *http.Request) int {
			entered <- struct{}{}
			<-r.Context().Done() // hangs until the client gives up
			return 0
		})
		mustSubscribe(t, subs, rc, "", "*")
		d, err := NewDispatcher(db, allowLoopback(Config{PollInterval: 5 * time.Millisecond, RequestTimeout: time.Hour, LeaseDuration: 2 * time.Hour}))
		if err != nil {
			t.Fatal(err)
		}
		runErr := make(chan error, 1)
		go func() { runErr <- d.Run(context.Background()) }()
		publishTx(t, db, Event{Type: "a.b"})
		<-entered
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := d.Shutdown(ctx); !errors.Is(err, context.Canceled) {
			t.Fatalf("Shutdown: %v", err)
		}
		<-runErr
		// The aborted attempt stays claimed until its lease lapses (with
		// direct expansion: its event stays unexpanded, for the next
		// dispatcher to expand); it is not lost, and not recorded as the
		// endpoint's failure.
		if directExpansion(t, db) {
			if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE expanded_at IS NULL`); n != 1 {
				t.Fatalf("aborted delivery lost: %d events unexpanded, want 1", n)
			}
			if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries`); n != 0 {
				t.Fatalf("aborted delivery recorded: %d deliveries", n)
			}
			if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox_lease WHERE until > 0`); n != 0 {
				t.Fatalf("the outbox lease was not released: the next dispatcher would wait for it")
			}
		} else if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'delivering' AND attempts = 0`); n != 1 {
			t.Fatalf("aborted delivery lost or recorded")
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM `+allAttempts); n != 0 {
			t.Fatalf("%d attempts recorded for a request our own shutdown aborted", n)
		}
	})
}

func TestRunStopsWhenContextEnds(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		d, err := NewDispatcher(db, Config{})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := d.Run(ctx); !errors.Is(err, context.Canceled) {
			t.Fatalf("Run: %v", err)
		}
		if err := d.Shutdown(context.Background()); err != nil {
			t.Fatalf("Shutdown after Run returned: %v", err)
		}
	})
}

func TestManyEventsManySubscriptions(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		var rcs []*receiver
		for i := 0; i < 3; i++ {
			rc := newReceiver(t, nil)
			mustSubscribe(t, subs, rc, "t", "*")
			rcs = append(rcs, rc)
		}
		_, stop := startDispatcher(t, db, Config{BatchSize: 7})
		var events []Event
		for i := 0; i < 250; i++ {
			events = append(events, Event{Type: "a.b", Tenant: "t"})
		}
		ids, err := PublishBatch(context.Background(), db, events...)
		if err != nil {
			t.Fatal(err)
		}
		sort.Strings(ids)
		for _, rc := range rcs {
			got := rc.wait(len(ids))
			var gotIDs []string
			for _, r := range got {
				gotIDs = append(gotIDs, r.ID)
			}
			sort.Strings(gotIDs)
			if strings.Join(gotIDs, ",") != strings.Join(ids, ",") {
				t.Fatal("a receiver did not get every event exactly once")
			}
		}
		stop()
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'succeeded'`); n != 750 {
			t.Fatalf("%d succeeded, want 750", n)
		}
	})
}

func TestSendTestReachesOnlyThatSubscription(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		target := newReceiver(t, nil)
		other := newReceiver(t, nil)
		sub := mustSubscribe(t, subs, target, "acme", "order.shipped")
		mustSubscribe(t, subs, other, "acme", "*")
		if _, err := subs.SendTest(context.Background(), "globex", sub.ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("other tenant's SendTest: %v", err)
		}
		dl, err := subs.SendTest(context.Background(), "acme", sub.ID)
		if err != nil {
			t.Fatal(err)
		}
		if dl.State != DeliveryPending || dl.SubscriptionID != sub.ID {
			t.Fatalf("test delivery %+v", dl)
		}
		_, stop := startDispatcher(t, db, Config{})
		got := target.wait(1)
		stop()
		if got[0].ID != dl.EventID || !strings.Contains(string(got[0].Body), `"type":"webhook.test"`) {
			t.Fatalf("test request %s %s", got[0].ID, got[0].Body)
		}
		if n := other.count(); n != 0 {
			t.Fatalf("the test event reached another subscription (%d requests)", n)
		}
	})
}

func TestDefaultClientRefusesPrivateAddressesAtDialTime(t *testing.T) {
	db := openTestDB(t)
	subs := newTestSubscriptions(t, db, nil)
	rc := newReceiver(t, nil) // listens on 127.0.0.1
	mustSubscribe(t, subs, rc, "", "*")
	publishTx(t, db, Event{Type: "a.b"})
	ctx := context.Background()
	for _, allowed := range []bool{false, true} {
		cfg := Config{RetryPolicy: immediateRetry{max: 5}}
		if allowed {
			cfg.AllowedNetworks = loopbackNetworks
		}
		d, err := NewDispatcher(db, cfg)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := testExpand(ctx, d); err != nil {
			t.Fatal(err)
		}
		jobs, _, err := testClaim(ctx, d, 1, map[string]int{}, false)
		if err != nil || len(jobs) != 1 {
			t.Fatalf("claim: %d %v", len(jobs), err)
		}
		r := d.deliver(ctx, jobs[0])
		if allowed {
			if r.err != nil || r.status != 200 {
				t.Fatalf("allowlisted loopback: status %d, err %v", r.status, r.err)
			}
			continue
		}
		if r.err == nil || !strings.Contains(r.errText, "refused") {
			t.Fatalf("loopback not refused by default: status %d, err %v", r.status, r.err)
		}
		if n := rc.count(); n != 0 {
			t.Fatalf("the receiver was contacted (%d requests)", n)
		}
		if err := testRecord(ctx, d, []result{r}); err != nil {
			t.Fatal(err)
		}
	}
}

// A network failure is recorded as what failed, without the request line
// that http.Client puts before it (the URL is the subscription's own).
func TestUnreachableEndpointErrorText(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		rc := newReceiver(t, nil)
		sub := mustSubscribe(t, subs, rc, "", "*")
		rc.srv.Close() // nothing listens there any more
		_, stop := startDispatcher(t, db, Config{RetryPolicy: immediateRetry{max: 1}})
		publishTx(t, db, Event{Type: "a.b"})
		waitUntil(t, "the delivery to be dead", func() bool {
			return countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'dead'`) == 1
		})
		stop()
		a := onlyDelivery(t, subs, "", sub.ID).AttemptLog[0]
		if !strings.HasPrefix(a.Error, "dial tcp ") || !strings.Contains(a.Error, "refused") || strings.Contains(a.Error, "/hook") {
			t.Fatalf("attempt error %q, want the dial error alone", a.Error)
		}
	})
}

// A request that runs past RequestTimeout is an attempt that failed with a
// timeout, and the worker that made it goes on to the next ones.
func TestRequestTimeout(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) int {
			if n <= 2 {
				<-r.Context().Done() // hangs until the dispatcher gives up
			}
			return http.StatusOK
		})
		sub := mustSubscribe(t, subs, rc, "", "*")
		const timeout = 100 * time.Millisecond
		_, stop := startDispatcher(t, db, Config{Concurrency: 1, RequestTimeout: timeout, RetryPolicy: immediateRetry{max: 3}})
		publishTx(t, db, Event{Type: "a.b"})
		rc.wait(3)
		waitUntil(t, "the delivery to succeed", func() bool {
			return countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'succeeded'`) == 1
		})
		stop()
		log := onlyDelivery(t, subs, "", sub.ID).AttemptLog
		if len(log) != 3 || log[2].StatusCode != 200 {
			t.Fatalf("attempt log %+v, want two timeouts then 200", log)
		}
		for _, a := range log[:2] {
			// (Durations are stored in whole milliseconds, and the limit
			// runs from just before the attempt's clock starts.)
			if a.StatusCode != 0 || a.Error != "timeout: no complete response within 100ms" || a.Duration < timeout-10*time.Millisecond {
				t.Fatalf("attempt %+v, want a timeout after %v", a, timeout)
			}
		}
	})
}
