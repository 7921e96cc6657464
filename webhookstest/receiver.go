package webhookstest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/outboxhook/webhooks"
)

// ErrNoSecrets is the VerifyErr of requests that reach a Receiver before it
// has any signing secret (see Receiver.SetSecrets).
var ErrNoSecrets = errors.New("webhookstest: receiver has no signing secret; call SetSecrets or AddSecret")

// MaxBodyBytes is how much of a request body a Receiver reads. A larger body
// is answered with 413 and recorded with a VerifyErr.
const MaxBodyBytes = 4 << 20

// Request is one HTTP request a Receiver got.
type Request struct {
	// Seq numbers the requests in the order they were recorded, from 1.
	Seq int
	// Method and Path are those of the HTTP request.
	Method, Path string
	// ID is the webhook-id header: the event ID, the same on every retry.
	ID string
	// Timestamp is the webhook-timestamp header, or zero when it is missing
	// or not integer Unix seconds.
	Timestamp time.Time
	// Type, OccurredAt and Data are the payload's "type", "timestamp" and
	// "data"; zero when the body is not a webhooks JSON envelope.
	Type       string
	OccurredAt time.Time
	Data       json.RawMessage
	// Body is the request body as received.
	Body []byte
	// Header holds the request headers.
	Header http.Header
	// VerifyErr is why the request failed Standard Webhooks verification
	// (errors.Is it against webhooks.ErrNoMatchingSignature,
	// webhooks.ErrTimestampTooOld, ErrNoSecrets, ...), or nil when it passed.
	VerifyErr error
	// Hung tells that the receiver held the request (HangNext).
	Hung bool
	// Status is what the receiver answered: 401 when verification failed,
	// else the status of a FailNext rule or 200. It is 0 while a hung
	// request is held, and stays 0 when the client gave up first.
	Status int
	// ReceivedAt is when the request arrived (system clock).
	ReceivedAt time.Time
}

// Accepted reports whether the request passed verification and was answered
// with a 2xx status: a delivery the sender will count as successful.
func (r Request) Accepted() bool {
	return r.VerifyErr == nil && r.Status >= 200 && r.Status < 300
}

func (r Request) clone() Request {
	r.Header = r.Header.Clone()
	r.Body = append([]byte(nil), r.Body...)
	if r.Data != nil {
		r.Data = append(json.RawMessage(nil), r.Data...)
	}
	return r
}

// Receiver is a webhook endpoint for tests: an httptest.Server that verifies
// every request's Standard Webhooks signature with webhooks.Verifier, records
// the request, and answers 200, or what FailNext says, possibly after
// holding the request (HangNext). A request that fails verification is
// answered 401 with the reason and does not use up a FailNext or HangNext
// slot.
//
// A Receiver is safe for concurrent use.
type Receiver struct {
	t   testing.TB // nil when made by StartReceiver
	srv *httptest.Server

	closeOnce sync.Once
	closing   chan struct{} // closed by Close: hung requests are released

	mu       sync.Mutex
	secrets  []string
	verifier *webhooks.Verifier // nil without secrets
	clock    webhooks.Clock
	requests []Request
	changed  chan struct{} // closed and replaced whenever requests change
	fails    []failRule
	hangs    []*hangGroup // with slots left, in order
	groups   []*hangGroup // every HangNext group not yet released
	hanging  int
	misuse   []error // reported by Close when there is no t
}

type failRule struct {
	left, status int
}

// hangGroup is the slots of one HangNext call.
type hangGroup struct {
	left     int // guarded by Receiver.mu
	once     sync.Once
	released chan struct{}
}

// NewReceiver starts a Receiver that accepts signatures made with any of
// secrets, and closes it when the test ends (t.Cleanup). Secrets can be given
// later with SetSecrets or AddSecret; Harness.Subscribe does so with the
// secret the subscription was created with. Invalid secrets end the test
// (t.Fatal); call it from the test's goroutine.
func NewReceiver(t testing.TB, secrets ...string) *Receiver {
	t.Helper()
	rc, err := StartReceiver(secrets...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	rc.t = t
	t.Cleanup(func() {
		if err := rc.Close(); err != nil {
			t.Errorf("%v", err)
		}
	})
	return rc
}

// StartReceiver is NewReceiver outside a test (for example in a runnable
// example or a TestMain): the caller must call Close, and misuse of
// FailNext and HangNext is reported by Close instead of t.Errorf.
func StartReceiver(secrets ...string) (*Receiver, error) {
	rc := &Receiver{closing: make(chan struct{}), changed: make(chan struct{})}
	if err := rc.SetSecrets(secrets...); err != nil {
		return nil, err
	}
	rc.srv = httptest.NewServer(http.HandlerFunc(rc.serve))
	return rc, nil
}

// URL is the receiver's base URL, such as http://127.0.0.1:34567. It accepts
// requests on every path.
func (rc *Receiver) URL() string { return rc.srv.URL }

// Close releases the requests being held and shuts the server down, waiting
// for the requests in progress. Later calls do nothing. For a receiver made
// by StartReceiver it returns the misuse errors of FailNext and HangNext.
func (rc *Receiver) Close() error {
	rc.closeOnce.Do(func() {
		close(rc.closing)
		rc.srv.Close()
	})
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return errors.Join(rc.misuse...)
}

// SetSecrets replaces the accepted signing secrets; a request passes when
// any of its signatures matches any secret. With no secrets every request
// fails verification with ErrNoSecrets. An invalid secret returns an error
// wrapping webhooks.ErrInvalidSecret and changes nothing.
func (rc *Receiver) SetSecrets(secrets ...string) error {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.setSecretsLocked(append([]string(nil), secrets...), rc.clock)
}

// AddSecret accepts secret in addition to the current secrets, as a
// receiver does while a secret is rotated or when several subscriptions
// point at it. An invalid secret returns an error wrapping
// webhooks.ErrInvalidSecret and changes nothing.
func (rc *Receiver) AddSecret(secret string) error {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.setSecretsLocked(append(append([]string(nil), rc.secrets...), secret), rc.clock)
}

// SetClock makes verification judge webhook-timestamp against c rather than
// the system clock: give it the dispatcher's Config.Clock when that is a
// fake clock. Nil means the system clock. Harness.Subscribe does this.
func (rc *Receiver) SetClock(c webhooks.Clock) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	// Both arguments were accepted before, so this cannot fail.
	_ = rc.setSecretsLocked(rc.secrets, c)
}

func (rc *Receiver) setSecretsLocked(secrets []string, clock webhooks.Clock) error {
	var v *webhooks.Verifier
	if len(secrets) > 0 {
		var err error
		if v, err = webhooks.NewVerifier(secrets...); err != nil {
			return fmt.Errorf("webhookstest: receiver secrets: %w", err)
		}
		if clock != nil {
			v.Now = clock.Now
		}
	}
	rc.secrets, rc.verifier, rc.clock = secrets, v, clock
	return nil
}

// FailNext makes the next n requests that pass verification answer status
// instead of 200. Calls queue up: FailNext(2, 503) then FailNext(1, 410)
// answers 503, 503, 410. Status must be between 200 and 999 and n must not
// be negative; otherwise nothing changes and the mistake is reported with
// t.Errorf (or by Close).
func (rc *Receiver) FailNext(n, status int) {
	if n < 0 || status < 200 || status > 999 {
		if rc.t != nil {
			rc.t.Helper()
		}
		rc.report(fmt.Errorf("webhookstest: FailNext(%d, %d): want n >= 0 and a status from 200 to 999", n, status))
		return
	}
	if n == 0 {
		return
	}
	rc.mu.Lock()
	defer rc.mu.Unlock()
	rc.fails = append(rc.fails, failRule{left: n, status: status})
}

// HangNext makes the next n requests that pass verification wait before
// they are answered, until release is called, the request's context ends
// (the client gave up or timed out) or the receiver is closed. Other
// requests are served meanwhile. release is idempotent and also cancels
// the slots not used yet. A negative n is reported with t.Errorf (or by
// Close) and changes nothing.
func (rc *Receiver) HangNext(n int) (release func()) {
	g := &hangGroup{left: n, released: make(chan struct{})}
	release = func() {
		rc.mu.Lock()
		g.left = 0
		rc.mu.Unlock()
		g.once.Do(func() { close(g.released) })
	}
	if n < 0 {
		if rc.t != nil {
			rc.t.Helper()
		}
		rc.report(fmt.Errorf("webhookstest: HangNext(%d): want n >= 0", n))
		return release
	}
	if n > 0 {
		rc.mu.Lock()
		rc.hangs = append(rc.hangs, g)
		rc.groups = append(rc.groups, g)
		rc.mu.Unlock()
	}
	return release
}

// ReleaseAll releases every request being held and cancels every HangNext
// slot not used yet.
func (rc *Receiver) ReleaseAll() {
	rc.mu.Lock()
	groups := rc.groups
	rc.hangs, rc.groups = nil, nil
	for _, g := range groups {
		g.left = 0
	}
	rc.mu.Unlock()
	for _, g := range groups {
		g.once.Do(func() { close(g.released) })
	}
}

func (rc *Receiver) report(err error) {
	if rc.t != nil {
		rc.t.Helper()
		rc.t.Errorf("%v", err)
		return
	}
	rc.mu.Lock()
	rc.misuse = append(rc.misuse, err)
	rc.mu.Unlock()
}

// Hanging returns how many requests are being held right now.
func (rc *Receiver) Hanging() int {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.hanging
}

// Count returns how many requests were recorded.
func (rc *Receiver) Count() int {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return len(rc.requests)
}

// Requests returns every recorded request, in order of arrival, duplicates
// and failed verifications included.
func (rc *Receiver) Requests() []Request {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return cloneAll(rc.requests)
}

// ByID returns the recorded requests whose webhook-id is id: the attempts
// (and replays) of one event.
func (rc *Receiver) ByID(id string) []Request {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	var out []Request
	for _, r := range rc.requests {
		if r.ID == id {
			out = append(out, r.clone())
		}
	}
	return out
}

// Unique returns the first accepted request (see Request.Accepted) of each
// webhook-id, in order of arrival: the events delivered, each counted once
// however often it was sent. Note that an event delivered to several
// subscriptions of one receiver has the same webhook-id for each.
func (rc *Receiver) Unique() []Request {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return cloneAll(rc.uniqueLocked())
}

func (rc *Receiver) uniqueLocked() []Request {
	seen := make(map[string]bool)
	var out []Request
	for _, r := range rc.requests {
		if r.Accepted() && !seen[r.ID] {
			seen[r.ID] = true
			out = append(out, r)
		}
	}
	return out
}

// WaitFor waits until at least n requests were recorded and returns the
// first n. When ctx ends first it returns the requests recorded so far and
// an error wrapping ctx's error.
func (rc *Receiver) WaitFor(ctx context.Context, n int) ([]Request, error) {
	err := rc.waitUntil(ctx, func() bool { return len(rc.requests) >= n })
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if err != nil {
		return cloneAll(rc.requests), fmt.Errorf("webhookstest: waiting for %d requests, got %d: %w", n, len(rc.requests), err)
	}
	return cloneAll(rc.requests[:max(n, 0)]), nil
}

// WaitForUnique waits until at least n distinct webhook-ids were accepted
// and returns the first n of Unique. When ctx ends first it returns those
// accepted so far and an error wrapping ctx's error.
func (rc *Receiver) WaitForUnique(ctx context.Context, n int) ([]Request, error) {
	err := rc.waitUntil(ctx, func() bool { return len(rc.uniqueLocked()) >= n })
	rc.mu.Lock()
	defer rc.mu.Unlock()
	unique := rc.uniqueLocked()
	if err != nil {
		return cloneAll(unique), fmt.Errorf("webhookstest: waiting for %d distinct accepted webhook-ids, got %d: %w", n, len(unique), err)
	}
	return cloneAll(unique[:max(n, 0)]), nil
}

// waitUntil blocks until cond, evaluated under rc.mu whenever the
// recorded requests change, holds, or ctx ends.
func (rc *Receiver) waitUntil(ctx context.Context, cond func() bool) error {
	for {
		rc.mu.Lock()
		ok, changed := cond(), rc.changed
		rc.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func cloneAll(rs []Request) []Request {
	out := make([]Request, len(rs))
	for i, r := range rs {
		out[i] = r.clone()
	}
	return out
}

// broadcastLocked wakes every waiter.
func (rc *Receiver) broadcastLocked() {
	close(rc.changed)
	rc.changed = make(chan struct{})
}

func (rc *Receiver) serve(w http.ResponseWriter, req *http.Request) {
	rec := Request{
		Method: req.Method, Path: req.URL.Path, Header: req.Header.Clone(),
		ID: req.Header.Get(webhooks.HeaderWebhookID), ReceivedAt: time.Now(),
	}
	if secs, err := strconv.ParseInt(req.Header.Get(webhooks.HeaderWebhookTimestamp), 10, 64); err == nil {
		rec.Timestamp = time.Unix(secs, 0)
	}
	body, readErr := io.ReadAll(http.MaxBytesReader(w, req.Body, MaxBodyBytes))
	rec.Body = body
	var payload struct {
		Type      string          `json:"type"`
		Timestamp time.Time       `json:"timestamp"`
		Data      json.RawMessage `json:"data"`
	}
	if json.Unmarshal(body, &payload) == nil {
		rec.Type, rec.OccurredAt, rec.Data = payload.Type, payload.Timestamp, payload.Data
	}

	rc.mu.Lock()
	verifier := rc.verifier
	rc.mu.Unlock()
	status := http.StatusUnauthorized
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(readErr, &tooLarge):
		rec.VerifyErr, status = fmt.Errorf("webhookstest: body larger than %d bytes: %w", MaxBodyBytes, readErr), http.StatusRequestEntityTooLarge
	case readErr != nil:
		rec.VerifyErr, status = fmt.Errorf("webhookstest: read body: %w", readErr), http.StatusBadRequest
	case verifier == nil:
		rec.VerifyErr = ErrNoSecrets
	default:
		rec.VerifyErr = verifier.Verify(req.Header, body)
	}

	rc.mu.Lock()
	var hang *hangGroup
	if rec.VerifyErr == nil {
		status = rc.nextStatusLocked()
		hang = rc.nextHangLocked()
	}
	rec.Seq = len(rc.requests) + 1
	idx := len(rc.requests)
	if hang != nil {
		rec.Hung = true
		rc.hanging++
	} else {
		rec.Status = status
	}
	rc.requests = append(rc.requests, rec)
	rc.broadcastLocked()
	rc.mu.Unlock()

	if hang != nil {
		answered := true
		select {
		case <-hang.released:
		case <-rc.closing:
		case <-req.Context().Done():
			answered = false
		}
		rc.mu.Lock()
		rc.hanging--
		if answered {
			rc.requests[idx].Status = status
		}
		rc.broadcastLocked()
		rc.mu.Unlock()
		if !answered {
			return
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	if rec.VerifyErr != nil {
		// Verification errors never contain a secret.
		fmt.Fprintln(w, rec.VerifyErr.Error())
	} else {
		fmt.Fprintln(w, http.StatusText(status))
	}
}

// nextStatusLocked uses up one FailNext slot, if any.
func (rc *Receiver) nextStatusLocked() int {
	for len(rc.fails) > 0 {
		f := &rc.fails[0]
		if f.left > 0 {
			f.left--
			status := f.status
			if f.left == 0 {
				rc.fails = rc.fails[1:]
			}
			return status
		}
		rc.fails = rc.fails[1:]
	}
	return http.StatusOK
}

// nextHangLocked uses up one HangNext slot, if any.
func (rc *Receiver) nextHangLocked() *hangGroup {
	for len(rc.hangs) > 0 {
		g := rc.hangs[0]
		if g.left > 0 {
			g.left--
			if g.left == 0 {
				rc.hangs = rc.hangs[1:]
			}
			return g
		}
		rc.hangs = rc.hangs[1:]
	}
	return nil
}
