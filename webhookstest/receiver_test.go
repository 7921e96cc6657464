package webhookstest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outboxhook/webhooks"
)

// hangGuard bounds every wait of these tests; reaching it is a failure (a
// hang), never the expected outcome.
const hangGuard = 30 * time.Second

func guardCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	t.Cleanup(cancel)
	return ctx
}

func newSecret(t *testing.T) string {
	t.Helper()
	s, err := webhooks.NewSecret()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func envelope(id, typ string) []byte {
	return []byte(fmt.Sprintf(`{"id":%q,"type":%q,"timestamp":"2025-01-02T03:04:05.123Z","data":{"n":1}}`, id, typ))
}

// signedRequest builds a Standard Webhooks request signed with secret at ts
// (no signature header when secret is empty).
func signedRequest(t *testing.T, ctx context.Context, url, secret, id string, ts time.Time) *http.Request {
	t.Helper()
	body := envelope(id, "order.placed")
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url+"/hooks", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(webhooks.HeaderWebhookID, id)
	req.Header.Set(webhooks.HeaderWebhookTimestamp, fmt.Sprint(ts.Unix()))
	if secret != "" {
		sig, err := webhooks.Sign(secret, id, ts, body)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set(webhooks.HeaderWebhookSignature, sig)
	}
	return req
}

// send posts a signed request and returns the status answered. It may run
// on any goroutine, so it reports errors instead of ending the test.
func send(req *http.Request) (int, error) {
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

func mustSend(t *testing.T, req *http.Request) int {
	t.Helper()
	status, err := send(req)
	if err != nil {
		t.Fatal(err)
	}
	return status
}

type offsetClock struct{ d time.Duration }

func (c offsetClock) Now() time.Time { return time.Now().Add(c.d) }

func TestReceiverVerifiesAndRecordsEveryRequest(t *testing.T) {
	ctx := guardCtx(t)
	rc := NewReceiver(t)
	secret, other := newSecret(t), newSecret(t)
	now := time.Now()

	// No secret yet: nothing passes.
	if got := mustSend(t, signedRequest(t, ctx, rc.URL(), secret, "evt_0", now)); got != http.StatusUnauthorized {
		t.Errorf("no secrets: status %d, want 401", got)
	}
	if err := rc.SetSecrets(secret); err != nil {
		t.Fatal(err)
	}
	// An invalid secret is refused and changes nothing.
	if err := rc.SetSecrets("whsec_short"); !errors.Is(err, webhooks.ErrInvalidSecret) {
		t.Errorf("SetSecrets(invalid) = %v, want ErrInvalidSecret", err)
	}
	if err := rc.AddSecret("nope"); !errors.Is(err, webhooks.ErrInvalidSecret) {
		t.Errorf("AddSecret(invalid) = %v, want ErrInvalidSecret", err)
	}

	cases := []struct {
		req     *http.Request
		status  int
		wantErr error
	}{
		{signedRequest(t, ctx, rc.URL(), secret, "evt_1", now), 200, nil},
		{signedRequest(t, ctx, rc.URL(), other, "evt_2", now), 401, webhooks.ErrNoMatchingSignature},
		{signedRequest(t, ctx, rc.URL(), "", "evt_3", now), 401, webhooks.ErrMissingHeaders},
		{signedRequest(t, ctx, rc.URL(), secret, "evt_4", now.Add(-time.Hour)), 401, webhooks.ErrTimestampTooOld},
	}
	for i, c := range cases {
		if got := mustSend(t, c.req); got != c.status {
			t.Errorf("case %d: status %d, want %d", i, got, c.status)
		}
	}
	// Rotation: a second secret is accepted as well as the first.
	if err := rc.AddSecret(other); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{secret, other} {
		if got := mustSend(t, signedRequest(t, ctx, rc.URL(), s, "evt_5", now)); got != 200 {
			t.Errorf("after AddSecret: status %d, want 200", got)
		}
	}

	got := rc.Requests()
	if len(got) != 7 || rc.Count() != 7 {
		t.Fatalf("recorded %d requests (Count %d), want 7", len(got), rc.Count())
	}
	if !errors.Is(got[0].VerifyErr, ErrNoSecrets) || got[0].Status != 401 {
		t.Errorf("request before SetSecrets: %v, status %d; want ErrNoSecrets, 401", got[0].VerifyErr, got[0].Status)
	}
	for i, c := range cases {
		r := got[i+1]
		if r.Status != c.status || (c.wantErr == nil) != (r.VerifyErr == nil) || c.wantErr != nil && !errors.Is(r.VerifyErr, c.wantErr) {
			t.Errorf("case %d recorded status %d, VerifyErr %v; want %d, %v", i, r.Status, r.VerifyErr, c.status, c.wantErr)
		}
	}
	first := got[1]
	if first.Seq != 2 || first.Method != http.MethodPost || first.Path != "/hooks" || first.ID != "evt_1" ||
		first.Type != "order.placed" || string(first.Data) != `{"n":1}` ||
		!first.OccurredAt.Equal(time.Date(2025, 1, 2, 3, 4, 5, 123e6, time.UTC)) ||
		first.Timestamp.Unix() != now.Unix() || !bytes.Equal(first.Body, envelope("evt_1", "order.placed")) ||
		first.Header.Get("Content-Type") != "application/json" || first.Hung || !first.Accepted() {
		t.Errorf("first signed request recorded as %+v", first)
	}
	// Snapshots are copies.
	got[1].Body[0], got[1].Header["X"] = 'X', []string{"y"}
	if again := rc.Requests()[1]; again.Body[0] != '{' || again.Header.Get("X") != "" {
		t.Error("Requests returned the receiver's own storage")
	}
	if u := rc.Unique(); len(u) != 2 || u[0].ID != "evt_1" || u[1].ID != "evt_5" {
		t.Errorf("Unique = %v, want evt_1 and evt_5 once each", ids(u))
	}
	if b := rc.ByID("evt_5"); len(b) != 2 {
		t.Errorf("ByID(evt_5) has %d requests, want 2", len(b))
	}
}

func TestReceiverClockJudgesTimestamps(t *testing.T) {
	ctx := guardCtx(t)
	secret := newSecret(t)
	rc := NewReceiver(t, secret)
	past := time.Now().Add(-2 * time.Hour)
	rc.SetClock(offsetClock{-2 * time.Hour})
	if got := mustSend(t, signedRequest(t, ctx, rc.URL(), secret, "evt_1", past)); got != 200 {
		t.Errorf("timestamp of the receiver's clock: status %d, want 200", got)
	}
	if got := mustSend(t, signedRequest(t, ctx, rc.URL(), secret, "evt_2", time.Now())); got != 401 {
		t.Errorf("timestamp two hours after the receiver's clock: status %d, want 401", got)
	}
	if r := rc.ByID("evt_2"); len(r) != 1 || !errors.Is(r[0].VerifyErr, webhooks.ErrTimestampTooNew) {
		t.Errorf("evt_2 recorded as %+v, want ErrTimestampTooNew", r)
	}
}

func TestFailNextQueuesAndSkipsUnverifiedRequests(t *testing.T) {
	ctx := guardCtx(t)
	secret := newSecret(t)
	rc := NewReceiver(t, secret)
	rc.FailNext(2, http.StatusServiceUnavailable)
	rc.FailNext(0, http.StatusTeapot) // nothing
	rc.FailNext(1, http.StatusGone)
	var statuses []int
	for i, s := range []string{secret, newSecret(t), secret, secret, secret} {
		statuses = append(statuses, mustSend(t, signedRequest(t, ctx, rc.URL(), s, fmt.Sprint("evt_", i), time.Now())))
	}
	want := []int{503, 401, 503, 410, 200}
	if fmt.Sprint(statuses) != fmt.Sprint(want) {
		t.Errorf("statuses %v, want %v (a failed verification uses up no FailNext slot)", statuses, want)
	}
	if u := rc.Unique(); len(u) != 1 || u[0].ID != "evt_4" {
		t.Errorf("Unique = %v, want only evt_4", ids(u))
	}
}

// recordingTB is a real testing.TB whose Errorf is recorded instead of
// failing the test.
type recordingTB struct {
	testing.TB
	mu   sync.Mutex
	errs []string
}

func (r *recordingTB) Errorf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

func TestMisuseIsReportedAndChangesNothing(t *testing.T) {
	ctx := guardCtx(t)
	secret := newSecret(t)
	tb := &recordingTB{TB: t}
	rc := NewReceiver(tb, secret)
	rc.FailNext(-1, 503)
	rc.FailNext(1, 99)
	rc.FailNext(1, 1000)
	rc.HangNext(-2)()
	if len(tb.errs) != 4 {
		t.Errorf("reported %d errors, want 4: %q", len(tb.errs), tb.errs)
	}
	for _, e := range tb.errs {
		if !strings.HasPrefix(e, "webhookstest: ") {
			t.Errorf("error %q lacks the package prefix", e)
		}
	}
	if got := mustSend(t, signedRequest(t, ctx, rc.URL(), secret, "evt_1", time.Now())); got != 200 {
		t.Errorf("after misuse: status %d, want 200", got)
	}

	// Without a t, Close reports the misuse.
	rc2, err := StartReceiver(secret)
	if err != nil {
		t.Fatal(err)
	}
	rc2.FailNext(1, 42)
	if err := rc2.Close(); err == nil || !strings.Contains(err.Error(), "FailNext(1, 42)") {
		t.Errorf("Close = %v, want the FailNext misuse", err)
	}
	if _, err := StartReceiver("whsec_bad"); !errors.Is(err, webhooks.ErrInvalidSecret) {
		t.Errorf("StartReceiver(invalid) = %v, want ErrInvalidSecret", err)
	}
}

func TestWaitForReturnsWhenNArriveAndErrsOnTimeout(t *testing.T) {
	ctx := guardCtx(t)
	secret := newSecret(t)
	rc := NewReceiver(t, secret)
	const n = 5
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		req := signedRequest(t, ctx, rc.URL(), secret, fmt.Sprint("evt_", i%3), time.Now())
		go func() {
			_, err := send(req)
			errs <- err
		}()
	}
	got, err := rc.WaitFor(ctx, n)
	if err != nil || len(got) != n {
		t.Fatalf("WaitFor(%d) = %d requests, %v", n, len(got), err)
	}
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if u, err := rc.WaitForUnique(ctx, 3); err != nil || len(u) != 3 {
		t.Errorf("WaitForUnique(3) = %v, %v", ids(u), err)
	}

	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	got, err = rc.WaitFor(short, n+1)
	if !errors.Is(err, context.DeadlineExceeded) || len(got) != n {
		t.Errorf("WaitFor(%d) past its deadline = %d requests, %v; want %d, DeadlineExceeded", n+1, len(got), err, n)
	}
	got, err = rc.WaitForUnique(short, 4)
	if !errors.Is(err, context.DeadlineExceeded) || len(got) != 3 {
		t.Errorf("WaitForUnique(4) past its deadline = %d requests, %v; want 3, DeadlineExceeded", len(got), err)
	}
	if got, err := rc.WaitFor(ctx, 0); err != nil || len(got) != 0 {
		t.Errorf("WaitFor(0) = %d requests, %v", len(got), err)
	}
}

func TestHangNextHoldsOnlyThatRequest(t *testing.T) {
	ctx := guardCtx(t)
	secret := newSecret(t)
	rc := NewReceiver(t, secret)
	release := rc.HangNext(1)

	type answer struct {
		status int
		err    error
	}
	hung := make(chan answer, 1)
	req := signedRequest(t, ctx, rc.URL(), secret, "evt_hung", time.Now())
	go func() {
		status, err := send(req)
		hung <- answer{status, err}
	}()
	if _, err := rc.WaitFor(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if h := rc.Hanging(); h != 1 {
		t.Errorf("Hanging() = %d, want 1", h)
	}
	if r := rc.Requests()[0]; !r.Hung || r.Status != 0 || r.Accepted() {
		t.Errorf("held request recorded as hung=%v status=%d", r.Hung, r.Status)
	}

	// Another request is answered while the first is held.
	if got := mustSend(t, signedRequest(t, ctx, rc.URL(), secret, "evt_free", time.Now())); got != 200 {
		t.Errorf("request next to a held one: status %d, want 200", got)
	}
	select {
	case a := <-hung:
		t.Fatalf("held request answered before release: %+v", a)
	default:
	}
	if u := rc.Unique(); len(u) != 1 || u[0].ID != "evt_free" {
		t.Errorf("Unique = %v, want only evt_free", ids(u))
	}

	release()
	release() // idempotent
	if a := <-hung; a.err != nil || a.status != 200 {
		t.Errorf("released request: %+v, want 200", a)
	}
	if err := rc.waitUntil(ctx, func() bool { return rc.hanging == 0 }); err != nil {
		t.Fatal(err)
	}
	if r := rc.ByID("evt_hung"); len(r) != 1 || !r[0].Hung || r[0].Status != 200 || !r[0].Accepted() {
		t.Errorf("released request recorded as %+v", r)
	}
}

func TestHangEndsWhenTheClientGivesUp(t *testing.T) {
	ctx := guardCtx(t)
	secret := newSecret(t)
	rc := NewReceiver(t, secret)
	rc.HangNext(1)
	clientCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	req := signedRequest(t, clientCtx, rc.URL(), secret, "evt_1", time.Now())
	go func() {
		_, err := send(req)
		done <- err
	}()
	if _, err := rc.WaitFor(ctx, 1); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("client error %v, want context.Canceled", err)
	}
	if err := rc.waitUntil(ctx, func() bool { return rc.hanging == 0 }); err != nil {
		t.Fatalf("held request still held after its client gave up: %v", err)
	}
	if r := rc.Requests()[0]; !r.Hung || r.Status != 0 {
		t.Errorf("abandoned request recorded as hung=%v status=%d, want hung, 0", r.Hung, r.Status)
	}
	// The slot is used up.
	if got := mustSend(t, signedRequest(t, ctx, rc.URL(), secret, "evt_2", time.Now())); got != 200 {
		t.Errorf("next request: status %d, want 200", got)
	}
}

func TestReleaseCancelsUnusedSlotsAndCloseReleasesHeldRequests(t *testing.T) {
	ctx := guardCtx(t)
	secret := newSecret(t)
	rc, err := StartReceiver(secret)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	rc.HangNext(3)() // released at once: no request will hang for it
	if got := mustSend(t, signedRequest(t, ctx, rc.URL(), secret, "evt_1", time.Now())); got != 200 {
		t.Errorf("after release: status %d, want 200", got)
	}

	rc.HangNext(1)
	done := make(chan int, 1)
	req := signedRequest(t, ctx, rc.URL(), secret, "evt_2", time.Now())
	go func() {
		status, _ := send(req)
		done <- status
	}()
	if _, err := rc.WaitFor(ctx, 2); err != nil {
		t.Fatal(err)
	}
	closed := make(chan error, 1)
	go func() { closed <- rc.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close = %v", err)
		}
	case <-ctx.Done():
		t.Fatal("Close blocked on a held request")
	}
	if status := <-done; status != 200 {
		t.Errorf("request held at Close: status %d, want 200", status)
	}
}

func ids(rs []Request) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.ID
	}
	return out
}
