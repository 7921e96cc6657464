package webhooks

// Direct expansion (SQLite): the outbox lease lost or lapsed, the
// subscriptions it keeps in memory, deliveries waiting for a slot, and group
// commits.

import (
	"context"
	"database/sql"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// offsetClock is the real clock moved forward by an offset the test sets:
// time passes (group commits wait a PollInterval), and the test can make the
// outbox lease run short at once.
type offsetClock struct{ off atomic.Int64 }

func (c *offsetClock) Now() time.Time          { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *offsetClock) Advance(d time.Duration) { c.off.Add(int64(d)) }

// lossHandler reports the events of each "lost the outbox lease" warning.
type lossHandler struct {
	slog.Handler
	lost chan int
}

func (h lossHandler) Handle(ctx context.Context, r slog.Record) error {
	if strings.Contains(r.Message, "lost the outbox lease") {
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "events" {
				h.lost <- int(a.Value.Int64())
			}
			return true
		})
	}
	return h.Handler.Handle(ctx, r)
}

// After a lost group commit, the dispatcher retakes the lease with an event
// still held (a hanging delivery) and events still buffered. The rescan from
// seq 0 reads only BatchSize+len(held) rows: the cursor must start over with
// it, or the forgotten and buffered events past what the rescan read (here
// G1..G10, G2..G10 never delivered at all) are skipped for as long as
// anything is held.
func TestDirectRescanAfterLostLeaseReadsEveryEvent(t *testing.T) {
	db := openTestDB(t)
	if !directExpansion(t, db) {
		t.Skip("no direct expansion")
	}
	subs := newTestSubscriptions(t, db, nil)

	hangEntered := make(chan struct{}, 10)
	hangRelease := make(chan struct{})
	hang := newReceiver(t, func(_ int, _ http.ResponseWriter, r *http.Request) int {
		hangEntered <- struct{}{}
		select {
		case <-hangRelease:
		case <-r.Context().Done():
		}
		return http.StatusOK
	})
	hang.ignoreTimestamps()
	mustSubscribe(t, subs, hang, "h", "*")

	gate := make(chan struct{})
	entered := make(chan string, 1000)
	var mu sync.Mutex
	byEvent := map[string]int{}
	fast := newReceiver(t, func(_ int, _ http.ResponseWriter, r *http.Request) int {
		id := r.Header.Get("webhook-id")
		mu.Lock()
		byEvent[id]++
		mu.Unlock()
		entered <- id
		<-gate
		return http.StatusOK
	})
	fast.ignoreTimestamps()
	mustSubscribe(t, subs, fast, "f", "*")

	clock := &offsetClock{}
	lost := make(chan int, 100)
	logger := slog.New(lossHandler{Handler: slog.NewTextHandler(testWriter{t}, nil), lost: lost})
	_, _ = startDispatcher(t, db, Config{Clock: clock, Logger: logger, Concurrency: 12,
		MaxInFlightPerSubscription: 12, BatchSize: 10, RequestTimeout: time.Hour, LeaseDuration: 2 * time.Hour})
	t.Cleanup(func() { close(hangRelease) }) // runs before stop

	guard := func() <-chan time.Time { return time.After(20 * time.Second) } // against a hang

	publishTx(t, db, Event{Type: "x", Tenant: "h"})
	<-hangEntered

	// F1..F10 fill 10 slots, G1 the last one; G2..G10 stay buffered.
	var evs []Event
	for i := 0; i < 20; i++ {
		evs = append(evs, Event{Type: "x", Tenant: "f"})
	}
	ids := publishTx(t, db, evs...)
	g := guard()
	for n := 0; n < 11; n++ {
		select {
		case <-entered:
		case <-g:
			t.Fatalf("got %d of 11 first deliveries", n)
		}
	}

	// Another dispatcher takes the lease (as after a stall of this one);
	// this one notices at its next renewal and loses the group commit.
	if _, err := db.Exec(`UPDATE webhook_outbox_lease SET owner = 'other', until = $1`,
		clock.Now().Add(time.Hour).UnixMilli()); err != nil {
		t.Fatal(err)
	}
	clock.Advance(5 * time.Second) // the lease now needs renewing before anything starts
	close(gate)
	g = guard()
	for n := 0; n < 11; {
		select {
		case k := <-lost:
			n += k
		case <-g:
			t.Fatalf("%d of 11 events reported lost", n)
		}
	}

	// The other dispatcher goes away and releases the lease: this one
	// takes it again and must deliver every unexpanded event (F1..F10 and
	// G1 again: documented; G2..G10 for the first time).
	if _, err := db.Exec(`UPDATE webhook_outbox_lease SET until = 0`); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	g = guard()
wait:
	for len(seen) < 20 {
		select {
		case id := <-entered:
			seen[id] = true
		case <-g:
			break wait
		}
	}
	if len(seen) < 20 {
		var missing []int
		for i, id := range ids {
			if !seen[id] {
				missing = append(missing, i)
			}
		}
		unexpanded := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE expanded_at IS NULL AND tenant = 'f'`)
		t.Fatalf("after retaking the lease, %d of 20 events delivered; never read again (index among F1..F10,G1..G10): %v; %d 'f' events unexpanded",
			len(seen), missing, unexpanded)
	}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// A delivery waiting in memory for its subscription's slot when the lease
// lapses must not start once the lease is taken again: another dispatcher may
// have held it meanwhile and expanded (and delivered) that event. (The other
// dispatcher is simulated in the database: lease released, event expanded
// with its delivery recorded.)
func TestDirectWaitingDeliveryDroppedWhenLeaseLapses(t *testing.T) {
	db := openTestDB(t)
	if !directExpansion(t, db) {
		t.Skip("no direct expansion")
	}
	subs := newTestSubscriptions(t, db, nil)
	release := make(chan struct{})
	first := make(chan struct{}, 1)
	rc := newReceiver(t, func(n int, _ http.ResponseWriter, r *http.Request) int {
		if n == 1 {
			first <- struct{}{}
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
		return http.StatusOK
	})
	rc.ignoreTimestamps()
	sub := mustSubscribe(t, subs, rc, "", "*")
	clock := &offsetClock{}
	d, _ := startDispatcher(t, db, Config{Clock: clock, Concurrency: 4, MaxInFlightPerSubscription: 1,
		RequestTimeout: time.Hour, LeaseDuration: 2 * time.Hour})
	var once sync.Once
	releaseA := func() { once.Do(func() { close(release) }) }
	t.Cleanup(releaseA)

	publishTx(t, db, Event{Type: "a"})
	<-first
	e := publishTx(t, db, Event{Type: "e"})[0]
	// Wait until E is read: it waits in memory for the subscription's slot.
	waitUntil(t, "E read", func() bool { return d.heldDeliveries.Load() == 2 })
	// Another dispatcher took the lapsed lease, expanded E, delivered it,
	// and released the lease.
	now := clock.Now().Add(time.Hour + 10*time.Second).UnixMilli()
	if _, err := db.Exec(`UPDATE webhook_outbox_lease SET owner = 'other', until = 0`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`UPDATE webhook_outbox SET expanded_at = $1 WHERE id = $2`, now, e); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`INSERT INTO webhook_deliveries (id, event_id, subscription_id, tenant, state, attempts, next_at,
		created_at, updated_at, delivered_at) VALUES ('dlv_other', $1, $2, '', 'succeeded', 1, $3, $3, $3, $3)`, e, sub.ID, now); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Hour + 10*time.Second) // this dispatcher's lease has lapsed
	releaseA()
	z := publishTx(t, db, Event{Type: "z"})[0]
	d.Notify()
	for {
		got := rc.wait(1)[0]
		if got.ID == e {
			t.Fatalf("event %s delivered again by this dispatcher after another one expanded and delivered it", e)
		}
		if got.ID == z {
			return
		}
	}
}

// Taking the outbox lease never moves its holder's lease back (a group commit
// that waited for the write lock must not shorten the loop's later renewal),
// and another dispatcher takes it only once it lapsed.
func TestOutboxLeaseTakeNeverShortens(t *testing.T) {
	db := openTestDB(t)
	if !directExpansion(t, db) {
		t.Skip("no direct expansion")
	}
	q, err := DialectSQLite.Queries()
	if err != nil {
		t.Fatal(err)
	}
	take := func(owner string, until, now int64) bool {
		t.Helper()
		res, err := db.Exec(q.OutboxLease.Take, owner, until, now)
		if err != nil {
			t.Fatal(err)
		}
		n, err := res.RowsAffected()
		if err != nil {
			t.Fatal(err)
		}
		return n == 1
	}
	lease := func() (owner string, until int64) {
		t.Helper()
		if err := db.QueryRow(q.OutboxLease.Select).Scan(&owner, &until); err != nil {
			t.Fatal(err)
		}
		return owner, until
	}
	if !take("a", 200, 100) || !take("a", 150, 110) {
		t.Fatal("the holder could not renew its lease")
	}
	if owner, until := lease(); owner != "a" || until != 200 {
		t.Fatalf("lease %s until %d, want a until 200 (never shortened)", owner, until)
	}
	if take("b", 300, 199) {
		t.Fatal("another dispatcher took a lease that had not lapsed")
	}
	if !take("b", 300, 200) {
		t.Fatal("another dispatcher could not take a lapsed lease")
	}
	if owner, until := lease(); owner != "b" || until != 300 {
		t.Fatalf("lease %s until %d, want b until 300", owner, until)
	}
}

// Expansion sees every change of a subscription made before an event is
// published, however many events it expanded before (direct expansion keeps
// the subscriptions in memory while their version stays the same).
func TestExpansionSeesSubscriptionChanges(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		ctx := context.Background()
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		ra, rb, rc := newReceiver(t, nil), newReceiver(t, nil), newReceiver(t, nil)
		a := mustSubscribe(t, subs, ra, "t", "*")
		startDispatcher(t, db, Config{})
		next := func(r *receiver, want string) {
			t.Helper()
			if got := r.wait(1)[0].ID; got != want {
				t.Fatalf("got event %s, want %s", got, want)
			}
		}

		e1 := publishTx(t, db, Event{Type: "order.shipped", Tenant: "t"})[0]
		next(ra, e1)

		b := mustSubscribe(t, subs, rb, "t", "*") // created
		e2 := publishTx(t, db, Event{Type: "order.shipped", Tenant: "t"})[0]
		next(ra, e2)
		next(rb, e2)

		if _, err := subs.Update(ctx, "t", a.ID, SubscriptionUpdate{EventTypes: []string{"other.*"}}); err != nil {
			t.Fatal(err)
		}
		e3 := publishTx(t, db, Event{Type: "order.shipped", Tenant: "t"})[0]
		next(rb, e3)
		e4 := publishTx(t, db, Event{Type: "other.thing", Tenant: "t"})[0]
		next(ra, e4) // not e3
		next(rb, e4)

		disabled := true
		if _, err := subs.Update(ctx, "t", b.ID, SubscriptionUpdate{Disabled: &disabled}); err != nil {
			t.Fatal(err)
		}
		e5 := publishTx(t, db, Event{Type: "other.thing", Tenant: "t"})[0]
		next(ra, e5)
		waitUntil(t, "e5 expanded", func() bool {
			return countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE id = $1 AND expanded_at IS NOT NULL`, e5) == 1
		})
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE event_id = $1 AND subscription_id = $2 AND state = 'paused'`, e5, b.ID); n != 1 {
			t.Fatalf("e5 to the disabled subscription: %d paused deliveries, want 1", n)
		}

		if err := subs.Delete(ctx, "t", a.ID); err != nil {
			t.Fatal(err)
		}
		mustSubscribe(t, subs, rc, "t", "*")
		e6 := publishTx(t, db, Event{Type: "other.thing", Tenant: "t"})[0]
		next(rc, e6)
		waitUntil(t, "e6 expanded", func() bool {
			return countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE id = $1 AND expanded_at IS NOT NULL`, e6) == 1
		})
		if n := ra.count(); n != 4 {
			t.Fatalf("the deleted subscription got %d requests, want 4 (e1, e2, e4, e5)", n)
		}
	})
}

// An event read into direct expansion's buffer before its subscription is
// disabled or deleted, but started only after Update or Delete returned, is
// not sent to it: the subscriptions' version is looked at on every expansion
// that starts events, not only when events are read (a regression an
// independent review found).
func TestBufferedEventSeesSubscriptionChangedBeforeItStarts(t *testing.T) {
	t.Run("disabled", func(t *testing.T) { testBufferedEventSubscriptionChange(t, false) })
	t.Run("deleted", func(t *testing.T) { testBufferedEventSubscriptionChange(t, true) })
}

func testBufferedEventSubscriptionChange(t *testing.T, del bool) {
	db := openTestDB(t)
	if !directExpansion(t, db) {
		t.Skip("no direct expansion")
	}
	ctx := context.Background()
	subs := newTestSubscriptions(t, db, nil)
	entered := make(chan string, 100)
	release1, release2 := make(chan struct{}), make(chan struct{})
	rc := newReceiver(t, func(n int, _ http.ResponseWriter, r *http.Request) int {
		entered <- r.Header.Get("webhook-id")
		switch n {
		case 1:
			<-release1
		case 2:
			<-release2
		}
		return http.StatusOK
	})
	s := mustSubscribe(t, subs, rc, "t", "*")
	startDispatcher(t, db, Config{Concurrency: 2})
	var once1, once2 sync.Once
	t.Cleanup(func() { once1.Do(func() { close(release1) }); once2.Do(func() { close(release2) }) })

	e1 := publishTx(t, db, Event{Type: "a", Tenant: "t"})[0]
	if got := <-entered; got != e1 {
		t.Fatalf("first request %s, want %s", got, e1)
	}
	var evs []Event
	for i := 0; i < 9; i++ {
		evs = append(evs, Event{Type: "a", Tenant: "t"})
	}
	ids := publishTx(t, db, evs...) // E2..E10: one slot free, so E2 starts and E3.. stay read but not started
	if got := <-entered; got != ids[0] {
		t.Fatalf("second request %s, want %s", got, ids[0])
	}
	if del {
		if err := subs.Delete(ctx, "t", s.ID); err != nil {
			t.Fatal(err)
		}
	} else {
		disabled := true
		if _, err := subs.Update(ctx, "t", s.ID, SubscriptionUpdate{Disabled: &disabled}); err != nil {
			t.Fatal(err)
		}
	}
	once1.Do(func() { close(release1) }) // a slot frees
	e3 := ids[1]
	waitUntil(t, "E3 expanded", func() bool {
		return countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE id = $1 AND expanded_at IS NOT NULL`, e3) == 1
	})
	state := "(no row)"
	_ = db.QueryRow(`SELECT state FROM webhook_deliveries WHERE event_id = $1`, e3).Scan(&state)
	late := 0
	for len(entered) > 0 {
		<-entered
		late++
	}
	if del {
		if late > 0 {
			t.Fatalf("E3: %d requests sent to a subscription after Delete returned; its delivery: %s", late, state)
		}
		return
	}
	if state != "paused" || late > 0 {
		t.Fatalf("E3 (published before the subscription was disabled, started after): delivery %s, %d requests sent after Update(Disabled) returned; want paused, none", state, late)
	}
}

// Next to an endpoint that hangs with a backlog, the events whose other
// deliveries are done get recorded: a delivery waiting in memory for the
// hanging subscription's slot becomes a row once claims have rows of that
// subscription to make (before, it waited behind them for as long as they
// kept coming, and held its event unexpanded with it).
func TestDirectWaitingBehindClaimsBecomesARow(t *testing.T) {
	db := openTestDB(t)
	if !directExpansion(t, db) {
		t.Skip("no direct expansion")
	}
	subs := newTestSubscriptions(t, db, nil)
	release := make(chan struct{})
	var once sync.Once
	healthy := newReceiver(t, nil)
	hanging := newReceiver(t, func(_ int, _ http.ResponseWriter, r *http.Request) int {
		select {
		case <-release:
		case <-r.Context().Done():
		}
		return http.StatusOK
	})
	mustSubscribe(t, subs, healthy, "t", "*")
	mustSubscribe(t, subs, hanging, "t", "*")
	startDispatcher(t, db, Config{Concurrency: 4, MaxInFlightPerSubscription: 1, RequestTimeout: time.Hour, LeaseDuration: 2 * time.Hour})
	t.Cleanup(func() { once.Do(func() { close(release) }) })

	var evs []Event
	for i := 0; i < 20; i++ {
		evs = append(evs, Event{Type: "a", Tenant: "t"})
	}
	publishTx(t, db, evs...)
	healthy.wait(20)
	// Only the event whose request to the hanging endpoint is in flight
	// stays unexpanded (its delivery to the healthy one with it): the
	// healthy endpoint's 19 others are recorded.
	waitUntil(t, "every other event recorded", func() bool {
		return countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE expanded_at IS NULL`) == 1 &&
			countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'succeeded'`) == 19
	})
}

// Group commits of direct expansion with a disabled subscription next to a
// slow healthy one, events trickling in: the disabled one's deliveries are
// recorded paused, never claimable, so they must not make every ready event
// be recorded at once (found by an independent review: 743 group commits
// against 43 without the disabled subscription).
func TestDirectGroupCommitsWithADisabledSubscription(t *testing.T) {
	commits := map[bool]int{}
	for _, withDisabled := range []bool{false, true} {
		t.Run(map[bool]string{false: "healthy-only", true: "plus-disabled"}[withDisabled], func(t *testing.T) {
			db := openTestDB(t)
			if !directExpansion(t, db) {
				t.Skip("no direct expansion")
			}
			subs := newTestSubscriptions(t, db, nil)
			healthy := newReceiver(t, func(int, http.ResponseWriter, *http.Request) int {
				time.Sleep(300 * time.Millisecond)
				return 200
			})
			mustSubscribe(t, subs, healthy, "t", "*")
			if withDisabled {
				other := newReceiver(t, nil)
				_, err := subs.Create(context.Background(), Subscription{Tenant: "t", URL: other.URL(), EventTypes: []string{"*"}, Disabled: true})
				if err != nil {
					t.Fatal(err)
				}
			}
			d, stop := startDispatcher(t, db, Config{Concurrency: 64, MaxInFlightPerSubscription: 64, PollInterval: 100 * time.Millisecond})
			const n = 600
			for i := 0; i < n/10; i++ {
				var evs []Event
				for k := 0; k < 10; k++ {
					evs = append(evs, Event{Type: "a", Tenant: "t"})
				}
				publishTx(t, db, evs...)
				d.Notify()
				time.Sleep(5 * time.Millisecond) // paces the publishing: events trickle in
			}
			healthy.wait(n)
			waitUntil(t, "all expanded", func() bool {
				return countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE expanded_at IS NULL`) == 0
			})
			stop()
			// Each group commit marks its events expanded at its own now.
			c := countRows(t, db, `SELECT COUNT(DISTINCT expanded_at) FROM webhook_outbox`)
			commits[withDisabled] = c
			t.Logf("disabled=%v: >= %d group commits, %.1f events each", withDisabled, c, float64(n)/float64(c))
		})
	}
	if commits[true] > 3*commits[false] {
		t.Fatalf("a disabled subscription (its deliveries recorded paused, never claimable) multiplied the group commits: %d against %d", commits[true], commits[false])
	}
}
