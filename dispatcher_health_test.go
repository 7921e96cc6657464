package webhooks

import (
	"context"
	"database/sql"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outboxhook/webhooks/store"
)

// opRecorder collects operational events from Config.OnOperationalEvent.
type opRecorder struct {
	mu  sync.Mutex
	ops []OperationalEvent
	ch  chan OperationalEvent
}

func newOpRecorder() *opRecorder { return &opRecorder{ch: make(chan OperationalEvent, 1000)} }

func (o *opRecorder) hook(_ context.Context, e OperationalEvent) {
	o.mu.Lock()
	o.ops = append(o.ops, e)
	o.mu.Unlock()
	o.ch <- e
}

// waitFor returns the first event of type typ, failing after a generous
// deadline (a hang guard).
func (o *opRecorder) waitFor(t *testing.T, typ OperationalEventType) OperationalEvent {
	t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		select {
		case e := <-o.ch:
			if e.Type == typ {
				return e
			}
		case <-deadline:
			t.Fatalf("no %s operational event", typ)
		}
	}
}

func (o *opRecorder) count(typ OperationalEventType) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for _, e := range o.ops {
		if e.Type == typ {
			n++
		}
	}
	return n
}

func TestHealthIsTrackedAndResetBySuccess(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		ctx := context.Background()
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		healthy, third := make(chan struct{}), make(chan struct{})
		rc := newReceiver(t, func(n int, _ http.ResponseWriter, _ *http.Request) int {
			if n <= 2 {
				return http.StatusInternalServerError
			}
			if n == 3 {
				close(third)
			}
			<-healthy
			return http.StatusOK
		})
		rc.ignoreTimestamps()
		sub := mustSubscribe(t, subs, rc, "acme", "*")
		ops := newOpRecorder()
		startDispatcher(t, db, Config{Clock: clock, RetryPolicy: immediateRetry{max: 10},
			FailingAfterAttempts: 2, OnOperationalEvent: ops.hook})
		began := clock.Now()
		publishTx(t, db, Event{Type: "a.b", Tenant: "acme"})

		failing := ops.waitFor(t, OpDeliveryFailing)
		if failing.Attempts != 2 || failing.SubscriptionID != sub.ID || failing.Tenant != "acme" || failing.StatusCode != 500 || failing.DeliveryID == "" {
			t.Fatalf("delivery.failing event %+v", failing)
		}
		rc.wait(2)
		<-third // held until healthy is closed; both failures are recorded by now
		waitUntil(t, "two recorded failures", func() bool {
			return countRows(t, db, `SELECT COUNT(*) FROM `+allAttempts) == 2
		})
		got, err := subs.Get(ctx, "acme", sub.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.ConsecutiveFailures != 2 || !got.FailingSince.Equal(began.Truncate(time.Millisecond)) || !got.LastSuccessAt.IsZero() {
			t.Fatalf("while failing: failures %d since %v (want %v), last success %v",
				got.ConsecutiveFailures, got.FailingSince, began, got.LastSuccessAt)
		}
		close(healthy)
		waitUntil(t, "a recorded success", func() bool {
			got, err = subs.Get(ctx, "acme", sub.ID)
			return err == nil && !got.LastSuccessAt.IsZero()
		})
		if got.ConsecutiveFailures != 0 || !got.FailingSince.IsZero() || got.Disabled {
			t.Fatalf("after a success: failures %d since %v, enabled %v", got.ConsecutiveFailures, got.FailingSince, !got.Disabled)
		}
		if n := ops.count(OpDeliveryFailing); n != 1 {
			t.Fatalf("%d delivery.failing events, want 1", n)
		}
	})
}

// A subscription that fails without a success for DisableAfter is
// disabled; its deliveries, and those of events published meanwhile, wait
// and go out when it is enabled again.
func TestFailingSubscriptionIsDisabledAndItsDeliveriesPaused(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		ctx := context.Background()
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		var ok atomic.Bool
		rc := newReceiver(t, func(int, http.ResponseWriter, *http.Request) int {
			if ok.Load() {
				return http.StatusOK
			}
			return http.StatusServiceUnavailable
		})
		rc.ignoreTimestamps()
		sub := mustSubscribe(t, subs, rc, "acme", "*")
		ops := newOpRecorder()
		// Retries every hour of the fake clock; the test moves it.
		_, stop := startDispatcher(t, db, Config{Clock: clock, RetryPolicy: hourlyRetry{},
			DisableAfter: 5 * time.Hour, DisableMinFailures: 3, OnOperationalEvent: ops.hook})
		first := publishTx(t, db, Event{Type: "a.b", Tenant: "acme"})[0]
		rc.wait(1)
		for i := 0; i < 5; i++ { // 5 more attempts an hour apart: failing for 5h
			waitUntil(t, "the attempt recorded", func() bool {
				return countRows(t, db, `SELECT COUNT(*) FROM `+allAttempts) == i+1
			})
			clock.Advance(time.Hour)
			rc.wait(1)
		}
		dis := ops.waitFor(t, OpSubscriptionDisabled)
		if dis.SubscriptionID != sub.ID || dis.Tenant != "acme" || !strings.Contains(dis.Error, "without a success") {
			t.Fatalf("subscription.disabled event %+v", dis)
		}
		got, err := subs.Get(ctx, "acme", sub.ID)
		if err != nil {
			t.Fatal(err)
		}
		if !got.Disabled || got.DisabledReason != dis.Error || got.ConsecutiveFailures < 3 {
			t.Fatalf("after auto-disable: enabled %v reason %q failures %d", !got.Disabled, got.DisabledReason, got.ConsecutiveFailures)
		}
		// Paused: the failing delivery and a new event's wait.
		second := publishTx(t, db, Event{Type: "a.c", Tenant: "acme"})[0]
		waitUntil(t, "two paused deliveries", func() bool {
			return countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'paused'`) == 2
		})
		clock.Advance(2 * time.Hour) // both due now, yet none goes out
		before := rc.count()
		stop()
		if n := rc.count(); n != before {
			t.Fatalf("a disabled subscription received %d requests", n-before)
		}
		// Enabled again (and healthy): both go out.
		ok.Store(true)
		no := false
		if _, err := subs.Update(ctx, "acme", sub.ID, SubscriptionUpdate{Disabled: &no}); err != nil {
			t.Fatal(err)
		}
		startDispatcher(t, db, Config{Clock: clock, RetryPolicy: hourlyRetry{}, DisableAfter: 5 * time.Hour, DisableMinFailures: 3})
		ids := map[string]bool{}
		for _, r := range rc.wait(2) {
			ids[r.ID] = true
		}
		if !ids[first] || !ids[second] {
			t.Fatalf("after re-enabling got %v, want %s and %s", ids, first, second)
		}
	})
}

// hourlyRetry retries every failure an hour later, forever.
type hourlyRetry struct{}

func (hourlyRetry) NextAttempt(FailedAttempt) (time.Duration, bool) { return time.Hour, true }

func TestOperationalEventsArePublishedToTheOperatorsSubscriptions(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		broken := newReceiver(t, func(int, http.ResponseWriter, *http.Request) int { return http.StatusBadGateway })
		brokenSub := mustSubscribe(t, subs, broken, "acme", "*")
		operator := newReceiver(t, nil)
		mustSubscribe(t, subs, operator, "ops", "delivery.*", "subscription.*")
		startDispatcher(t, db, Config{RetryPolicy: immediateRetry{max: 1}, PublishOperationalEvents: true, OperationalTenant: "ops"})
		evt := publishTx(t, db, Event{Type: "order.placed", Tenant: "acme"})[0]
		got := operator.wait(1)[0]
		body := string(got.Body)
		for _, want := range []string{`"type":"delivery.exhausted"`, `"subscriptionId":"` + brokenSub.ID + `"`, `"eventId":"` + evt + `"`, `"tenant":"acme"`} {
			if !strings.Contains(body, want) {
				t.Fatalf("operational event body %s lacks %s", body, want)
			}
		}
	})
}

// A rate-limited subscription gets at most its rate; another one of the
// same tenant is not held back (it is the witness that the dispatcher kept
// working while the limited one waited).
func TestRateLimitHoldsBackOnlyThatSubscription(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		ctx := context.Background()
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		limited, free := newReceiver(t, nil), newReceiver(t, nil)
		limited.ignoreTimestamps()
		free.ignoreTimestamps()
		ls, err := subs.Create(ctx, Subscription{Tenant: "acme", URL: limited.URL(), EventTypes: []string{"*"}, RateLimit: 1})
		if err != nil {
			t.Fatal(err)
		}
		limited.setSecrets(ls.Secret)
		mustSubscribe(t, subs, free, "acme", "*")
		startDispatcher(t, db, Config{Clock: clock})
		for i := 0; i < 5; i++ {
			publishTx(t, db, Event{Type: "a.b", Tenant: "acme"})
		}
		free.wait(5)
		limited.wait(1) // the bucket's one token
		publishTx(t, db, Event{Type: "a.c", Tenant: "acme"})
		free.wait(1) // later work went on: the limited one has had time
		if n := limited.count(); n != 1 {
			t.Fatalf("limited subscription received %d requests at 1/s with the clock stopped", n)
		}
		clock.Advance(3 * time.Second) // the bucket holds at most one second's worth
		limited.wait(1)
		publishTx(t, db, Event{Type: "a.d", Tenant: "acme"})
		free.wait(1)
		if n := limited.count(); n != 2 {
			t.Fatalf("limited subscription received %d requests, want 2", n)
		}
		clock.Advance(10 * time.Second)
		limited.wait(1)
	})
}

// A 429 holds back only its subscription, until its Retry-After.
func TestTooManyRequestsSlowsOnlyThatSubscription(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		busy := newReceiver(t, func(n int, w http.ResponseWriter, _ *http.Request) int {
			if n == 1 {
				w.Header().Set("Retry-After", "30")
				return http.StatusTooManyRequests
			}
			return http.StatusOK
		})
		other := newReceiver(t, nil)
		busy.ignoreTimestamps()
		other.ignoreTimestamps()
		mustSubscribe(t, subs, busy, "acme", "*")
		mustSubscribe(t, subs, other, "acme", "*")
		startDispatcher(t, db, Config{Clock: clock})
		publishTx(t, db, Event{Type: "a.b", Tenant: "acme"})
		busy.wait(1)
		other.wait(1)
		// Once the 429 is recorded the dispatcher has seen it (deliveries
		// it admitted before that could still go out).
		waitUntil(t, "the 429 recorded", func() bool {
			return countRows(t, db, `SELECT COUNT(*) FROM `+allAttempts+` WHERE status_code = 429`) == 1
		})
		for i := 0; i < 3; i++ {
			publishTx(t, db, Event{Type: "a.c", Tenant: "acme"})
			other.wait(1)
		}
		if n := busy.count(); n != 1 {
			t.Fatalf("the throttled subscription received %d requests during its Retry-After", n)
		}
		clock.Advance(31 * time.Second)
		busy.wait(4) // the retry and the three new ones
	})
}

func TestStaticHeadersAreSentAndCannotOverrideTheLibrarys(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		ctx := context.Background()
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		rc := newReceiver(t, nil)
		sub, err := subs.Create(ctx, Subscription{Tenant: "acme", URL: rc.URL(), EventTypes: []string{"*"},
			Headers: map[string]string{"X-Token": "s3cr3t", "x-tenant-ref": "42"}})
		if err != nil {
			t.Fatal(err)
		}
		rc.setSecrets(sub.Secret)
		if _, err := subs.Create(ctx, Subscription{Tenant: "acme", URL: rc.URL(), EventTypes: []string{"*"},
			Headers: map[string]string{"Webhook-Signature": "v1,forged"}}); err == nil {
			t.Fatal("a header overriding webhook-signature was accepted")
		}
		startDispatcher(t, db, Config{})
		id := publishTx(t, db, Event{Type: "a.b", Tenant: "acme"})[0]
		got := rc.wait(1)[0] // wait fails the test if the signature does not verify
		if got.Header.Get("X-Token") != "s3cr3t" || got.Header.Get("X-Tenant-Ref") != "42" || got.ID != id {
			t.Fatalf("headers %v", got.Header)
		}
	})
}

// An attempt's error text may hold anything a peer sent, NUL bytes and
// invalid UTF-8 included (a certificate's names, say); recording it must
// not fail (PostgreSQL refuses NUL in text and JSON), or the dispatcher
// would stall on it.
func TestHostileErrorTextIsRecorded(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		ctx := context.Background()
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		rc := newReceiver(t, nil)
		mustSubscribe(t, subs, rc, "", "*")
		d, err := NewDispatcher(db, allowLoopback(Config{RetryPolicy: immediateRetry{max: 5}}))
		if err != nil {
			t.Fatal(err)
		}
		publishTx(t, db, Event{Type: "a.b"})
		jobs, _, err := testClaim(ctx, d, 1, map[string]int{}, false)
		if err != nil || len(jobs) == 0 {
			if _, err := testExpand(ctx, d); err != nil {
				t.Fatal(err)
			}
			jobs, _, err = testClaim(ctx, d, 1, map[string]int{}, false)
		}
		if err != nil || len(jobs) != 1 {
			t.Fatalf("claim: %d %v", len(jobs), err)
		}
		hostile := "x509: certificate is valid for evil\x00.example, \xff\xfe" + strings.Repeat("long ", 1000)
		if err := testRecord(ctx, d, []result{{job: jobs[0], started: time.Now(), errText: hostile}}); err != nil {
			t.Fatalf("recording a hostile error text: %v", err)
		}
		var stored string
		if err := db.QueryRow(`SELECT error FROM ` + allAttempts).Scan(&stored); err != nil {
			t.Fatal(err)
		}
		if strings.ContainsRune(stored, 0) || len(stored) > 1100 || !strings.HasPrefix(stored, "x509: certificate is valid for evil") {
			t.Fatalf("stored error text %q", stored[:min(80, len(stored))])
		}
	})
}

// On PostgreSQL an attempt recorded while the subscription is being enabled
// waits for the enabling transaction: the retry it records comes out pending,
// never paused after the enabling transaction resumed the paused ones (it
// would stay paused for good).
func TestRecordDuringEnableIsNotLeftPaused(t *testing.T) {
	ctx := context.Background()
	db := openPostgresTestDB(t)
	subs := newTestSubscriptions(t, db, nil)
	rc := newReceiver(t, nil)
	sub := mustSubscribe(t, subs, rc, "", "*")
	d, err := NewDispatcher(db, allowLoopback(Config{RetryPolicy: immediateRetry{max: 5}}))
	if err != nil {
		t.Fatal(err)
	}
	publishTx(t, db, Event{Type: "a.b"})
	if _, err := testExpand(ctx, d); err != nil {
		t.Fatal(err)
	}
	jobs, _, err := testClaim(ctx, d, 1, map[string]int{}, false)
	if err != nil || len(jobs) != 1 {
		t.Fatalf("claim: %d %v", len(jobs), err)
	}
	// Disabled while the attempt is in flight...
	if _, err := db.Exec(`UPDATE webhook_subscriptions SET enabled = FALSE WHERE id = $1`, sub.ID); err != nil {
		t.Fatal(err)
	}
	// ...and being enabled again, as Subscriptions.Update does, when the
	// attempt's result is recorded.
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	if _, err := tx.Exec(`SELECT id FROM webhook_subscriptions WHERE id = $1 FOR UPDATE`, sub.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(`UPDATE webhook_subscriptions SET enabled = TRUE WHERE id = $1`, sub.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(store.ResumeDeliveries, time.Now().UnixMilli(), sub.ID); err != nil {
		t.Fatal(err)
	}
	recorded := make(chan error, 1)
	go func() {
		recorded <- testRecord(ctx, d, []result{{job: jobs[0], started: time.Now(), status: 500, errText: "HTTP 500"}})
	}()
	// The record waits for the subscription's row lock.
	waitUntil(t, "the record to wait for the enabling transaction", func() bool {
		return countRows(t, db, `SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE webhook_deliveries%'`) > 0
	})
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := <-recorded; err != nil {
		t.Fatal(err)
	}
	if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'pending' AND attempts = 1`); n != 1 {
		t.Fatalf("the retry of a just enabled subscription is not pending (paused for good?)")
	}
}

// TestUpdateSurvivesDeadlockWithRecording: a dispatcher step that has
// recorded a delivery (its row locked) and then updates the subscription's
// health, against Subscriptions.Update disabling that subscription (its row
// locked, then its deliveries paused), lock in opposite orders. PostgreSQL
// aborts one of them; when that is the Update, it runs again and succeeds
// instead of handing the deadlock to its caller.
func TestUpdateSurvivesDeadlockWithRecording(t *testing.T) {
	ctx := context.Background()
	db := openPostgresTestDB(t)
	subs := newTestSubscriptions(t, db, nil)
	sub := seedSubscription(t, subs, "acme")
	dlv, _ := seedDelivery(t, db, sub, DeliveryPending, 0, time.Now())

	// The step, by hand: the delivery's row first. Its deadlock_timeout is
	// longer than the server's, so the Update, which waits first, is the
	// one PostgreSQL finds in the deadlock and aborts.
	step, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer step.Rollback()
	var pid int
	if err := step.QueryRow(`SELECT pg_backend_pid()`).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	if _, err := step.Exec(`SET LOCAL deadlock_timeout = '10s'`); err != nil {
		t.Fatal(err)
	}
	if _, err := step.Exec(`UPDATE webhook_deliveries SET updated_at = updated_at + 1 WHERE id = $1`, dlv); err != nil {
		t.Fatal(err)
	}

	updated := make(chan error, 1)
	yes := true
	go func() {
		_, err := subs.Update(ctx, "acme", sub.ID, SubscriptionUpdate{Disabled: &yes})
		updated <- err
	}()
	waitUntil(t, "the Update to wait for the step's delivery row", func() bool {
		return countRows(t, db, `SELECT COUNT(*) FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid))`, pid) > 0
	})
	// The step's health update now waits for the Update's subscription
	// lock: a deadlock, which aborts the Update's first attempt.
	if _, err := step.Exec(`UPDATE webhook_subscriptions SET last_success_at = $1 WHERE id = $2`, time.Now().UnixMilli(), sub.ID); err != nil {
		t.Fatalf("the step was aborted instead of the Update: %v", err)
	}
	if err := step.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := <-updated; err != nil {
		t.Fatalf("Update: %v", err)
	}
	got, err := subs.Get(ctx, "acme", sub.ID)
	if err != nil || !got.Disabled {
		t.Fatalf("after Update: disabled %v, %v", got.Disabled, err)
	}
	if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE id = $1 AND state = 'paused'`, dlv); n != 1 {
		t.Fatalf("delivery %s, want paused", deliveryRowState(t, db, dlv))
	}
}

// A batch that records a lost claim (here: the subscription was deleted
// while its delivery was in flight) still raises the operational events of
// the other deliveries it records: only the lost one is left out.
func TestLostClaimLeavesTheBatchsOtherEventsAlone(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		ctx := context.Background()
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		rc := newReceiver(t, nil)
		gone := mustSubscribe(t, subs, rc, "acme", "*")
		kept := mustSubscribe(t, subs, rc, "acme", "*")
		d, err := NewDispatcher(db, allowLoopback(Config{RetryPolicy: immediateRetry{max: 1}}))
		if err != nil {
			t.Fatal(err)
		}
		publishTx(t, db, Event{Type: "a.b", Tenant: "acme"})
		if _, err := testExpand(ctx, d); err != nil {
			t.Fatal(err)
		}
		jobs, _, err := testClaim(ctx, d, 2, map[string]int{}, false)
		if err != nil || len(jobs) != 2 {
			t.Fatalf("claim: %d %v", len(jobs), err)
		}
		if err := subs.Delete(ctx, "acme", gone.ID); err != nil {
			t.Fatal(err)
		}
		// Both attempts fail for good (one attempt allowed).
		var results []result
		for _, j := range jobs {
			results = append(results, result{job: j, started: time.Now(), status: 500, errText: "HTTP 500"})
		}
		out, err := d.step(ctx, stepInput{results: results, perSub: map[string]int{}})
		if err != nil {
			t.Fatal(err)
		}
		var exhausted []string
		for _, op := range out.ops {
			if op.Type == OpDeliveryExhausted {
				exhausted = append(exhausted, op.SubscriptionID)
			}
		}
		if len(exhausted) != 1 || exhausted[0] != kept.ID {
			t.Fatalf("delivery.exhausted raised for %v, want only the kept subscription %s", exhausted, kept.ID)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE subscription_id = $1 AND state = 'dead'`, kept.ID); n != 1 {
			t.Fatalf("kept subscription: %d dead deliveries, want 1", n)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE subscription_id = $1 AND state = 'canceled'`, gone.ID); n != 1 {
			t.Fatalf("deleted subscription: %d canceled deliveries, want 1 (left as the delete made it)", n)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM `+allAttempts); n != 2 {
			t.Fatalf("%d attempts recorded, want both (2)", n)
		}
	})
}

// A step whose transaction fails gives back the rate-limit tokens its
// admissions took: the next step may start the delivery at once, not a
// second later.
func TestFailedStepGivesBackRateLimitTokens(t *testing.T) {
	ctx := context.Background()
	db := openTestDB(t)
	clock := newFakeClock()
	subs := newTestSubscriptions(t, db, clock)
	rc := newReceiver(t, nil)
	if _, err := subs.Create(ctx, Subscription{Tenant: "acme", URL: rc.URL(), EventTypes: []string{"*"}, RateLimit: 1}); err != nil {
		t.Fatal(err)
	}
	d, err := NewDispatcher(db, allowLoopback(Config{Clock: clock}))
	if err != nil {
		t.Fatal(err)
	}
	publishTx(t, db, Event{Type: "a.b", Tenant: "acme"})
	// The first step admits the delivery (taking the one token a rate of 1
	// allows), then fails to write it.
	if _, err := db.Exec(`CREATE TRIGGER fail_insert BEFORE INSERT ON webhook_deliveries
		BEGIN SELECT RAISE(ABORT, 'no deliveries now'); END`); err != nil {
		t.Fatal(err)
	}
	lim := newLimiter()
	in := stepInput{free: 1, expand: true, perSub: map[string]int{}, perEvent: 1, limiter: lim}
	if _, err := d.step(ctx, in); err == nil || !strings.Contains(err.Error(), "no deliveries now") {
		t.Fatalf("step with a failing insert: %v", err)
	}
	if _, err := db.Exec(`DROP TRIGGER fail_insert`); err != nil {
		t.Fatal(err)
	}
	// At the same instant, the next step has the token back.
	out, err := d.step(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	if len(out.jobs) != 1 {
		t.Fatalf("%d jobs started after the failed step, want 1 (its token given back); held back: %v", len(out.jobs), out.refused)
	}
}
