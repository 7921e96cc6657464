package webhookstest

import (
	"errors"
	"net/http"
	"net/netip"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outboxhook/webhooks"
)

func subscribe(t *testing.T, h *Harness, rc *Receiver, tenant string, types ...string) webhooks.Subscription {
	t.Helper()
	sub, err := h.Subscribe(guardCtx(t), rc, tenant, types...)
	if err != nil {
		t.Fatal(err)
	}
	return sub
}

func attemptStatuses(d webhooks.Delivery) []int {
	var out []int
	for _, a := range d.AttemptLog {
		out = append(out, a.StatusCode)
	}
	return out
}

func TestHarnessFailNextCausesRecordedRetries(t *testing.T) {
	ctx := guardCtx(t)
	h := NewHarness(t, webhooks.Config{RetryPolicy: ImmediateRetries(3)})
	rc := NewReceiver(t)
	sub := subscribe(t, h, rc, "acme", "order.*")
	rc.FailNext(2, http.StatusServiceUnavailable)

	ids, err := h.Publish(ctx, webhooks.Event{Type: "order.placed", Tenant: "acme", Data: map[string]int{"n": 1}})
	if err != nil || len(ids) != 1 {
		t.Fatalf("Publish = %v, %v", ids, err)
	}
	got, err := rc.WaitForUnique(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if got[0].ID != ids[0] || got[0].Type != "order.placed" || string(got[0].Data) != `{"n":1}` || got[0].VerifyErr != nil {
		t.Errorf("delivered %+v", got[0])
	}
	var statuses []int
	for _, r := range rc.ByID(ids[0]) {
		statuses = append(statuses, r.Status)
		if r.VerifyErr != nil {
			t.Errorf("attempt failed verification: %v", r.VerifyErr)
		}
	}
	if want := []int{503, 503, 200}; !reflect.DeepEqual(statuses, want) {
		t.Errorf("receiver answered %v, want %v", statuses, want)
	}

	// Stop waits for the last attempt to be recorded.
	if err := h.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.Stop(ctx); err != nil {
		t.Errorf("second Stop = %v", err)
	}
	ds, err := h.Deliveries(ctx, sub)
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != 1 {
		t.Fatalf("%d deliveries, want 1", len(ds))
	}
	d := ds[0]
	if d.EventID != ids[0] || d.State != webhooks.DeliverySucceeded || d.Attempts != 3 ||
		!reflect.DeepEqual(attemptStatuses(d), []int{503, 503, 200}) {
		t.Errorf("delivery %s of %s after %d attempts %v; want succeeded after 503, 503, 200",
			d.State, d.EventID, d.Attempts, attemptStatuses(d))
	}
}

func TestHarnessRecordsSignatureFailures(t *testing.T) {
	ctx := guardCtx(t)
	h := NewHarness(t, webhooks.Config{RetryPolicy: ImmediateRetries(1)})
	rc := NewReceiver(t)
	sub := subscribe(t, h, rc, "acme")
	// The receiver expects another secret than the subscription's.
	if err := rc.SetSecrets(newSecret(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Publish(ctx, webhooks.Event{ID: "evt_1", Type: "order.placed", Tenant: "acme"}); err != nil {
		t.Fatal(err)
	}
	got, err := rc.WaitFor(ctx, 2)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range got {
		if r.ID != "evt_1" || r.Status != http.StatusUnauthorized || !errors.Is(r.VerifyErr, webhooks.ErrNoMatchingSignature) {
			t.Errorf("request %d: id %s status %d VerifyErr %v; want evt_1, 401, ErrNoMatchingSignature", r.Seq, r.ID, r.Status, r.VerifyErr)
		}
	}
	if u := rc.Unique(); len(u) != 0 {
		t.Errorf("Unique = %v, want none", ids(u))
	}
	ds, err := h.WaitDeliveries(ctx, sub, func(ds []webhooks.Delivery) bool {
		return len(ds) == 1 && ds[0].State == webhooks.DeliveryDead
	})
	if err != nil {
		t.Fatal(err)
	}
	if d := ds[0]; d.LastStatus != 401 || !reflect.DeepEqual(attemptStatuses(d), []int{401, 401}) ||
		!strings.Contains(d.AttemptLog[0].Response, "signature") {
		t.Errorf("dead delivery: last status %d, attempts %v, response %q", d.LastStatus, attemptStatuses(d), d.AttemptLog[0].Response)
	}
}

func TestHarnessHangNextDoesNotBlockOtherDeliveries(t *testing.T) {
	ctx := guardCtx(t)
	h := NewHarness(t, webhooks.Config{})
	rc := NewReceiver(t)
	sub := subscribe(t, h, rc, "acme")
	release := rc.HangNext(1)

	ids, err := h.Publish(ctx,
		webhooks.Event{ID: "evt_1", Type: "order.placed", Tenant: "acme"},
		webhooks.Event{ID: "evt_2", Type: "order.placed", Tenant: "acme"},
		webhooks.Event{ID: "evt_3", Type: "order.placed", Tenant: "acme"})
	if err != nil || len(ids) != 3 {
		t.Fatalf("Publish = %v, %v", ids, err)
	}
	// Two are accepted while the third is held.
	if _, err := rc.WaitForUnique(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if rc.Hanging() != 1 || rc.Count() != 3 {
		t.Fatalf("Hanging %d, Count %d; want 1 held of 3", rc.Hanging(), rc.Count())
	}
	var held string
	for _, r := range rc.Requests() {
		if r.Hung {
			held = r.ID
		}
	}
	if _, err := h.WaitDeliveries(ctx, sub, func(ds []webhooks.Delivery) bool {
		// The held delivery is in flight: claimed ('delivering'), or, on
		// SQLite, started straight from the outbox and not a row until its
		// attempt is over.
		succeeded, heldRows := 0, 0
		for _, d := range ds {
			switch {
			case d.State == webhooks.DeliverySucceeded && d.EventID != held:
				succeeded++
			case d.EventID == held:
				if d.State != webhooks.DeliveryDelivering {
					t.Errorf("the held delivery is %s while its request hangs", d.State)
				}
				heldRows++
			}
		}
		return succeeded == 2 && heldRows <= 1
	}); err != nil {
		t.Fatal(err)
	}

	release()
	got, err := rc.WaitForUnique(ctx, 3)
	if err != nil {
		t.Fatal(err)
	}
	if r := rc.ByID(held); len(r) != 1 || !r[0].Accepted() || len(got) != 3 || rc.Count() != 3 {
		t.Errorf("after release: %d unique of %d requests; the held one recorded as %+v", len(got), rc.Count(), r)
	}
}

func TestHarnessReplayIsADuplicate(t *testing.T) {
	ctx := guardCtx(t)
	h := NewHarness(t, webhooks.Config{})
	rc := NewReceiver(t)
	sub := subscribe(t, h, rc, "acme", "order.placed")
	if _, err := h.Publish(ctx, webhooks.Event{ID: "evt_1", Type: "order.placed", Tenant: "acme"}); err != nil {
		t.Fatal(err)
	}
	ds, err := h.WaitDeliveries(ctx, sub, func(ds []webhooks.Delivery) bool {
		return len(ds) == 1 && ds[0].State == webhooks.DeliverySucceeded
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Subscriptions.RetryDelivery(ctx, "acme", ds[0].ID); err != nil {
		t.Fatal(err)
	}
	h.Dispatcher.Notify()
	if _, err := rc.WaitFor(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if n, u, b := rc.Count(), len(rc.Unique()), len(rc.ByID("evt_1")); n != 2 || u != 1 || b != 2 {
		t.Errorf("Count %d, Unique %d, ByID %d; want 2, 1, 2", n, u, b)
	}
}

func TestHarnessAllowsLoopbackUnlessTold(t *testing.T) {
	ctx := guardCtx(t)
	h := NewHarness(t, webhooks.Config{})
	if !reflect.DeepEqual(h.Config.AllowedNetworks, LoopbackNetworks()) || h.Config.PollInterval != PollIntervalDefault {
		t.Errorf("default config: AllowedNetworks %v, PollInterval %v", h.Config.AllowedNetworks, h.Config.PollInterval)
	}

	// A caller's AllowedNetworks is kept: here it does not cover loopback,
	// so the dispatcher refuses to dial the receiver.
	own := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	h2 := NewHarness(t, webhooks.Config{AllowedNetworks: own, RetryPolicy: ImmediateRetries(0)})
	if !reflect.DeepEqual(h2.Config.AllowedNetworks, own) {
		t.Errorf("AllowedNetworks = %v, want %v", h2.Config.AllowedNetworks, own)
	}
	rc := NewReceiver(t)
	sub := subscribe(t, h2, rc, "acme")
	if _, err := h2.Publish(ctx, webhooks.Event{Type: "order.placed", Tenant: "acme"}); err != nil {
		t.Fatal(err)
	}
	ds, err := h2.WaitDeliveries(ctx, sub, func(ds []webhooks.Delivery) bool {
		return len(ds) == 1 && ds[0].State == webhooks.DeliveryDead
	})
	if err != nil {
		t.Fatal(err)
	}
	if ds[0].LastStatus != 0 || ds[0].LastError == "" || rc.Count() != 0 {
		t.Errorf("refused delivery: status %d, error %q, receiver got %d", ds[0].LastStatus, ds[0].LastError, rc.Count())
	}
}

func TestHarnessPublishIsAllOrNothing(t *testing.T) {
	ctx := guardCtx(t)
	h := NewHarness(t, webhooks.Config{})
	rc := NewReceiver(t)
	sub := subscribe(t, h, rc, "acme")
	_, err := h.Publish(ctx,
		webhooks.Event{ID: "evt_ok", Type: "order.placed", Tenant: "acme"},
		webhooks.Event{Type: "not a type", Tenant: "acme"})
	if !errors.Is(err, webhooks.ErrInvalidEvent) || !strings.HasPrefix(err.Error(), "webhookstest: ") {
		t.Errorf("Publish(invalid) = %v, want ErrInvalidEvent", err)
	}
	if _, err := h.Publish(ctx, webhooks.Event{ID: "evt_1", Type: "order.placed", Tenant: "acme"}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Publish(ctx, webhooks.Event{ID: "evt_1", Type: "order.placed", Tenant: "acme"}); !errors.Is(err, webhooks.ErrDuplicateEvent) {
		t.Errorf("Publish(duplicate) = %v, want ErrDuplicateEvent", err)
	}
	if ids, err := h.Publish(ctx); ids != nil || err != nil {
		t.Errorf("Publish() = %v, %v", ids, err)
	}
	if _, err := rc.WaitForUnique(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := h.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	ds, err := h.Deliveries(ctx, sub)
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != 1 || ds[0].EventID != "evt_1" {
		t.Errorf("deliveries %v, want only evt_1 (the failed batch wrote nothing)", ds)
	}
	if _, err := h.Subscribe(ctx, nil, "acme"); err == nil {
		t.Error("Subscribe(nil receiver) succeeded")
	}
	if _, err := h.Subscribe(ctx, rc, "acme", "bad pattern"); !errors.Is(err, webhooks.ErrInvalidSubscription) {
		t.Errorf("Subscribe(bad pattern) = %v, want ErrInvalidSubscription", err)
	}
}

// fakeClock is a Clock far from the real one, moved only by the test.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func TestHarnessClockSignsAndVerifies(t *testing.T) {
	ctx := guardCtx(t)
	clock := &fakeClock{now: time.Date(2020, 5, 6, 7, 8, 9, 0, time.UTC)}
	h := NewHarness(t, webhooks.Config{Clock: clock})
	rc := NewReceiver(t)
	sub := subscribe(t, h, rc, "acme")
	if _, err := h.Publish(ctx, webhooks.Event{Type: "order.placed", Tenant: "acme"}); err != nil {
		t.Fatal(err)
	}
	got, err := rc.WaitFor(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if r := got[0]; r.VerifyErr != nil || !r.Timestamp.Equal(clock.Now()) || !r.OccurredAt.Equal(clock.Now()) {
		t.Errorf("request at the fake clock's time: VerifyErr %v, timestamp %v, occurred %v", r.VerifyErr, r.Timestamp, r.OccurredAt)
	}
	if !sub.CreatedAt.Equal(clock.Now()) {
		t.Errorf("subscription created at %v, want the fake clock's %v", sub.CreatedAt, clock.Now())
	}
}

func TestImmediateRetries(t *testing.T) {
	p := ImmediateRetries(2)
	for attempt, want := range []bool{1: true, 2: true, 3: false} {
		if attempt == 0 {
			continue
		}
		delay, retry := p.NextAttempt(webhooks.FailedAttempt{Attempt: attempt, StatusCode: 500})
		if retry != want || delay != 0 {
			t.Errorf("attempt %d: %v, %v; want 0, %v", attempt, delay, retry, want)
		}
	}
	if _, retry := ImmediateRetries(-1).NextAttempt(webhooks.FailedAttempt{Attempt: 1}); retry {
		t.Error("ImmediateRetries(-1) retries")
	}
}

func TestStartHarnessErrors(t *testing.T) {
	ctx := guardCtx(t)
	if _, err := StartHarness(ctx, "", webhooks.Config{}); err == nil || !strings.HasPrefix(err.Error(), "webhookstest: ") {
		t.Errorf("StartHarness(empty path) = %v", err)
	}
	_, err := StartHarness(ctx, t.TempDir()+"/db", webhooks.Config{Concurrency: -1})
	if !errors.Is(err, webhooks.ErrInvalidConfig) {
		t.Errorf("StartHarness(bad config) = %v, want ErrInvalidConfig", err)
	}
	if _, err := StartHarness(ctx, t.TempDir()+"/db", webhooks.Config{Dialect: webhooks.DialectPostgres}); !errors.Is(err, webhooks.ErrInvalidConfig) {
		t.Errorf("StartHarness(PostgreSQL dialect) = %v, want ErrInvalidConfig", err)
	}
	h, err := StartHarness(ctx, t.TempDir()+"/db", webhooks.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(ctx); err != nil {
		t.Errorf("second Close = %v", err)
	}
	if err := h.DB.PingContext(ctx); err == nil {
		t.Error("database still open after Close")
	}
}

func TestHarnessCloseReleasesHeldRequestsAndLeavesNoGoroutine(t *testing.T) {
	before := runtime.NumGoroutine()
	t.Run("harness", func(t *testing.T) {
		ctx := guardCtx(t)
		rc := NewReceiver(t) // closed after the harness
		h := NewHarness(t, webhooks.Config{})
		subscribe(t, h, rc, "acme")
		rc.HangNext(1)
		if _, err := h.Publish(ctx, webhooks.Event{Type: "order.placed", Tenant: "acme"}); err != nil {
			t.Fatal(err)
		}
		if _, err := rc.WaitFor(ctx, 1); err != nil {
			t.Fatal(err)
		}
		// Close releases the held request, so the dispatcher's graceful
		// shutdown finishes instead of running into ctx's deadline.
		if err := h.Close(ctx); err != nil {
			t.Fatalf("Close = %v", err)
		}
		if r := rc.Requests()[0]; !r.Accepted() {
			t.Errorf("held request after Close: %+v", r)
		}
	})
	// Goroutines of closed connections exit asynchronously; this polls
	// only until the hang guard.
	deadline := time.Now().Add(hangGuard)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines before, %d after:\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
		runtime.Gosched()
		time.Sleep(time.Millisecond)
	}
}
