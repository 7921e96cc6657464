package webhooks

import (
	"context"
	"database/sql"
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

	"github.com/outboxhook/webhooks/internal/pglisten"
	"github.com/outboxhook/webhooks/internal/ssrf"
	"github.com/outboxhook/webhooks/store"
)

// Dispatcher delivers published events. It polls the outbox, expands each
// event into one delivery per matching subscription, claims due deliveries
// under a lease, sends them concurrently, and records every attempt. Several
// dispatchers, in one process or many, can share a database.
//
// On SQLite, the dispatcher holding the outbox lease expands new events
// directly: it starts their first attempts without a write transaction and
// records each event expanded, with its deliveries and their attempts, once
// those attempts are over, many events per transaction. Until then the
// event is unexpanded in the database, so a crash loses nothing: the next
// holder of the lease (once it lapses) delivers it again.
type Dispatcher struct {
	db      *sqlx.DB
	dialect Dialect
	q       store.Queries
	cfg     Config // defaults applied
	client  *http.Client
	ownTr   *http.Transport // closed on shutdown when the client is ours
	log     *slog.Logger
	clock   Clock
	metrics *dispatcherMetrics

	wake     chan struct{}
	stopping chan struct{} // closed by Shutdown: claim nothing more
	done     chan struct{} // closed when Run has returned

	signers  columnCache[signerEntry]  // by stored secrets column
	headers  columnCache[headersEntry] // by stored headers column
	excerpts sync.Pool                 // *[]byte of ResponseExcerptBytes, for response excerpts
	madeSQL  sqlBySize                 // OutboxLease.InsertDeliveries by rows (direct expansion)

	// retryTurn says the next claim that finds both first attempts and
	// retries due starts with a retry.
	retryTurn atomic.Bool

	// heldDeliveries and heldOldest (unix ms, 0: none) count the
	// deliveries of events held by direct expansion, not rows yet, for the
	// pending gauges.
	heldDeliveries, heldOldest atomic.Int64

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
	disp.madeSQL.build = q.OutboxLease.InsertDeliveries
	disp.metrics = newDispatcherMetrics(cfg.MeterProvider, cfg.Logger)
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
// deliveries are made again later (on SQLite, so are the first attempts
// made since the last group commit of direct expansion: their events are
// still unexpanded). A dispatcher runs once.
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
	defer d.registerGauges()()  // the pending gauges are observed while Run runs
	defer d.startCleaner(ctx)() // the cleaner has exited before d.done closes

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

	x, err := d.newDirect()
	if err != nil {
		return fmt.Errorf("webhooks: dispatcher: %w", err)
	}
	l := &loop{d: d, ctx: ctx, workCtx: workCtx, perSub: map[string]int{}, behind: map[string]bool{}, perEvent: 1,
		lim:     newLimiter(),
		jobs:    make(chan *job, d.cfg.Concurrency),
		results: make(chan result, d.cfg.Concurrency),
		direct:  x}
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
	jobs    chan *job // to the workers: never more than Concurrency at once
	spawned int       // workers started: at most Concurrency
	results chan result

	inFlight int
	perSub   map[string]int
	capFreed bool // a subscription that claims skipped finished a delivery
	// behind holds the subscriptions that were at their cap when the last
	// claim ran: it skipped them, so it may have left due deliveries of
	// theirs behind.
	behind   map[string]bool
	finished []result

	moreEvents bool    // the last expansion left events behind
	moreDue    bool    // the last claim (or expansion) left due deliveries behind
	perEvent   float64 // deliveries per expanded event, a moving average
	claimTurn  bool    // an odd free slot goes to claims (else to new events)

	backoff    time.Duration // current pause after database errors
	pauseUntil time.Time     // no database work before then

	lim         *limiter         // per-subscription rate limits and 429 pauses
	unthrottled <-chan time.Time // fires when a held-back subscription may send

	direct *direct // direct expansion (SQLite; see dispatcher_direct.go); nil: expansion by steps
}

// run is the dispatcher's loop. Each round runs at most one write
// transaction (a step) that records the attempts finished since the last
// one, claims due deliveries and expands new events straight into claimed
// deliveries for the free slots; the requests themselves run on worker
// goroutines meanwhile.
func (l *loop) run() error {
	d := l.d
	ticker := time.NewTicker(d.cfg.PollInterval)
	defer ticker.Stop()
	defer func() {
		close(l.jobs)
		l.workers.Wait() //nolint:errcheck // workers never fail
	}()
	var recorded <-chan directRecorded // the recorder's reports: nil without direct expansion
	if x := l.direct; x != nil {
		l.startRecorder()
		defer func() {
			close(x.batches)
			x.recorder.Wait()
		}()
		recorded = x.done
	}

	stopping := false
	poll := true  // look for work at once on start
	wake := false // Notify was called: look for new events
	for {
		if stopping && l.direct != nil {
			l.direct.dropWaiting(d.clock.Now()) // nothing more starts
		}
		if stopping && l.inFlight == 0 {
			if len(l.finished) > 0 {
				// Last chance: record even during a pause. Should it fail,
				// the claims lapse and those deliveries are made again.
				l.step(0, false, false, false)
			}
			if l.direct != nil {
				l.closeDirect()
			}
			return ErrDispatcherClosed
		}
		free := 0
		if !stopping {
			free = d.cfg.Concurrency - l.inFlight
		}
		// Under load a step waits until a quarter of the slots are free
		// (or the next poll), so that its transaction records and starts a
		// batch rather than one delivery at a time; with few requests in
		// flight it runs at once.
		ready := poll || stopping || l.inFlight == 0 || free >= l.minFree()
		// After a database error (a restart, a failover) the loop pauses,
		// with growing delays, instead of hammering the database.
		if !l.paused() && ready {
			if l.capFreed {
				l.moreDue, l.capFreed = true, false
			}
			// Claim on a poll, or when earlier claims left due work
			// behind; expand on a poll or a wake-up, or when the last
			// expansion left events behind.
			claim := free > 0 && (poll || l.moreDue)
			expand := free > 0 && (poll || l.moreEvents)
			if len(l.finished) > 0 || claim || expand {
				l.step(free, claim, expand, (poll || wake) && len(l.finished) == 0)
			}
			poll, wake = false, false
		}
		if !stopping {
			l.startWaiting()
		}
		l.flushDirect(stopping)
		if l.ctx.Err() != nil {
			return l.hardStop()
		}
		// A subscription held back by its rate limit or a 429 is looked at
		// again when it may send.
		if l.unthrottled == nil {
			if wait := l.lim.wait(d.clock.Now()); wait > 0 {
				l.unthrottled = time.After(wait)
			}
		}
		if l.moreEvents && !l.paused() && !stopping && d.cfg.Concurrency-l.inFlight >= l.minFree() {
			// Events wait and slots are free: take finished results, but
			// do not block.
			l.drain()
			select {
			case <-d.stopping:
				stopping = true
			case <-ticker.C:
				poll = true
			case <-l.unthrottled:
				l.moreDue, l.unthrottled = true, nil
			case r := <-recorded:
				l.recorded(r)
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
			l.moreEvents, wake = true, true
		case <-resume:
			poll = true
		case <-l.unthrottled:
			l.moreDue, l.unthrottled = true, nil
		case r := <-recorded:
			l.recorded(r)
		case <-d.stopping:
		}
		select {
		case <-d.stopping:
			stopping = true
		default:
		}
	}
}

// step runs one write transaction: it records the finished attempts, then,
// with free slots, claims due deliveries (claim) and expands new events
// (expand), and starts the jobs it got. With probe set, it first checks
// without the write lock that there is anything to claim or expand. On
// error the finished attempts are kept for the next step and the loop
// pauses.
func (l *loop) step(free int, claim, expand, probe bool) {
	d := l.d
	direct := expand && l.direct != nil
	if direct {
		// New events are expanded without a write, after the claims:
		// into the slots they leave.
		expand = false
		defer func() {
			if l.ctx.Err() == nil {
				l.expandDirect(d.cfg.Concurrency - l.inFlight)
			}
		}()
	}
	if probe && len(l.finished) == 0 && (claim || expand) {
		var err error
		claim, expand, err = d.probe(l.ctx, l.perSub, l.lim, claim, expand)
		l.check("look for work", err)
		if err != nil {
			return
		}
	}
	if len(l.finished) == 0 && !claim && !expand {
		return
	}
	in := stepInput{results: l.finished, free: free, perSub: l.perSub, perEvent: l.perEvent, limiter: l.lim}
	if claim {
		in.claim = free
		if expand || direct {
			// New events and due deliveries share the slots; an odd slot
			// goes to either in turn.
			in.claim = free / 2
			if free%2 == 1 {
				if l.claimTurn {
					in.claim++
				}
				l.claimTurn = !l.claimTurn
			}
			if in.claim == 0 {
				// Its turn comes next round.
				claim, l.moreDue = false, true
			}
		}
	}
	in.expand = expand
	var skipped []string // the subscriptions the claim skips at their cap
	if claim {
		skipped = d.capped(l.perSub)
	}
	out, err := d.step(l.ctx, in)
	l.check("dispatch step", err)
	if err != nil {
		return
	}
	clear(l.finished)
	l.finished = l.finished[:0]
	d.raise(l.ctx, out.ops)
	if claim {
		l.moreDue = out.moreDue
	} else if out.moreDue {
		l.moreDue = true
	}
	if expand {
		l.moreEvents = out.moreEvents
		if out.events > 0 {
			l.perEvent = 0.8*l.perEvent + 0.2*float64(out.deliveries)/float64(out.events)
		}
	}
	for _, j := range out.jobs {
		l.start(j)
	}
	if claim {
		clear(l.behind)
		for _, s := range skipped {
			l.behind[s] = true
		}
	}
	for _, s := range out.refused {
		l.behind[s] = true
	}
}

// start hands a job to a worker. Workers are started as the jobs in flight
// first need them and then live as long as the loop: a goroutine that
// delivers one request after another keeps its grown stack and its context,
// where one goroutine per request paid for both every time.
func (l *loop) start(j *job) {
	l.inFlight++
	l.perSub[j.SubscriptionID]++
	if l.spawned < l.inFlight {
		l.spawned++
		l.workers.Go(func() error {
			rc := newRequestCtx(l.workCtx, l.d.cfg.RequestTimeout)
			defer rc.close()
			for j := range l.jobs {
				r := l.d.deliver(rc.start(), j)
				rc.stop()
				l.results <- r
			}
			return nil
		})
	}
	l.jobs <- j // never blocks: it holds Concurrency jobs, as many as may be in flight
}

func (l *loop) finish(r result) {
	l.inFlight--
	l.lim.throttle(&r, l.d.clock.Now())
	if l.behind[r.job.SubscriptionID] {
		// The last claim skipped the subscription, at its cap then, so it
		// may have left due deliveries of it behind unseen.
		l.capFreed = true
		delete(l.behind, r.job.SubscriptionID)
	}
	if l.perSub[r.job.SubscriptionID]--; l.perSub[r.job.SubscriptionID] <= 0 {
		delete(l.perSub, r.job.SubscriptionID)
	}
	if r.err != nil && l.workCtx.Err() != nil {
		// Shutdown ran out of time and aborted the request: that is no
		// failure of the endpoint, so it is not recorded (no attempt
		// spent, no health counted); the claim lapses and the delivery
		// is made again later.
		if r.job.held != nil {
			l.direct.abort(r)
		}
		return
	}
	if r.job.held != nil {
		l.direct.finish(r, l.d.clock.Now())
		return
	}
	l.finished = append(l.finished, r)
}

// minFree is how many free slots make a step worth its transaction while
// requests are in flight. (Half the slots made steps 20% bigger and end to
// end 5-10% faster, but a hanging endpoint holding its cap then slowed the
// others by 10-15%.)
func (l *loop) minFree() int { return max(1, l.d.cfg.Concurrency/4) }

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
	if l.direct != nil {
		l.abandonDirect()
	}
	return l.ctx.Err()
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
