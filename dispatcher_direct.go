package webhooks

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/jmoiron/sqlx"
)

// Direct expansion (SQLite). SQLite has one writer at a time, so a write
// transaction before every batch of requests is what limits a dispatcher
// there, however little it writes. So on SQLite the dispatcher that holds
// the outbox lease (a one-row table) expands new events without writing:
// it reads them past a cursor, starts their deliveries at once, and keeps
// each event in memory until the attempts it started are over. Then a
// recorder goroutine writes the event expanded together with all its
// deliveries (those made, with their outcome and attempt; those that could
// not start, pending or paused) in group commits of many events, which also
// renew the lease.
//
// Crash safety: an event is marked expanded in the transaction that writes
// its deliveries, so an event in memory is still unexpanded in the
// database. Should the dispatcher die, the one that takes the lease over
// once it lapses reads those events again and delivers them again (at
// least once: what was delivered but not yet recorded is sent twice, never
// lost). A delivery starts only while the lease has more than RequestTimeout
// left, so no request of a dead or stalled holder is still in flight when
// another dispatcher takes the lease. Deliveries that are retried, or that
// could not start at once, are rows and go through claims as on
// PostgreSQL, by whichever dispatcher claims them.

// directBatchMin is how many finished attempts a group commit waits for
// while more are in flight (it records at once when none are, and after a
// PollInterval in any case): end to end, group commits of about a dozen
// attempts (whatever gathered while the last one ran) delivered at 0.45×
// the raw client's rate and groups of 256 at 0.6× (BENCHMARKS.md §3).
const directBatchMin = 256

// directBacklogMax is how many finished attempts may wait to be recorded
// before direct expansion stops reading new events, so that memory stays
// bounded while group commits fail.
const directBacklogMax = 4 * directBatchMin

// outboxLeaseSlack is how much longer than RequestTimeout the outbox lease
// lasts from each renewal (LeaseDuration, if shorter): after a crash, new
// events wait that long before another dispatcher takes the lease over.
const outboxLeaseSlack = 5 * time.Second

// errOutboxLeaseLost: another dispatcher took the outbox lease over.
var errOutboxLeaseLost = errors.New("the outbox lease was taken over by another dispatcher")

// heldEvent is an event read by direct expansion and not yet recorded.
type heldEvent struct {
	seq     int64
	id      string
	tenant  string
	readAt  time.Time
	made    int      // its deliveries
	running int      // its deliveries in flight
	aborted bool     // a delivery was aborted (hard stop): never recorded
	results []result // its finished attempts
	later   []*job   // its deliveries not started: recorded pending (or paused)
}

// direct is the loop's direct expansion state (nil on PostgreSQL).
type direct struct {
	owner  string    // this dispatcher's name in the lease
	until  time.Time // the lease as this dispatcher last wrote it; zero: not held
	cursor int64     // the highest seq held: later events are read past it
	rescan bool      // the lease lapsed and was taken again: read from the start, skipping held
	held   map[int64]*heldEvent
	// buffer holds events read but not started yet, in seq order: a read
	// takes a BatchSize of them, as many as the free slots start or more.
	buffer  []outboxRow
	bufArr  []outboxRow // buffer's array, from its start: reads append in place
	more    bool        // the last read was full: the outbox may hold events past the buffer
	running int         // direct deliveries in flight or waiting
	// waiting holds, per subscription, deliveries of held events that
	// wait for a slot (at most MaxInFlightPerSubscription each).
	waiting  map[string][]*job
	nWaiting int
	// made counts the deliveries of the events held, and oldest (unix ms,
	// 0: none) when the oldest of them was read: the pending gauges'
	// share (Dispatcher.heldDeliveries, heldOldest).
	made       int64
	oldest     int64
	oldestGone bool // oldest was forgotten: look for the next one

	// subs holds the subscriptions read per tenant; they are read again
	// once the subscriptions' version (store migration 6) is no longer
	// subsVersion (-1: none read).
	subs        map[string][]subRow
	subsVersion int64

	ready   []*heldEvent // events whose attempts are all over, to record
	readyAt time.Time    // when the oldest of ready became ready
	results int          // attempts in ready
	later   int          // deliveries in ready not started: claimable once recorded

	busy     bool // a batch is with the recorder
	batches  chan []*heldEvent
	done     chan directRecorded
	recorder sync.WaitGroup
}

// directRecorded is what the recorder did with a batch.
type directRecorded struct {
	events []*heldEvent
	until  time.Time // the lease it renewed
	later  bool      // it inserted deliveries still to make
	ops    []OperationalEvent
	err    error
}

// newDirect returns the direct expansion state of a loop, or nil when the
// dialect has none.
func (d *Dispatcher) newDirect() (*direct, error) {
	if d.q.OutboxLease.Take == "" {
		return nil, nil
	}
	owner, err := newID("dsp_")
	if err != nil {
		return nil, err
	}
	return &direct{owner: owner, held: map[int64]*heldEvent{}, waiting: map[string][]*job{},
		subs: map[string][]subRow{}, subsVersion: -1,
		batches: make(chan []*heldEvent, 1), done: make(chan directRecorded, 1)}, nil
}

// outboxLease is how long the outbox lease lasts from a renewal, and
// startMargin how much more than RequestTimeout it must have left for a
// delivery to start under it.
func (d *Dispatcher) outboxLease() time.Duration {
	return min(d.cfg.LeaseDuration, d.cfg.RequestTimeout+outboxLeaseSlack)
}

func (d *Dispatcher) startMargin() time.Duration {
	return min(time.Second, (d.outboxLease()-d.cfg.RequestTimeout)/2)
}

// startRecorder starts the recorder goroutine; stopRecorder ends it.
func (l *loop) startRecorder() {
	x := l.direct
	x.recorder.Add(1)
	go func() {
		defer x.recorder.Done()
		var s recordScratch
		for events := range x.batches {
			x.done <- l.d.recordDirect(l.ctx, x.owner, events, &s)
		}
	}()
}

// expandDirect reads new events into up to free deliveries and starts
// them, taking or renewing the outbox lease first when it has too little
// left. Without the lease (another dispatcher holds it) it expands
// nothing: that one does.
func (l *loop) expandDirect(free int) {
	d, x := l.d, l.direct
	if l.paused() {
		return
	}
	if free <= 0 {
		l.moreEvents = true // no slot to expand into
		return
	}
	if x.results >= directBacklogMax {
		// Recording is behind (its transactions fail, say): read nothing
		// more into memory until it catches up (recorded looks again).
		l.moreEvents = false
		return
	}
	now := d.clock.Now()
	if !l.leaseToStart(now) {
		l.moreEvents = false // look again at the next poll
		return
	}
	limit := d.cfg.BatchSize
	if l.perEvent > 0 {
		limit = min(limit, max(1, int(math.Ceil(float64(free)/l.perEvent))))
	}
	if len(x.buffer) < limit {
		after, skip := x.cursor, 0
		if x.rescan {
			after, skip, x.buffer, x.cursor = 0, len(x.held), nil, 0
		}
		n := max(limit, d.cfg.BatchSize) + skip
		// What is left moves to the front of the buffer's array, and the
		// read appends after it there.
		kept := append(x.bufArr[:0], x.buffer...)
		all, err := d.readEvents(l.ctx, after, n, kept)
		x.bufArr = all[:0]
		l.check("read new events", err)
		if err != nil {
			clear(kept[len(kept):cap(kept)]) // what a failed read left
			x.buffer = kept
			return
		}
		x.rescan, x.more = false, len(all)-len(kept) == n
		read := all[len(kept):]
		kept = all[:len(kept)] // in the array the read appended to
		for _, e := range read {
			if x.held[e.Seq] == nil { // else in memory already (read before the lease lapsed)
				kept = append(kept, e)
			}
			x.cursor = max(x.cursor, e.Seq)
		}
		clear(all[len(kept):cap(all)]) // filtered out, or left from earlier reads
		x.buffer = kept
	}
	events := x.buffer[:min(limit, len(x.buffer))]
	x.buffer = x.buffer[len(events):]
	l.moreEvents = x.more || len(x.buffer) > 0
	var err error
	if len(events) > 0 {
		if err = l.checkSubscriptions(); err != nil {
			l.check("read subscriptions", err)
			x.buffer = append(events, x.buffer...) // not started
			return
		}
	}
	in := stepInput{perSub: l.perSub, limiter: l.lim}
	expanded, made := 0, 0
	for i, e := range events {
		subs, ok := x.subs[e.Tenant]
		if !ok {
			if subs, err = d.tenantSubscriptions(l.ctx, d.db, e.Tenant); err != nil {
				l.check("read subscriptions", err)
				x.buffer = append(events[i:], x.buffer...) // not started
				return
			}
			if len(x.subs) >= directSubsTenants {
				clear(x.subs)
			}
			x.subs[e.Tenant] = subs
		}
		he := &heldEvent{seq: e.Seq, id: e.ID, tenant: e.Tenant, readAt: now}
		var jobs []*job
		for _, s := range subs {
			if !matchesAny(s.patterns, e.Type) {
				continue
			}
			id, err := newID("dlv_")
			if err != nil {
				l.check("expand events", err) // before any delivery of the event started
				x.buffer = append(events[i:], x.buffer...)
				return
			}
			jobs = append(jobs, &job{DeliveryID: id, EventID: e.ID, SubscriptionID: s.ID, Tenant: e.Tenant,
				URL: s.URL, Secrets: s.Secrets, Headers: s.Headers, RateLimit: s.RateLimit,
				Payload: e.Payload, held: he, disabled: !s.Enabled})
		}
		x.held[e.Seq] = he
		he.made = len(jobs)
		x.made += int64(he.made)
		if at := now.UnixMilli(); he.made > 0 && (x.oldest == 0 || at < x.oldest) {
			x.oldest = at
		}
		expanded++
		made += len(jobs)
		for _, j := range jobs {
			switch {
			case j.disabled:
				he.later = append(he.later, j) // goes in paused
			case free > 0 && d.admit(&in, j, nil, now):
				free--
				he.running++
				x.running++
				l.start(j) // counts it in l.perSub, which admit reads
			case (free == 0 || l.perSub[j.SubscriptionID] >= d.cfg.MaxInFlightPerSubscription) &&
				!l.behind[j.SubscriptionID] && len(x.waiting[j.SubscriptionID]) < d.cfg.MaxInFlightPerSubscription:
				// No slot free, or its subscription at its cap: it waits
				// in memory for a slot (startWaiting), up to a cap's worth
				// per subscription.
				x.waiting[j.SubscriptionID] = append(x.waiting[j.SubscriptionID], j)
				x.nWaiting++
				he.running++
				x.running++
			case free == 0:
				he.later = append(he.later, j)
				l.moreDue = true // no slot left: claimed once recorded
			default:
				// At its cap or held back by its limiter: claimed once
				// recorded, when the subscription may send again.
				he.later = append(he.later, j)
				l.behind[j.SubscriptionID] = true
			}
		}
		if he.running == 0 {
			x.markReady(he, now)
		}
	}
	clear(events) // started: the buffer's array holds them no more
	if expanded > 0 {
		l.perEvent = 0.8*l.perEvent + 0.2*float64(made)/float64(expanded)
		l.d.countHeld(x)
	}
}

// directSubsTenants is how many tenants' subscriptions direct expansion
// keeps in memory at most.
const directSubsTenants = 1024

// checkSubscriptions forgets the subscriptions in memory if any changed since
// they were read. Read before them, the version can only make it read them
// again for nothing, never keep stale ones.
func (l *loop) checkSubscriptions() error {
	x := l.direct
	var v int64
	if err := l.d.db.QueryRowContext(l.ctx, l.d.q.OutboxLease.SubscriptionsVersion).Scan(&v); err != nil {
		return fmt.Errorf("read the subscriptions' version: %w", err)
	}
	if v != x.subsVersion {
		clear(x.subs)
		x.subsVersion = v
	}
	return nil
}

// readEvents appends to dst up to n unexpanded events past seq after, in
// seq order. (Scanned by hand, without sqlx's reflection, straight into
// dst: this read is on the hot path of direct expansion.) On error it
// returns dst as it was.
func (d *Dispatcher) readEvents(ctx context.Context, after int64, n int, dst []outboxRow) ([]outboxRow, error) {
	rows, err := d.db.QueryContext(ctx, d.q.OutboxLease.SelectEvents, after, n)
	if err != nil {
		return dst, err
	}
	defer rows.Close()
	out := slices.Grow(dst, n)
	for rows.Next() {
		out = append(out, outboxRow{})
		e := &out[len(out)-1]
		if err := rows.Scan(&e.Seq, &e.ID, &e.Type, &e.Tenant, &e.Payload); err != nil {
			return dst, err
		}
	}
	if err := rows.Err(); err != nil {
		return dst, err
	}
	return out, nil
}

// countHeld publishes, for the pending gauges, how many deliveries the
// events in memory make and when the oldest was read (looking for it again
// only once the oldest is gone).
func (d *Dispatcher) countHeld(x *direct) {
	if x.oldestGone {
		x.oldest, x.oldestGone = 0, false
		for _, he := range x.held {
			if at := he.readAt.UnixMilli(); he.made > 0 && (x.oldest == 0 || at < x.oldest) {
				x.oldest = at
			}
		}
	}
	d.heldDeliveries.Store(x.made)
	d.heldOldest.Store(x.oldest)
}

// startWaiting starts the waiting deliveries that may start now: a slot
// is free, their subscription below its cap and within its rate limit, and
// the lease long enough. A subscription whose due rows the last claim left
// behind gets its freed slots through claims first (first attempts of new
// events do not starve its retries).
func (l *loop) startWaiting() {
	d, x := l.d, l.direct
	if x == nil || x.nWaiting == 0 || l.inFlight >= d.cfg.Concurrency || l.paused() {
		return
	}
	now := d.clock.Now()
	if !l.leaseToStart(now) {
		x.dropWaiting(now) // recorded as rows, or made by the next holder
		return
	}
	in := stepInput{perSub: l.perSub, limiter: l.lim}
	for s, q := range x.waiting {
		if l.behind[s] {
			// Claims have rows of s to make and take its freed slots
			// first: these could wait behind them for as long as rows
			// keep coming (a hanging endpoint with a backlog: for ever),
			// and their events with them. Once the first has waited a
			// PollInterval they become rows too.
			if now.Sub(q[0].held.readAt) >= d.cfg.PollInterval {
				x.dropWaitingFor(s, now)
			}
			continue
		}
		for len(q) > 0 && l.inFlight < d.cfg.Concurrency && d.admit(&in, q[0], nil, now) {
			l.start(q[0])
			q = q[1:]
			x.nWaiting--
		}
		if len(q) == 0 {
			delete(x.waiting, s)
		} else {
			x.waiting[s] = q
		}
	}
}

// dropWaiting turns the waiting deliveries into rows to record pending
// (Shutdown, or the lease lost): claims make them.
func (x *direct) dropWaiting(now time.Time) {
	for s := range x.waiting {
		x.dropWaitingFor(s, now)
	}
}

// dropWaitingFor turns the deliveries waiting for a slot of subscription s
// into rows to record pending.
func (x *direct) dropWaitingFor(s string, now time.Time) {
	for _, j := range x.waiting[s] {
		he := j.held
		he.later = append(he.later, j)
		he.running--
		x.running--
		x.nWaiting--
		if he.running == 0 && !he.aborted {
			x.markReady(he, now)
		}
	}
	delete(x.waiting, s)
}

// leaseToStart reports that the outbox lease has long enough left for a
// delivery to start now, taking or renewing it when it has not.
func (l *loop) leaseToStart(now time.Time) bool {
	if l.direct.until.Sub(now) >= l.d.cfg.RequestTimeout+l.d.startMargin() {
		return true
	}
	held, err := l.takeLease(now)
	l.check("take the outbox lease", err)
	return err == nil && held
}

// takeLease takes or renews the outbox lease unless another dispatcher
// holds it, looking before it writes.
func (l *loop) takeLease(now time.Time) (bool, error) {
	d, x := l.d, l.direct
	var lease struct {
		Owner string `db:"owner"`
		Until int64  `db:"until"`
	}
	if err := sqlx.GetContext(l.ctx, d.db, &lease, d.q.OutboxLease.Select); err != nil {
		return false, fmt.Errorf("read the outbox lease: %w", err)
	}
	if lease.Owner != x.owner && lease.Until > now.UnixMilli() {
		return false, nil
	}
	until := now.Add(d.outboxLease())
	res, err := d.db.ExecContext(l.ctx, d.q.OutboxLease.Take, x.owner, until.UnixMilli(), now.UnixMilli())
	if err != nil {
		return false, fmt.Errorf("take the outbox lease: %w", err)
	}
	if n, err := res.RowsAffected(); err != nil || n != 1 {
		return false, err
	}
	x.renewed(until, now)
	return true, nil
}

// renewed notes a lease written until then. If it had lapsed meanwhile,
// another dispatcher may have expanded (or left unexpanded) events below
// the cursor: the next read starts over.
func (x *direct) renewed(until, now time.Time) {
	if !x.until.After(now) {
		// Deliveries not started yet may have been made by whoever held
		// the lease meanwhile: they go in as rows (skipped if they exist).
		x.dropWaiting(now)
		x.buffer = nil
		x.rescan = len(x.held) > 0
		if !x.rescan {
			x.cursor = 0
		}
	}
	if until.After(x.until) {
		x.until = until
	}
}

// finish takes a direct delivery's finished attempt.
func (x *direct) finish(r result, now time.Time) {
	he := r.job.held
	he.running--
	x.running--
	he.results = append(he.results, r)
	if he.running == 0 && !he.aborted {
		x.markReady(he, now)
	}
}

// abort takes a direct delivery aborted by a hard stop: its event is not
// recorded, so the next holder of the lease expands it again.
func (x *direct) abort(r result) {
	r.job.held.running--
	r.job.held.aborted = true
	x.running--
}

func (x *direct) markReady(he *heldEvent, now time.Time) {
	if len(x.ready) == 0 {
		x.readyAt = now
	}
	x.ready = append(x.ready, he)
	x.results += len(he.results)
	x.later += claimable(he)
}

// claimable is how many of he's deliveries not started claims can make once
// recorded (not those of disabled subscriptions: they go in paused).
func claimable(he *heldEvent) int {
	n := 0
	for _, j := range he.later {
		if !j.disabled {
			n++
		}
	}
	return n
}
