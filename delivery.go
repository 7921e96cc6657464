package webhooks

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jmoiron/sqlx"

	"github.com/outboxhook/webhooks/internal/dbtx"
	"github.com/outboxhook/webhooks/store"
)

// DeliveryState is where a delivery stands.
type DeliveryState string

// The delivery states.
const (
	// DeliveryPending: waiting for its next attempt.
	DeliveryPending DeliveryState = "pending"
	// DeliveryDelivering: claimed by a dispatcher, attempt in flight. If
	// the dispatcher dies, the claim lapses and it is attempted again. (On
	// SQLite a first attempt started by direct expansion, see Dispatcher,
	// is not a row until it is over, so it is never seen in this state.)
	DeliveryDelivering DeliveryState = "delivering"
	// DeliverySucceeded: the endpoint answered 2xx.
	DeliverySucceeded DeliveryState = "succeeded"
	// DeliveryDead: every attempt the retry policy allowed failed. It is
	// kept and can be queued again with Subscriptions.RetryDelivery,
	// Replay or Resend.
	DeliveryDead DeliveryState = "dead"
	// DeliveryCanceled: its subscription was deleted before it succeeded.
	DeliveryCanceled DeliveryState = "canceled"
	// DeliveryPaused: its subscription is disabled. It waits, kept, and
	// becomes pending again when the subscription is enabled.
	DeliveryPaused DeliveryState = "paused"
)

// Delivery is one event on its way to one subscription.
type Delivery struct {
	ID             string
	EventID        string
	SubscriptionID string
	Tenant         string
	State          DeliveryState
	// Attempts is how many attempts were made since the delivery was
	// created or last replayed (Replay and Resend start a fresh retry
	// schedule, counting from 0 again; AttemptLog keeps every attempt).
	Attempts int
	// NextAttemptAt is when a pending delivery is next due (while
	// delivering: when its claim lapses).
	NextAttemptAt time.Time
	// LastStatus and LastError describe the latest attempt.
	LastStatus int
	LastError  string
	CreatedAt  time.Time
	UpdatedAt  time.Time
	// DeliveredAt is when it succeeded; zero until then.
	DeliveredAt time.Time
	// AttemptLog holds every attempt, oldest first, replays included.
	AttemptLog []DeliveryAttempt
}

// DeliveryAttempt is the record of one HTTP attempt.
type DeliveryAttempt struct {
	Attempt    int
	StartedAt  time.Time
	Duration   time.Duration
	StatusCode int    // 0 when no response arrived
	Error      string // transport error or why the response counts as failed
	// Response is the first ResponseExcerptBytes of the response body.
	Response string
}

type deliveryRow struct {
	ID             string        `db:"id"`
	EventID        string        `db:"event_id"`
	SubscriptionID string        `db:"subscription_id"`
	Tenant         string        `db:"tenant"`
	State          string        `db:"state"`
	Attempts       int           `db:"attempts"`
	NextAt         int64         `db:"next_at"`
	LastStatus     int           `db:"last_status"`
	LastError      string        `db:"last_error"`
	CreatedAt      int64         `db:"created_at"`
	UpdatedAt      int64         `db:"updated_at"`
	DeliveredAt    sql.NullInt64 `db:"delivered_at"`
}

type attemptRow struct {
	Attempt    int    `db:"attempt"`
	StartedAt  int64  `db:"started_at"`
	DurationMS int64  `db:"duration_ms"`
	StatusCode int    `db:"status_code"`
	Error      string `db:"error"`
	Response   string `db:"response_body"`
}

// DeliveryListOptions selects a page of ListDeliveries.
type DeliveryListOptions struct {
	// State filters by state; empty means any.
	State DeliveryState
	// Limit and Cursor page as in ListOptions.
	Limit  int
	Cursor string
}

// DeliveryPage is one page of deliveries, ordered by ID (creation time).
type DeliveryPage struct {
	Deliveries []Delivery
	NextCursor string
}

// Delivery returns the tenant's delivery id with its attempts.
func (s *Subscriptions) Delivery(ctx context.Context, tenant, id string) (Delivery, error) {
	var r deliveryRow
	err := sqlx.GetContext(ctx, s.db, &r, store.SelectDelivery, tenant, id)
	if errors.Is(err, sql.ErrNoRows) {
		return Delivery{}, fmt.Errorf("%w: delivery %q", ErrNotFound, id)
	}
	if err != nil {
		return Delivery{}, fmt.Errorf("webhooks: get delivery %q: %w", id, err)
	}
	return s.withAttempts(ctx, &r)
}

// ListDeliveries returns a page of the deliveries of the tenant's
// subscription subscriptionID, with their attempts.
func (s *Subscriptions) ListDeliveries(ctx context.Context, tenant, subscriptionID string, opts DeliveryListOptions) (DeliveryPage, error) {
	limit, err := pageLimit(opts.Limit)
	if err != nil {
		return DeliveryPage{}, err
	}
	switch opts.State {
	case "", DeliveryPending, DeliveryDelivering, DeliverySucceeded, DeliveryDead, DeliveryCanceled, DeliveryPaused:
	default:
		return DeliveryPage{}, fmt.Errorf("%w: unknown delivery state %q", ErrInvalidSubscription, string(opts.State))
	}
	var rows []deliveryRow
	if err := sqlx.SelectContext(ctx, s.db, &rows, store.ListDeliveries,
		tenant, subscriptionID, string(opts.State), opts.Cursor, limit+1); err != nil {
		return DeliveryPage{}, fmt.Errorf("webhooks: list deliveries: %w", err)
	}
	var page DeliveryPage
	if len(rows) > limit {
		rows = rows[:limit]
		page.NextCursor = rows[limit-1].ID
	}
	for i := range rows {
		dl, err := s.withAttempts(ctx, &rows[i])
		if err != nil {
			return DeliveryPage{}, err
		}
		page.Deliveries = append(page.Deliveries, dl)
	}
	return page, nil
}

func (s *Subscriptions) withAttempts(ctx context.Context, r *deliveryRow) (Delivery, error) {
	dl := Delivery{
		ID: r.ID, EventID: r.EventID, SubscriptionID: r.SubscriptionID, Tenant: r.Tenant,
		State: DeliveryState(r.State), Attempts: r.Attempts, NextAttemptAt: fromMilli(r.NextAt),
		LastStatus: r.LastStatus, LastError: r.LastError,
		CreatedAt: fromMilli(r.CreatedAt), UpdatedAt: fromMilli(r.UpdatedAt),
	}
	if r.DeliveredAt.Valid {
		dl.DeliveredAt = fromMilli(r.DeliveredAt.Int64)
	}
	var attempts []attemptRow
	if err := sqlx.SelectContext(ctx, s.db, &attempts, store.SelectAttemptLog, r.ID); err != nil {
		return Delivery{}, fmt.Errorf("webhooks: attempts of delivery %q: %w", r.ID, err)
	}
	for _, a := range attempts {
		dl.AttemptLog = append(dl.AttemptLog, DeliveryAttempt{
			Attempt: a.Attempt, StartedAt: fromMilli(a.StartedAt), Duration: time.Duration(a.DurationMS) * time.Millisecond,
			StatusCode: a.StatusCode, Error: a.Error, Response: a.Response,
		})
	}
	return dl, nil
}

// RetryDelivery queues the tenant's succeeded or dead delivery id to be
// attempted again now (a replay: the receiver gets the same webhook-id). It
// is one more attempt: the attempt count goes on, so when the retry policy
// had given up, a failure makes the delivery dead again at once (Replay and
// Resend start a fresh retry schedule instead). A delivery of a deleted
// subscription is ErrNotFound; one that is pending, in flight or canceled
// is ErrInvalidSubscription.
func (s *Subscriptions) RetryDelivery(ctx context.Context, tenant, id string) error {
	n, err := s.requeue(ctx, tenant, []string{id}, requeueMode{succeeded: true})
	if err != nil {
		return fmt.Errorf("webhooks: retry delivery %q: %w", id, err)
	}
	if n == 0 {
		dl, err := s.Delivery(ctx, tenant, id)
		if err != nil {
			return err
		}
		if dl.State == DeliverySucceeded || dl.State == DeliveryDead {
			// Still finished: its subscription (or event) is gone.
			return fmt.Errorf("%w: delivery %q belongs to a deleted subscription", ErrNotFound, id)
		}
		return fmt.Errorf("%w: delivery %q is neither succeeded nor dead", ErrInvalidSubscription, id)
	}
	return nil
}

// result is a finished attempt, as the worker hands it to the loop.
type result struct {
	job        *job
	started    time.Time
	duration   time.Duration
	status     int
	err        error
	errText    string
	retryAfter time.Duration
	excerpt    string
}

// errRequestTimeout is the cause a worker's request context is canceled
// with when a request runs past RequestTimeout.
var errRequestTimeout = errors.New("webhooks: request timeout")

// requestCtx gives a worker's requests their context: one cancelable context
// for request after request, canceled by a timer (with errRequestTimeout)
// when one runs past RequestTimeout, and then replaced. (A context with a
// deadline per request cost about a microsecond and 500 bytes of garbage:
// its timer, and the map that the transport's own context registers in.)
// One goroutine uses it.
type requestCtx struct {
	parent  context.Context
	timeout time.Duration
	ctx     context.Context
	cancel  context.CancelCauseFunc
	timer   *time.Timer
}

func newRequestCtx(parent context.Context, timeout time.Duration) *requestCtx {
	rc := &requestCtx{parent: parent, timeout: timeout}
	rc.renew()
	return rc
}

func (rc *requestCtx) renew() {
	ctx, cancel := context.WithCancelCause(rc.parent)
	rc.ctx, rc.cancel = ctx, cancel
	rc.timer = time.AfterFunc(math.MaxInt64, func() { cancel(errRequestTimeout) }) // start sets it
	rc.timer.Stop()
}

// start returns the context of the next request, its time limit running.
func (rc *requestCtx) start() context.Context {
	rc.timer.Reset(rc.timeout)
	return rc.ctx
}

// stop ends the request's time limit; a context its timer canceled (or is
// canceling) is replaced.
func (rc *requestCtx) stop() {
	if !rc.timer.Stop() {
		rc.cancel(nil)
		rc.renew()
	}
}

func (rc *requestCtx) close() {
	rc.timer.Stop()
	rc.cancel(nil)
}

// deliver makes one attempt of j under ctx, which bounds it (the workers'
// requestCtx: RequestTimeout).
func (d *Dispatcher) deliver(ctx context.Context, j *job) result {
	now := d.clock.Now()
	r := result{job: j, started: now}
	begin := time.Now()
	defer func() { r.duration = time.Since(begin) }()

	sig, err := signerFor(&d.signers, j.Secrets, now)
	if err != nil {
		r.err, r.errText = err, "cannot sign: "+err.Error()
		r.duration = time.Since(begin)
		return r
	}
	body := j.Payload
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, j.URL, bytes.NewReader(body))
	if err != nil {
		r.err, r.errText = err, "invalid request: "+err.Error()
		r.duration = time.Since(begin)
		return r
	}
	if j.Headers != "" && j.Headers != "{}" {
		// The subscription's static headers go first: the ones below,
		// which the library owns, override any of the same name (names are
		// validated and canonical when stored).
		h := d.headers.get(j.Headers, func(headersEntry) bool { return true },
			func() headersEntry { return parseHeaders(j.Headers) })
		if h.err != nil {
			r.err, r.errText = h.err, "invalid stored headers: "+h.err.Error()
			r.duration = time.Since(begin)
			return r
		}
		for k, v := range h.header {
			req.Header[k] = []string{v[0]}
		}
	}
	ts := now.Unix()
	v := []string{"application/json", d.cfg.UserAgent, j.EventID, strconv.FormatInt(ts, 10), sig.header(j.EventID, ts, body)}
	req.Header["Content-Type"] = v[0:1:1]
	req.Header["User-Agent"] = v[1:2:2]
	req.Header[HeaderWebhookID] = v[2:3:3]
	req.Header[HeaderWebhookTimestamp] = v[3:4:4]
	req.Header[HeaderWebhookSignature] = v[4:5:5]

	resp, err := d.roundTrip(req)
	if err != nil {
		r.err, r.errText = err, transportError(ctx, err, d.cfg.RequestTimeout)
		r.duration = time.Since(begin)
		return r
	}
	defer resp.Body.Close()
	r.status = resp.StatusCode
	bp, _ := d.excerpts.Get().(*[]byte)
	if bp == nil {
		b := make([]byte, ResponseExcerptBytes)
		bp = &b
	}
	n, readErr := io.ReadFull(resp.Body, *bp)
	r.excerpt = cleanText((*bp)[:n]) // a copy: the buffer goes back
	d.excerpts.Put(bp)
	if readErr == nil {
		// Drain a little more so the connection can be reused.
		_, _ = io.CopyN(io.Discard, resp.Body, 64<<10)
	}
	switch {
	case r.status >= 200 && r.status < 300:
	case r.status >= 300 && r.status < 400:
		r.errText = fmt.Sprintf("HTTP %d: redirects are not followed", r.status)
	default:
		r.errText = fmt.Sprintf("HTTP %d", r.status)
		r.retryAfter = retryAfter(resp, now)
	}
	r.duration = time.Since(begin)
	return r
}

// roundTrip sends req. With the dispatcher's own client it goes straight to
// the transport: redirects are never followed and that client has neither
// a cookie jar nor a timeout of its own, so http.Client would only copy the
// headers for redirects that never come. A Config.HTTPClient is used as
// given.
func (d *Dispatcher) roundTrip(req *http.Request) (*http.Response, error) {
	if d.ownTr == nil {
		return d.client.Do(req)
	}
	resp, err := d.ownTr.RoundTrip(req)
	if err != nil {
		// As http.Client reports it (transportError reads past it).
		return nil, &url.Error{Op: "Post", URL: req.URL.Redacted(), Err: err}
	}
	return resp, nil
}

// headersEntry is a subscription's stored headers column, parsed (one value
// per name). Its header is shared between deliveries: copy, never change.
type headersEntry struct {
	header http.Header
	err    error
}

func parseHeaders(column string) headersEntry {
	var static map[string]string
	if err := json.Unmarshal([]byte(column), &static); err != nil {
		return headersEntry{err: err}
	}
	h := make(http.Header, len(static))
	for k, v := range static {
		h[http.CanonicalHeaderKey(k)] = []string{v}
	}
	return headersEntry{header: h}
}

// transportError describes a failed request without repeating the URL.
func transportError(ctx context.Context, err error, timeout time.Duration) string {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(context.Cause(ctx), errRequestTimeout) {
		return fmt.Sprintf("timeout: no complete response within %v", timeout)
	}
	var ue interface{ Unwrap() error }
	if errors.As(err, &ue) {
		if inner := ue.Unwrap(); inner != nil {
			return inner.Error()
		}
	}
	return err.Error()
}

// cleanText makes a response excerpt storable as text in every database.
func cleanText(b []byte) string {
	s := string(b)
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
	}
	return strings.ReplaceAll(s, "\x00", "\uFFFD")
}

// idsJSON encodes IDs that need no escaping as a JSON array.
func idsJSON(ids []string) string {
	b, _ := json.Marshal(ids)
	return string(b)
}

// TestEventType is the type of the event SendTest sends.
const TestEventType = "webhook.test"

// SendTest queues a "webhook.test" event for the tenant's subscription id
// alone, whatever its event types, and returns its delivery. The dispatcher
// sends it like any other delivery (signed, retried, recorded).
func (s *Subscriptions) SendTest(ctx context.Context, tenant, id string) (Delivery, error) {
	sub, err := s.Get(ctx, tenant, id)
	if err != nil {
		return Delivery{}, err
	}
	var p Publisher
	p.Clock = s.clock
	row, err := p.row(Event{Type: TestEventType, Tenant: tenant, Data: map[string]string{"subscriptionId": sub.ID}})
	if err != nil {
		return Delivery{}, err
	}
	deliveryID, err := newID("dlv_")
	if err != nil {
		return Delivery{}, err
	}
	now := s.clock.Now().UnixMilli()
	err = dbtx.Run(ctx, s.db, s.dialect == DialectSQLite, func(tx dbtx.Tx) error {
		if _, err := tx.ExecContext(ctx, store.InsertExpandedEvent, append(row.args(), now)...); err != nil {
			return fmt.Errorf("webhooks: send test event: %w", err)
		}
		if _, err := tx.ExecContext(ctx, store.InsertDelivery, deliveryID, row.id, sub.ID, tenant, now, now, now); err != nil {
			return fmt.Errorf("webhooks: send test event: %w", err)
		}
		return nil
	})
	if err != nil {
		return Delivery{}, err
	}
	return s.Delivery(ctx, tenant, deliveryID)
}
