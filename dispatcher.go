package webhooks

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jmoiron/sqlx"
	"golang.org/x/sync/errgroup"

	"github.com/outboxhook/webhooks/internal/dbtx"
	"github.com/outboxhook/webhooks/internal/pglisten"
	"github.com/outboxhook/webhooks/internal/ssrf"
	"github.com/outboxhook/webhooks/store"
)

// Defaults of Config.
const (
	PollIntervalDefault               = 100 * time.Millisecond
	BatchSizeDefault                  = 100
	ConcurrencyDefault                = 32
	MaxInFlightPerSubscriptionDefault = 8
	RequestTimeoutDefault             = 15 * time.Second
	// LeaseMarginDefault is how much longer than RequestTimeout a claim
	// lasts by default, so a healthy in-flight delivery is never claimed
	// (and sent) a second time while it runs.
	LeaseMarginDefault = 30 * time.Second
	UserAgentDefault   = "outboxhook/1 (+https://github.com/outboxhook/webhooks)"
	// ResponseExcerptBytes is how much of each response body is recorded.
	ResponseExcerptBytes = 4 << 10
)

// Config configures a Dispatcher. The zero value works; zero fields take the
// …Default constants.
type Config struct {
	// Dialect of the database; empty detects it from the driver.
	Dialect Dialect
	// PollInterval is how often the dispatcher looks for new events and due
	// deliveries when it has not been woken by Notify.
	PollInterval time.Duration
	// BatchSize is how many events one expansion step reads.
	BatchSize int
	// Concurrency bounds the deliveries in flight at once.
	Concurrency int
	// MaxInFlightPerSubscription bounds the deliveries in flight to one
	// subscription, so a slow or dead endpoint cannot take every slot.
	MaxInFlightPerSubscription int
	// RequestTimeout bounds one delivery attempt, response body included.
	RequestTimeout time.Duration
	// LeaseDuration is how long a claimed delivery stays claimed; if the
	// dispatcher dies, the delivery becomes due again when it ends. It must
	// exceed RequestTimeout. Zero means RequestTimeout + LeaseMarginDefault.
	LeaseDuration time.Duration
	// RetryPolicy decides when failed attempts are retried. Nil means
	// ExponentialBackoff{}.
	RetryPolicy RetryPolicy
	// UserAgent is sent with every delivery. Empty means UserAgentDefault.
	UserAgent string
	// Logger receives the dispatcher's logs. Nil means slog.Default().
	Logger *slog.Logger
	// AllowedNetworks lists the otherwise forbidden address ranges the
	// default HTTP client may connect to. By default it refuses, at dial
	// time and on the resolved address (so DNS rebinding cannot pass),
	// loopback, private, link-local (cloud metadata included), CGNAT,
	// multicast, unspecified and reserved addresses: a tenant's callback URL
	// must not reach into the service's own network. Add e.g.
	// netip.MustParsePrefix("127.0.0.0/8") for local receivers in tests, or
	// your private ranges when webhooks go to internal services.
	AllowedNetworks []netip.Prefix
	// HTTPClient sends the deliveries. Nil means a client with a transport
	// sized for Concurrency that enforces AllowedNetworks and uses no proxy.
	// A client you provide is used as it is: give its dialer
	// DialControl(allowed) to keep the protection. Redirects are never
	// followed (a 3xx answer is a failed attempt), whatever the client's
	// CheckRedirect says.
	HTTPClient *http.Client
	// Clock tells the time for scheduling, leases and signatures. Nil means
	// the system clock.
	Clock Clock
}

// Dispatcher delivers published events. It polls the outbox, expands each
// event into one delivery per matching subscription, claims due deliveries
// under a lease, sends them concurrently, and records every attempt. Several
// dispatchers, in one process or many, can share a database.
type Dispatcher struct {
	db      *sqlx.DB
	dialect Dialect
	q       store.Queries
	cfg     Config // defaults applied
	client  *http.Client
	ownTr   *http.Transport // closed on shutdown when the client is ours
	log     *slog.Logger
	clock   Clock

	wake     chan struct{}
	stopping chan struct{} // closed by Shutdown: claim nothing more
	done     chan struct{} // closed when Run has returned

	// retryTurn says the next claim that finds both first attempts and
	// retries due starts with a retry.
	retryTurn atomic.Bool

	mu         sync.Mutex
	started    bool
	closed     bool
	cancelWork context.CancelFunc // aborts in-flight requests
}

// NewDispatcher returns a dispatcher for db, whose tables Migrate created.
// Call Run to start it and Shutdown to stop it.
func NewDispatcher(db *sql.DB, cfg Config) (*Dispatcher, error) {
	d, err := detectDialect(db, cfg.Dialect)
	if err != nil {
		return nil, err
	}
	q, err := d.Queries()
	if err != nil {
		return nil, fmt.Errorf("webhooks: %w", err)
	}
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	disp := &Dispatcher{
		db: sqlx.NewDb(db, driverName(d)), dialect: d, q: q, cfg: cfg,
		log: cfg.Logger, clock: clockOrSystem(cfg.Clock),
		wake: make(chan struct{}, 1), stopping: make(chan struct{}), done: make(chan struct{}),
	}
	if cfg.HTTPClient != nil {
		c := *cfg.HTTPClient
		disp.client = &c
	} else {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		dialer := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second, Control: DialControl(cfg.AllowedNetworks)}
		tr.DialContext = dialer.DialContext
		tr.Proxy = nil // behind a proxy, the dial check would judge the proxy's address
		tr.MaxIdleConns = cfg.Concurrency * 2
		tr.MaxIdleConnsPerHost = cfg.Concurrency
		disp.client, disp.ownTr = &http.Client{Transport: tr}, tr
	}
	disp.client.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return disp, nil
}

func (c *Config) setDefaults() error {
	type check struct {
		bad bool
		msg string
	}
	for _, ch := range []check{
		{c.PollInterval < 0, "negative PollInterval"},
		{c.BatchSize < 0, "negative BatchSize"},
		{c.Concurrency < 0, "negative Concurrency"},
		{c.MaxInFlightPerSubscription < 0, "negative MaxInFlightPerSubscription"},
		{c.RequestTimeout < 0, "negative RequestTimeout"},
		{c.LeaseDuration < 0, "negative LeaseDuration"},
	} {
		if ch.bad {
			return fmt.Errorf("%w: %s", ErrInvalidConfig, ch.msg)
		}
	}
	setDefault(&c.PollInterval, PollIntervalDefault)
	setDefault(&c.BatchSize, BatchSizeDefault)
	setDefault(&c.Concurrency, ConcurrencyDefault)
	setDefault(&c.MaxInFlightPerSubscription, MaxInFlightPerSubscriptionDefault)
	setDefault(&c.RequestTimeout, RequestTimeoutDefault)
	setDefault(&c.LeaseDuration, c.RequestTimeout+LeaseMarginDefault)
	setDefault(&c.UserAgent, UserAgentDefault)
	if c.LeaseDuration <= c.RequestTimeout {
		return fmt.Errorf("%w: LeaseDuration %v must exceed RequestTimeout %v, or a delivery still in flight could be sent twice at once",
			ErrInvalidConfig, c.LeaseDuration, c.RequestTimeout)
	}
	if c.RetryPolicy == nil {
		c.RetryPolicy = ExponentialBackoff{}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

func setDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// DialControl returns a net.Dialer Control function that refuses connections
// to loopback, private, link-local, CGNAT, multicast, unspecified and reserved
// addresses unless they fall in allowed. The dispatcher's default client uses
// it; give it to the dialer of a Config.HTTPClient of your own.
func DialControl(allowed []netip.Prefix) func(network, address string, c syscall.RawConn) error {
	return ssrf.Policy{Allowed: allowed}.Control
}

// Notify wakes the dispatcher so it looks for new events at once rather than
// at the next poll. Call it after committing a transaction that published;
// it never blocks.
func (d *Dispatcher) Notify() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// Run dispatches until ctx is canceled or Shutdown is called. It returns
// ErrDispatcherClosed after Shutdown, and ctx's error when ctx ends it; then
// requests still in flight are aborted and their claims lapse, so those
// deliveries are made again later. A dispatcher runs once.
func (d *Dispatcher) Run(ctx context.Context) error {
	d.mu.Lock()
	if d.started || d.closed {
		d.mu.Unlock()
		return ErrDispatcherClosed
	}
	d.started = true
	workCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	d.cancelWork = cancel
	d.mu.Unlock()
	defer close(d.done)
	defer cancel()
	defer d.closeIdle()

	if d.q.NotifyChannel != "" {
		// Wake on commit through LISTEN/NOTIFY; polling stays the fallback.
		listenCtx, stopListening := context.WithCancel(ctx)
		listening := make(chan struct{})
		go func() {
			defer close(listening)
			err := pglisten.Run(listenCtx, d.db.DB, d.q.NotifyChannel, d.Notify, func(err error) {
				d.log.Warn("webhooks: dispatcher: listening for new events failed; polling meanwhile", slog.Any("error", err))
			}, maxErrorBackoff)
			if err != nil {
				d.log.Info("webhooks: dispatcher: not listening for notifications; polling only", slog.Any("error", err))
			}
		}()
		defer func() { stopListening(); <-listening }()
	}

	l := &loop{d: d, ctx: ctx, workCtx: workCtx, perSub: map[string]int{},
		results: make(chan result, d.cfg.Concurrency)}
	return l.run()
}

// maxErrorBackoff bounds how long the dispatcher pauses after database
// errors before trying again.
const maxErrorBackoff = 5 * time.Second

// Shutdown stops the dispatcher gracefully: it claims nothing more, lets the
// deliveries in flight finish and records them, and returns once Run has
// returned. If ctx ends first, the requests in flight are aborted (their
// deliveries will be made again later), Shutdown still waits for Run's
// goroutines to exit, and returns ctx's error.
func (d *Dispatcher) Shutdown(ctx context.Context) error {
	d.mu.Lock()
	if !d.closed {
		d.closed = true
		close(d.stopping)
	}
	started := d.started
	d.mu.Unlock()
	if !started {
		return nil
	}
	select {
	case <-d.done:
		return nil
	case <-ctx.Done():
		d.mu.Lock()
		d.cancelWork()
		d.mu.Unlock()
		<-d.done
		return ctx.Err()
	}
}

func (d *Dispatcher) closeIdle() {
	if d.ownTr != nil {
		d.ownTr.CloseIdleConnections()
	}
}

// loop is the state of one Run: only its goroutine touches it.
type loop struct {
	d       *Dispatcher
	ctx     context.Context // Run's context: ends the loop hard
	workCtx context.Context // deliveries' context: canceled on hard stop
	workers errgroup.Group
	results chan result

	inFlight int
	perSub   map[string]int
	capFreed bool // a subscription at its cap finished a delivery
	finished []result

	backoff    time.Duration // current pause after database errors
	pauseUntil time.Time     // no database work before then
}

func (l *loop) run() error {
	d := l.d
	ticker := time.NewTicker(d.cfg.PollInterval)
	defer ticker.Stop()
	defer l.workers.Wait() //nolint:errcheck // workers never fail

	stopping := false
	poll := true // look for work at once on start
	moreEvents, moreDue := false, false
	for {
		// After a database error (a restart, a failover) the loop pauses,
		// with growing delays, instead of hammering the database. A step
		// that fails skips the steps after it, so the pause doubles once
		// per round rather than once per failing step.
		if len(l.finished) > 0 && (!l.paused() || stopping) {
			l.record()
		}
		if stopping && l.inFlight == 0 {
			return ErrDispatcherClosed
		}
		if !stopping && !l.paused() {
			if poll || moreEvents {
				n, err := d.expand(l.ctx)
				l.check("expand events", err)
				moreEvents = err == nil && n == d.cfg.BatchSize
				if n > 0 {
					poll = true // new deliveries are due now
				}
			}
			if l.capFreed {
				moreDue, l.capFreed = true, false
			}
			free := d.cfg.Concurrency - l.inFlight
			// Claim on a poll, or when earlier claims left due work behind
			// and enough slots are free to make a claim worth a transaction.
			if !l.paused() && free > 0 && (poll || moreDue && (free >= d.cfg.Concurrency/4 || l.inFlight == 0)) {
				jobs, more, err := d.claim(l.ctx, free, l.perSub, !moreDue)
				l.check("claim deliveries", err)
				moreDue = err == nil && more
				for _, j := range jobs {
					l.start(j)
				}
			}
			poll = false
		}
		if l.ctx.Err() != nil {
			return l.hardStop()
		}
		if moreEvents && !l.paused() {
			// More events wait to be expanded: take finished results (so
			// slots free up and claims go on), but do not block.
			l.drain()
			select {
			case <-d.stopping:
				stopping = true
			default:
			}
			continue
		}
		// A pause ends with a look for work, whatever PollInterval is: a
		// wake-up that arrived during the pause is not lost.
		var resume <-chan time.Time
		if wait := time.Until(l.pauseUntil); wait > 0 {
			resume = time.After(wait)
		}
		select {
		case <-l.ctx.Done():
			return l.hardStop()
		case r := <-l.results:
			l.finish(r)
			l.drain()
		case <-ticker.C:
			poll = true
		case <-d.wake:
			poll = true
		case <-resume:
			poll = true
		case <-d.stopping:
		}
		select {
		case <-d.stopping:
			stopping = true
		default:
		}
	}
}

func (l *loop) start(j *job) {
	l.inFlight++
	l.perSub[j.SubscriptionID]++
	l.workers.Go(func() error {
		l.results <- l.d.deliver(l.workCtx, j)
		return nil
	})
}

func (l *loop) finish(r result) {
	l.inFlight--
	if l.perSub[r.job.SubscriptionID] >= l.d.cfg.MaxInFlightPerSubscription {
		// The subscription was skipped by claims while at its cap, so
		// they may have left its due deliveries behind unseen.
		l.capFreed = true
	}
	if l.perSub[r.job.SubscriptionID]--; l.perSub[r.job.SubscriptionID] <= 0 {
		delete(l.perSub, r.job.SubscriptionID)
	}
	l.finished = append(l.finished, r)
}

// drain takes every result that is ready, so they are recorded together.
func (l *loop) drain() {
	for {
		select {
		case r := <-l.results:
			l.finish(r)
		default:
			return
		}
	}
}

// record stores the finished attempts. If that fails they are kept and
// recorded after the pause; should the process end first, their claims lapse
// and the deliveries are made again (at least once).
func (l *loop) record() {
	err := l.d.record(l.ctx, l.finished)
	l.check("record attempts", err)
	if err != nil && l.ctx.Err() == nil {
		return
	}
	clear(l.finished)
	l.finished = l.finished[:0]
}

// check logs a failed database step and pauses the loop, doubling the pause
// while failures go on; a success ends the pause.
func (l *loop) check(what string, err error) {
	if err == nil {
		l.backoff = 0
		return
	}
	if l.ctx.Err() != nil && errors.Is(err, l.ctx.Err()) {
		return
	}
	l.backoff = min(max(2*l.backoff, l.d.cfg.PollInterval), maxErrorBackoff)
	l.pauseUntil = time.Now().Add(l.backoff)
	l.d.log.Error("webhooks: dispatcher: "+what, slog.Any("error", err), slog.Duration("retry_in", l.backoff))
}

// paused reports that the loop is pausing after a database error.
func (l *loop) paused() bool { return time.Now().Before(l.pauseUntil) }

// hardStop aborts the requests in flight and waits for their workers.
func (l *loop) hardStop() error {
	l.d.mu.Lock()
	l.d.cancelWork()
	l.d.mu.Unlock()
	for l.inFlight > 0 {
		l.finish(<-l.results)
	}
	return l.ctx.Err()
}

// expand turns up to BatchSize unexpanded events into deliveries, one per
// matching enabled subscription of the event's tenant, and marks the events
// expanded, all in one transaction. It returns how many events it expanded.
func (d *Dispatcher) expand(ctx context.Context) (int, error) {
	type eventRef struct {
		Seq    int64  `db:"seq"`
		ID     string `db:"id"`
		Type   string `db:"type"`
		Tenant string `db:"tenant"`
	}
	// A read without the write lock first: idle polls cost no lock.
	var probe []eventRef
	if err := sqlx.SelectContext(ctx, d.db, &probe, d.q.SelectUnexpanded, 1); err != nil || len(probe) == 0 {
		return 0, err
	}
	n := 0
	err := d.inTx(ctx, func(tx dbtx.Tx) error {
		var events []eventRef
		if err := sqlx.SelectContext(ctx, tx, &events, d.q.SelectUnexpanded, d.cfg.BatchSize); err != nil {
			return fmt.Errorf("select events: %w", err)
		}
		type sub struct {
			ID         string `db:"id"`
			EventTypes string `db:"event_types"`
			patterns   []string
		}
		subsOf := map[string][]sub{}
		now := d.clock.Now().UnixMilli()
		for _, e := range events {
			subs, ok := subsOf[e.Tenant]
			if !ok {
				if err := sqlx.SelectContext(ctx, tx, &subs, store.SelectTenantSubscriptions, e.Tenant); err != nil {
					return fmt.Errorf("select subscriptions: %w", err)
				}
				for i := range subs {
					if err := json.Unmarshal([]byte(subs[i].EventTypes), &subs[i].patterns); err != nil {
						return fmt.Errorf("subscription %s: stored event types: %w", subs[i].ID, err)
					}
				}
				subsOf[e.Tenant] = subs
			}
			for _, s := range subs {
				if !matchesAny(s.patterns, e.Type) {
					continue
				}
				id, err := newID("dlv_")
				if err != nil {
					return err
				}
				if _, err := tx.ExecContext(ctx, store.InsertDelivery, id, e.ID, s.ID, e.Tenant, now, now, now); err != nil {
					return fmt.Errorf("insert delivery: %w", err)
				}
			}
			if _, err := tx.ExecContext(ctx, store.MarkExpanded, now, e.Seq); err != nil {
				return fmt.Errorf("mark event expanded: %w", err)
			}
		}
		n = len(events)
		return nil
	})
	if err != nil {
		return 0, err
	}
	return n, nil
}

// job is a claimed delivery.
type job struct {
	DeliveryID     string `db:"id"`
	EventID        string `db:"event_id"`
	SubscriptionID string `db:"subscription_id"`
	Attempts       int    `db:"attempts"`
	URL            string `db:"url"`
	Secrets        string `db:"secrets"`
	Payload        string `db:"payload"`
	claimToken     string
}

// claim leases up to free due deliveries, at most MaxInFlightPerSubscription
// per subscription counting those in flight (perSub), sharing the slots
// between first attempts and retries so neither starves the other. more
// reports that due work was left behind. With probe set it first checks,
// without taking the write lock, that anything is due.
func (d *Dispatcher) claim(ctx context.Context, free int, perSub map[string]int, probe bool) (jobs []*job, more bool, err error) {
	capPer := d.cfg.MaxInFlightPerSubscription
	skipIDs := make([]string, 0, len(perSub))
	for s, n := range perSub {
		if n >= capPer {
			skipIDs = append(skipIDs, s)
		}
	}
	skip := idsJSON(skipIDs)
	now := d.clock.Now()
	if probe {
		var first, retry []*job
		if err := sqlx.SelectContext(ctx, d.db, &first, d.q.SelectDueFirst, now.UnixMilli(), skip, 1); err != nil {
			return nil, false, err
		}
		if len(first) == 0 {
			if err := sqlx.SelectContext(ctx, d.db, &retry, d.q.SelectDueRetry, now.UnixMilli(), skip, 1); err != nil {
				return nil, false, err
			}
			if len(retry) == 0 {
				return nil, false, nil
			}
		}
	}
	token, err := newID("")
	if err != nil {
		return nil, false, err
	}
	err = d.inTx(ctx, func(tx dbtx.Tx) error {
		var first, retry []*job
		if err := sqlx.SelectContext(ctx, tx, &first, d.q.SelectDueFirst, now.UnixMilli(), skip, free); err != nil {
			return fmt.Errorf("select due deliveries: %w", err)
		}
		if err := sqlx.SelectContext(ctx, tx, &retry, d.q.SelectDueRetry, now.UnixMilli(), skip, free); err != nil {
			return fmt.Errorf("select due retries: %w", err)
		}
		taken := map[string]int{}
		take := func(j *job) {
			if perSub[j.SubscriptionID]+taken[j.SubscriptionID] < capPer {
				taken[j.SubscriptionID]++
				j.claimToken = token
				jobs = append(jobs, j)
			}
		}
		// Alternate between the lanes while both have work. Successive
		// claims start with either lane in turn, so that claims of one slot
		// (Concurrency 1, or a single slot freed) serve retries too.
		both := len(first) > 0 && len(retry) > 0
		retryTurn := both && d.retryTurn.Load()
		if both {
			d.retryTurn.Store(!retryTurn)
		}
		for i, k := 0, 0; len(jobs) < free && (i < len(first) || k < len(retry)); {
			if i < len(first) && ((len(jobs)%2 == 0) != retryTurn || k >= len(retry)) {
				take(first[i])
				i++
			} else {
				take(retry[k])
				k++
			}
		}
		more = len(first)+len(retry) > len(jobs) || len(jobs) == free
		if len(jobs) == 0 {
			return nil
		}
		ids := make([]string, len(jobs))
		for i, j := range jobs {
			ids[i] = j.DeliveryID
		}
		lease := now.Add(d.cfg.LeaseDuration).UnixMilli()
		if _, err := tx.ExecContext(ctx, d.q.ClaimDeliveries, lease, token, now.UnixMilli(), idsJSON(ids)); err != nil {
			return fmt.Errorf("claim deliveries: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, false, err
	}
	return jobs, more, nil
}

// record stores the outcome of finished attempts in one transaction: the
// attempt rows, each delivery's new state, and subscriptions disabled by
// 410 Gone.
func (d *Dispatcher) record(ctx context.Context, results []result) error {
	now := d.clock.Now()
	return d.inTx(ctx, func(tx dbtx.Tx) error {
		for i := range results {
			r := &results[i]
			o := d.outcome(r, now)
			res, err := tx.ExecContext(ctx, store.RecordDelivery,
				o.state, o.nextAt, r.status, r.errText, now.UnixMilli(), o.deliveredAt, r.job.DeliveryID, r.job.claimToken)
			if err != nil {
				return fmt.Errorf("update delivery %s: %w", r.job.DeliveryID, err)
			}
			if n, _ := res.RowsAffected(); n == 0 {
				d.log.Warn("webhooks: delivery was claimed again or canceled while in flight; attempt recorded, state left as is",
					slog.String("delivery", r.job.DeliveryID))
			}
			if _, err := tx.ExecContext(ctx, store.InsertAttempt,
				r.job.DeliveryID, r.job.Attempts+1, r.started.UnixMilli(), r.duration.Milliseconds(),
				r.status, r.errText, r.excerpt); err != nil {
				return fmt.Errorf("insert attempt of %s: %w", r.job.DeliveryID, err)
			}
			if r.status == http.StatusGone {
				reason := fmt.Sprintf("endpoint answered 410 Gone at %s", r.started.UTC().Format(time.RFC3339))
				if _, err := tx.ExecContext(ctx, store.DisableSubscription, reason, now.UnixMilli(), r.job.SubscriptionID); err != nil {
					return fmt.Errorf("disable subscription %s: %w", r.job.SubscriptionID, err)
				}
				d.log.Warn("webhooks: subscription disabled: endpoint answered 410 Gone",
					slog.String("subscription", r.job.SubscriptionID))
			}
		}
		return nil
	})
}

type outcome struct {
	state       DeliveryState
	nextAt      int64
	deliveredAt sql.NullInt64
}

// outcome decides a finished attempt's consequence.
func (d *Dispatcher) outcome(r *result, now time.Time) outcome {
	if r.status >= 200 && r.status < 300 {
		return outcome{state: DeliverySucceeded, nextAt: now.UnixMilli(),
			deliveredAt: sql.NullInt64{Int64: now.UnixMilli(), Valid: true}}
	}
	delay, retry := d.cfg.RetryPolicy.NextAttempt(FailedAttempt{
		Attempt: r.job.Attempts + 1, StatusCode: r.status, Err: r.err, RetryAfter: r.retryAfter,
	})
	if !retry {
		return outcome{state: DeliveryDead, nextAt: now.UnixMilli()}
	}
	return outcome{state: DeliveryPending, nextAt: now.Add(max(delay, 0)).UnixMilli()}
}

func (d *Dispatcher) inTx(ctx context.Context, fn func(tx dbtx.Tx) error) error {
	return dbtx.Run(ctx, d.db, d.dialect == DialectSQLite, fn)
}
