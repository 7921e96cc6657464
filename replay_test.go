package webhooks

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// execer is a *sql.DB or a *sql.Tx.
type execer interface {
	Exec(query string, args ...any) (sql.Result, error)
}

// seedSubscription creates a subscription of tenant to every event type,
// at an endpoint that no test reaches: for deliveries seeded by hand.
func seedSubscription(t testing.TB, subs *Subscriptions, tenant string) Subscription {
	t.Helper()
	sub, err := subs.Create(context.Background(), Subscription{Tenant: tenant, URL: "https://example.com/h", EventTypes: []string{"*"}})
	if err != nil {
		t.Fatal(err)
	}
	return sub
}

// seedDelivery stores an event of sub's tenant and its delivery to sub in
// state, with attempts failed attempts (HTTP 503) in its log, created at
// createdAt, as the dispatcher would have left them. It returns the delivery
// and event IDs.
func seedDelivery(t testing.TB, db execer, sub Subscription, state DeliveryState, attempts int, createdAt time.Time) (dlvID, eventID string) {
	t.Helper()
	eventID, _ = newID("evt_")
	dlvID, _ = newID("dlv_")
	at := createdAt.UnixMilli()
	payload := fmt.Sprintf(`{"id":%q,"type":"a.b","timestamp":%q,"data":{}}`, eventID, createdAt.UTC().Format(time.RFC3339Nano))
	if _, err := db.Exec(`INSERT INTO webhook_outbox (id, type, tenant, payload, occurred_at, created_at, expanded_at)
		VALUES ($1, 'a.b', $2, $3, $4, $5, $6)`, eventID, sub.Tenant, payload, at, at, at); err != nil {
		t.Fatal(err)
	}
	var claim, delivered any
	switch state {
	case DeliveryDelivering:
		claim = "claim-token"
	case DeliverySucceeded:
		delivered = at
	}
	if _, err := db.Exec(`INSERT INTO webhook_deliveries (id, event_id, subscription_id, tenant, state, attempts, next_at,
		claim_token, last_status, created_at, updated_at, delivered_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)`,
		dlvID, eventID, sub.ID, sub.Tenant, string(state), attempts, at+3600_000, claim, 503, at, at, delivered); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= attempts; i++ {
		if _, err := db.Exec(`INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration_ms, status_code, error, response_body)
			VALUES ($1, $2, $3, 1, 503, 'HTTP 503', '')`, dlvID, i, at+int64(i)); err != nil {
			t.Fatal(err)
		}
	}
	return dlvID, eventID
}

// deliveryRowState renders what a requeue may change of a delivery.
func deliveryRowState(t testing.TB, db *sql.DB, id string) string {
	t.Helper()
	var state string
	var attempts int
	var next int64
	var claim sql.NullString
	if err := db.QueryRow(`SELECT state, attempts, next_at, claim_token FROM webhook_deliveries WHERE id = $1`, id).
		Scan(&state, &attempts, &next, &claim); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%s/%d/%d/%v", state, attempts, next, claim.Valid)
}

// waitDeliveryState polls (a hang guard) until the delivery is in state.
func waitDeliveryState(t testing.TB, subs *Subscriptions, tenant, id string, state DeliveryState) Delivery {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		dl, err := subs.Delivery(context.Background(), tenant, id)
		if err != nil {
			t.Fatal(err)
		}
		if dl.State == state {
			return dl
		}
		if time.Now().After(deadline) {
			t.Fatalf("delivery %s is %s, never %s", id, dl.State, state)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestReplayScopesAndWindow(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		ctx := context.Background()
		sub, sibling, foreign := seedSubscription(t, subs, "acme"), seedSubscription(t, subs, "acme"), seedSubscription(t, subs, "globex")
		old, recent := clock.Now().Add(-2*time.Hour), clock.Now().Add(-time.Hour)
		type seeded struct{ id, event string }
		seed := map[string]seeded{}
		for _, when := range []struct {
			name string
			at   time.Time
		}{{"old", old}, {"new", recent}} {
			for _, c := range []struct {
				name     string
				state    DeliveryState
				attempts int
			}{
				{"succeeded", DeliverySucceeded, 1}, {"dead", DeliveryDead, 3}, {"first", DeliveryPending, 0},
				{"failing", DeliveryPending, 2}, {"delivering", DeliveryDelivering, 1},
			} {
				id, ev := seedDelivery(t, db, sub, c.state, c.attempts, when.at)
				seed[when.name+" "+c.name] = seeded{id, ev}
			}
		}
		siblingDead, _ := seedDelivery(t, db, sibling, DeliveryDead, 3, recent)
		foreignDead, _ := seedDelivery(t, db, foreign, DeliveryDead, 3, recent)
		initial := map[string]string{}
		for k, s := range seed {
			initial[k] = deliveryRowState(t, db, s.id)
		}
		now := clock.Now().UTC().Truncate(time.Millisecond)
		requeued := fmt.Sprintf("pending/0/%d/false", now.UnixMilli())

		// check replays with opts, wants n, and then finds the deliveries
		// named in done requeued, the others as seeded.
		var done []string
		check := func(opts ReplayOptions, n int, newlyDone ...string) {
			t.Helper()
			got, err := subs.Replay(ctx, "acme", sub.ID, opts)
			if err != nil || got != n {
				t.Fatalf("Replay(%+v) = %d, %v; want %d", opts, got, err, n)
			}
			done = append(done, newlyDone...)
			for k, s := range seed {
				want := initial[k]
				for _, d := range done {
					if d == k {
						want = requeued
					}
				}
				if st := deliveryRowState(t, db, s.id); st != want {
					t.Errorf("after Replay(%+v): %s is %s, want %s", opts, k, st, want)
				}
			}
		}
		check(ReplayOptions{Since: recent.Add(-time.Minute)}, 2, "new dead", "new failing")
		check(ReplayOptions{Until: recent.Add(-time.Minute), Scope: ReplayFailed}, 2, "old dead", "old failing")
		check(ReplayOptions{Scope: ReplayAll}, 2, "old succeeded", "new succeeded")
		check(ReplayOptions{Scope: ReplayAll}, 0)
		check(ReplayOptions{Since: now.Add(time.Hour), Scope: ReplayAll}, 0)

		// The attempt log is kept.
		dl, err := subs.Delivery(ctx, "acme", seed["new dead"].id)
		if err != nil || len(dl.AttemptLog) != 3 || dl.Attempts != 0 || !dl.NextAttemptAt.Equal(now) || dl.LastStatus != 503 {
			t.Fatalf("replayed delivery %+v %v", dl, err)
		}
		// Other subscriptions' deliveries were not touched.
		for _, id := range []string{siblingDead, foreignDead} {
			if st := deliveryRowState(t, db, id); !strings.HasPrefix(st, "dead/3/") {
				t.Fatalf("another subscription's delivery is %s", st)
			}
		}

		// Resend leaves a first attempt still pending and one in flight as
		// they are.
		for _, k := range []string{"old first", "new delivering"} {
			if err := subs.Resend(ctx, "acme", seed[k].event, ""); err != nil {
				t.Fatalf("Resend %s: %v", k, err)
			}
			if st := deliveryRowState(t, db, seed[k].id); st != initial[k] {
				t.Fatalf("Resend changed %s to %s", k, st)
			}
		}
	})
}

func TestReplayRefusals(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		ctx := context.Background()
		sub := seedSubscription(t, subs, "acme")
		dead, event := seedDelivery(t, db, sub, DeliveryDead, 3, clock.Now().Add(-time.Hour))
		before := deliveryRowState(t, db, dead)
		now := clock.Now()
		for name, c := range map[string]struct {
			tenant, id string
			opts       ReplayOptions
			want       error
		}{
			"unknown scope":   {"acme", sub.ID, ReplayOptions{Scope: "dead"}, ErrInvalidSubscription},
			"empty window":    {"acme", sub.ID, ReplayOptions{Since: now, Until: now}, ErrInvalidSubscription},
			"inverted window": {"acme", sub.ID, ReplayOptions{Since: now, Until: now.Add(-time.Hour)}, ErrInvalidSubscription},
			"other tenant":    {"globex", sub.ID, ReplayOptions{}, ErrNotFound},
			"no such id":      {"acme", "sub_missing", ReplayOptions{}, ErrNotFound},
		} {
			if n, err := subs.Replay(ctx, c.tenant, c.id, c.opts); !errors.Is(err, c.want) || n != 0 {
				t.Errorf("%s: %d, %v; want %v", name, n, err, c.want)
			}
		}
		if err := subs.Resend(ctx, "globex", event, ""); !errors.Is(err, ErrNotFound) {
			t.Errorf("other tenant's Resend: %v", err)
		}
		if err := subs.Resend(ctx, "globex", event, sub.ID); !errors.Is(err, ErrNotFound) {
			t.Errorf("other tenant's Resend to the subscription: %v", err)
		}
		if st := deliveryRowState(t, db, dead); st != before {
			t.Fatalf("refused calls changed the delivery to %s", st)
		}

		// A deleted subscription's deliveries are never queued again.
		if err := subs.Delete(ctx, "acme", sub.ID); err != nil {
			t.Fatal(err)
		}
		if _, err := subs.Replay(ctx, "acme", sub.ID, ReplayOptions{}); !errors.Is(err, ErrNotFound) {
			t.Errorf("Replay of a deleted subscription: %v", err)
		}
		if err := subs.Resend(ctx, "acme", event, ""); !errors.Is(err, ErrNotFound) {
			t.Errorf("Resend to a deleted subscription: %v", err)
		}
		if err := subs.RetryDelivery(ctx, "acme", dead); !errors.Is(err, ErrNotFound) {
			t.Errorf("RetryDelivery of a deleted subscription's delivery: %v", err)
		}
		if st := deliveryRowState(t, db, dead); st != before {
			t.Fatalf("the deleted subscription's delivery is now %s", st)
		}
	})
}

func TestReplayWorksInBatches(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		ctx := context.Background()
		sub := seedSubscription(t, subs, "acme")
		const n = 2*ReplayBatchSize + 7
		tx, err := db.Begin()
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < n; i++ {
			seedDelivery(t, tx, sub, DeliveryDead, 0, clock.Now().Add(-time.Hour))
		}
		// Succeeded ones interleaved, not in scope.
		for i := 0; i < 10; i++ {
			seedDelivery(t, tx, sub, DeliverySucceeded, 0, clock.Now().Add(-time.Hour))
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		got, err := subs.Replay(ctx, "acme", sub.ID, ReplayOptions{})
		if err != nil || got != n {
			t.Fatalf("Replay = %d, %v; want %d", got, err, n)
		}
		if c := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'pending'`); c != n {
			t.Fatalf("%d pending, want %d", c, n)
		}
	})
}

func TestReplayThenDispatcherDeliversAgain(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		ctx := context.Background()
		// Requests 1-4 fail (two events, two attempts each, then dead),
		// 5 succeeds, 6 fails, the rest succeed.
		rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) int {
			if n <= 4 || n == 6 {
				return http.StatusServiceUnavailable
			}
			return http.StatusOK
		})
		rc.ignoreTimestamps() // the fake clock moves an hour
		sub := mustSubscribe(t, subs, rc, "acme", "*")
		d, _ := startDispatcher(t, db, Config{Clock: clock, RetryPolicy: immediateRetry{max: 2}})

		deliveryOf := func(event string) string {
			t.Helper()
			page, err := subs.ListDeliveries(ctx, "acme", sub.ID, DeliveryListOptions{})
			if err != nil {
				t.Fatal(err)
			}
			for _, dl := range page.Deliveries {
				if dl.EventID == event {
					return dl.ID
				}
			}
			t.Fatalf("no delivery of %s", event)
			return ""
		}
		evA := publishTx(t, db, Event{Type: "a.b", Tenant: "acme"})[0]
		d.Notify()
		rc.wait(2)
		dlvA := deliveryOf(evA)
		waitDeliveryState(t, subs, "acme", dlvA, DeliveryDead)
		clock.Advance(time.Hour)
		evB := publishTx(t, db, Event{Type: "a.b", Tenant: "acme"})[0]
		d.Notify()
		rc.wait(2)
		dlvB := deliveryOf(evB)
		waitDeliveryState(t, subs, "acme", dlvB, DeliveryDead)

		// Replaying the last half hour sends B again, with its webhook-id.
		n, err := subs.Replay(ctx, "acme", sub.ID, ReplayOptions{Since: clock.Now().Add(-30 * time.Minute)})
		if err != nil || n != 1 {
			t.Fatalf("Replay = %d, %v", n, err)
		}
		d.Notify()
		if got := rc.wait(1)[0]; got.ID != evB || got.Status != 200 {
			t.Fatalf("replayed request %s answered %d, want %s", got.ID, got.Status, evB)
		}
		dl := waitDeliveryState(t, subs, "acme", dlvB, DeliverySucceeded)
		if dl.Attempts != 1 || len(dl.AttemptLog) != 3 || dl.AttemptLog[2].StatusCode != 200 || dl.AttemptLog[0].StatusCode != 503 {
			t.Fatalf("B after replay: %+v", dl)
		}

		// A replayed dead delivery gets a fresh retry schedule: it fails
		// once more and is retried, not dead at once.
		n, err = subs.Replay(ctx, "acme", sub.ID, ReplayOptions{})
		if err != nil || n != 1 {
			t.Fatalf("Replay = %d, %v", n, err)
		}
		d.Notify()
		for _, got := range rc.wait(2) {
			if got.ID != evA {
				t.Fatalf("got %s, want only %s", got.ID, evA)
			}
		}
		dl = waitDeliveryState(t, subs, "acme", dlvA, DeliverySucceeded)
		if dl.Attempts != 2 || len(dl.AttemptLog) != 4 {
			t.Fatalf("A after replay: %+v", dl)
		}

		// Scope all sends the succeeded ones again.
		n, err = subs.Replay(ctx, "acme", sub.ID, ReplayOptions{Scope: ReplayAll})
		if err != nil || n != 2 {
			t.Fatalf("Replay all = %d, %v", n, err)
		}
		d.Notify()
		var ids []string
		for _, got := range rc.wait(2) {
			ids = append(ids, got.ID)
		}
		sort.Strings(ids)
		want := []string{evA, evB}
		sort.Strings(want)
		if strings.Join(ids, ",") != strings.Join(want, ",") {
			t.Fatalf("replayed all: %v, want %v", ids, want)
		}
	})
}

func TestResend(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		ctx := context.Background()
		rc1, rc2 := newReceiver(t, nil), newReceiver(t, nil)
		sub1 := mustSubscribe(t, subs, rc1, "acme", "order.*")
		sub2 := mustSubscribe(t, subs, rc2, "acme", "order.placed")
		d, _ := startDispatcher(t, db, Config{Clock: clock})
		ids := publishTx(t, db, Event{Type: "order.placed", Tenant: "acme"}, Event{Type: "order.shipped", Tenant: "acme"})
		placed, shipped := ids[0], ids[1]
		d.Notify()
		rc1.wait(2)
		rc2.wait(1)
		delivery := func(sub Subscription, event string) Delivery {
			t.Helper()
			// With direct expansion the delivery is a row once recorded,
			// just after the receiver answered.
			for deadline := time.Now().Add(60 * time.Second); ; {
				page, err := subs.ListDeliveries(ctx, "acme", sub.ID, DeliveryListOptions{})
				if err != nil {
					t.Fatal(err)
				}
				for _, dl := range page.Deliveries {
					if dl.EventID == event {
						return waitDeliveryState(t, subs, "acme", dl.ID, DeliverySucceeded)
					}
				}
				if time.Now().After(deadline) {
					t.Fatalf("no delivery of %s to %s", event, sub.ID)
				}
				time.Sleep(2 * time.Millisecond)
			}
		}
		delivery(sub1, placed)
		delivery(sub1, shipped)
		placed2 := delivery(sub2, placed)

		// sub2 matches "order.shipped" now, but never had a delivery of it.
		all := []string{"*"}
		if _, err := subs.Update(ctx, "acme", sub2.ID, SubscriptionUpdate{EventTypes: all}); err != nil {
			t.Fatal(err)
		}
		if err := subs.Resend(ctx, "acme", shipped, sub2.ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Resend to a subscription without a delivery: %v", err)
		}
		if err := subs.Resend(ctx, "acme", "evt_missing", ""); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Resend of a missing event: %v", err)
		}
		if err := subs.Resend(ctx, "globex", placed, ""); !errors.Is(err, ErrNotFound) {
			t.Fatalf("another tenant's Resend: %v", err)
		}

		// Every delivery of the event, with the same webhook-id.
		if err := subs.Resend(ctx, "acme", placed, ""); err != nil {
			t.Fatal(err)
		}
		d.Notify()
		if got := rc1.wait(1)[0]; got.ID != placed {
			t.Fatalf("rc1 got %s, want %s", got.ID, placed)
		}
		if got := rc2.wait(1)[0]; got.ID != placed {
			t.Fatalf("rc2 got %s, want %s", got.ID, placed)
		}
		// One subscription's delivery only.
		if err := subs.Resend(ctx, "acme", shipped, sub1.ID); err != nil {
			t.Fatal(err)
		}
		d.Notify()
		if got := rc1.wait(1)[0]; got.ID != shipped {
			t.Fatalf("rc1 got %s, want %s", got.ID, shipped)
		}
		dl := delivery(sub1, shipped)
		if dl.Attempts != 1 || len(dl.AttemptLog) != 2 {
			t.Fatalf("resent delivery %+v", dl)
		}
		delivery(sub1, placed)
		delivery(sub2, placed)

		// A deleted subscription is skipped.
		if err := subs.Delete(ctx, "acme", sub2.ID); err != nil {
			t.Fatal(err)
		}
		if err := subs.Resend(ctx, "acme", placed, sub2.ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Resend to a deleted subscription: %v", err)
		}
		if err := subs.Resend(ctx, "acme", placed, ""); err != nil {
			t.Fatal(err)
		}
		if st := deliveryRowState(t, db, placed2.ID); !strings.HasPrefix(st, "succeeded/") {
			t.Fatalf("the deleted subscription's delivery is %s", st)
		}
		d.Notify()
		if got := rc1.wait(1)[0]; got.ID != placed {
			t.Fatalf("rc1 got %s, want %s", got.ID, placed)
		}
	})
}

func TestHandlerReplay(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		var notified atomic.Int32
		api := newTestAPIOn(t, db, HandlerConfig{Notify: func() { notified.Add(1) }})
		id := api.create("tok-acme", `{"eventTypes":["*"],"callbackUrl":"https://public.example/"}`)["subscriptionId"].(string)
		sub, err := api.subs.Get(context.Background(), "acme", id)
		if err != nil {
			t.Fatal(err)
		}
		now := time.Now()
		seedDelivery(t, db, sub, DeliveryDead, 2, now.Add(-time.Hour))
		seedDelivery(t, db, sub, DeliverySucceeded, 1, now.Add(-time.Hour))
		seedDelivery(t, db, sub, DeliveryDead, 2, now.Add(-3*time.Hour))
		path := "/webhook-subscriptions/" + id + "/replay"
		replay := func(token, path, body string) apiExchange {
			return api.do(apiReq{method: "POST", path: path, template: tmplReplay, token: token, ctype: "application/json", body: body})
		}
		rfc := func(t time.Time) string { return t.UTC().Format(time.RFC3339) }

		// Refusals change nothing and notify nobody.
		before := storedSnapshot(t, db)
		for _, c := range []struct {
			body  string
			field string
		}{
			{`{}`, "since"},
			{`{"scope":"all"}`, "since"},
			{`{"since":null}`, "since"},
			{`{"since":123}`, "since"},
			{`{"since":"yesterday"}`, "since"},
			{`{"since":"2025-01-02 03:04:05"}`, "since"},
			{`{"since":"` + rfc(now) + `","scope":"dead"}`, "scope"},
			{`{"since":"` + rfc(now) + `","until":"` + rfc(now.Add(-time.Hour)) + `"}`, "until"},
			{`{"since":"` + rfc(now) + `","until":"` + rfc(now) + `"}`, "until"},
			{`{"since":"` + rfc(now) + `","replayAll":true}`, "replayAll"},
		} {
			p := wantProblem(t, replay("tok-acme", path, c.body), 422, "validation")
			if f := fieldErrorsOf(p); len(f) != 1 || f[0] != c.field {
				t.Errorf("%s: errors on %v, want %s", c.body, f, c.field)
			}
		}
		wantProblem(t, replay("tok-acme", path, `{"since":`), 400, "malformed-request")
		wantProblem(t, api.do(apiReq{method: "POST", path: path, template: tmplReplay, token: "tok-acme",
			body: `{"since":"` + rfc(now) + `"}`}), 415, "unsupported-media-type")
		ok := `{"since":"` + rfc(now.Add(-10*time.Hour)) + `","scope":"all"}`
		wantProblem(t, replay("tok-globex", path, ok), 404, "not-found")
		wantProblem(t, replay("tok-acme", "/webhook-subscriptions/sub_missing/replay", ok), 404, "not-found")
		wantProblem(t, replay("", path, ok), 401, "unauthorized")
		if after := storedSnapshot(t, db); after != before || notified.Load() != 0 {
			t.Fatalf("refused replays changed the store (%v) or notified (%d)", after != before, notified.Load())
		}

		requeued := func(ex apiExchange) float64 {
			t.Helper()
			if ex.Status != http.StatusAccepted {
				t.Fatalf("replay: %d %s", ex.Status, ex.Body)
			}
			return ex.json(t)["requeued"].(float64)
		}
		if n := requeued(replay("tok-acme", path, `{"since":"`+rfc(now.Add(-2*time.Hour))+`"}`)); n != 1 || notified.Load() != 1 {
			t.Fatalf("replayed %v, notified %d", n, notified.Load())
		}
		if n := requeued(replay("tok-acme", path, ok)); n != 2 || notified.Load() != 2 {
			t.Fatalf("replayed %v, notified %d", n, notified.Load())
		}
		if n := requeued(replay("tok-acme", path, ok)); n != 0 || notified.Load() != 2 {
			t.Fatalf("replayed %v, notified %d", n, notified.Load())
		}
		if c := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'pending' AND attempts = 0`); c != 3 {
			t.Fatalf("%d deliveries queued again, want 3", c)
		}

		api.do(apiReq{method: "DELETE", path: "/webhook-subscriptions/" + id, template: tmplSub, token: "tok-acme"})
		wantProblem(t, replay("tok-acme", path, ok), 404, "not-found")
	})
}
