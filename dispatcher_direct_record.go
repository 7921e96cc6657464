package webhooks

// Direct expansion's recording side (see dispatcher_direct.go): the group
// commits that write held events expanded, and the lease at shutdown.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/outboxhook/webhooks/internal/dbtx"
	"github.com/outboxhook/webhooks/store"
)

// flushDirect hands the ready events to the recorder when it is idle and
// they are worth a transaction: directBatchMin attempts, or nothing else in
// flight, or deliveries not started while slots are free (claims can make
// them only once they are rows: a subscription at its cap next to one that
// hangs would otherwise get its deliveries a PollInterval apart), or the
// oldest ready for a PollInterval, or force.
func (l *loop) flushDirect(force bool) {
	x := l.direct
	if x == nil || x.busy || len(x.ready) == 0 || l.paused() {
		return
	}
	claimNow := x.later > 0 && l.inFlight < l.d.cfg.Concurrency
	if !force && !claimNow && x.running > 0 && x.results < directBatchMin &&
		l.d.clock.Now().Sub(x.readyAt) < l.d.cfg.PollInterval {
		return
	}
	x.busy = true
	x.batches <- x.ready // never blocks: the recorder is idle
	x.ready, x.results, x.later = nil, 0, 0
}

// recorded takes the recorder's report on a batch.
func (l *loop) recorded(r directRecorded) {
	x := l.direct
	x.busy = false
	if errors.Is(r.err, errOutboxLeaseLost) {
		// The dispatcher that took the lease over expands these events
		// again: what was delivered is delivered again.
		l.d.log.Warn("webhooks: dispatcher: lost the outbox lease; deliveries made but not recorded will be made again",
			slog.Int("events", len(r.events)))
		x.until = time.Time{}
		x.forget(r.events)
		l.d.countHeld(x)
		return
	}
	l.check("record deliveries", r.err)
	if r.err != nil {
		// Kept, to record again after the pause.
		x.ready = append(r.events, x.ready...)
		for _, he := range r.events {
			x.results += len(he.results)
			x.later += claimable(he)
		}
		x.readyAt = l.d.clock.Now()
		return
	}
	x.forget(r.events)
	l.d.countHeld(x)
	x.renewed(r.until, l.d.clock.Now())
	if r.later {
		l.moreDue = true
	}
	l.moreEvents = true // in case expandDirect held back for the backlog
	l.d.raise(l.ctx, r.ops)
}

// forget drops recorded (or given up) events from memory.
func (x *direct) forget(events []*heldEvent) {
	top := false
	for _, he := range events {
		delete(x.held, he.seq)
		top = top || he.seq == x.cursor
		x.made -= int64(he.made)
		x.oldestGone = x.oldestGone || he.made > 0 && he.readAt.UnixMilli() <= x.oldest
	}
	if top && len(x.buffer) == 0 {
		// The cursor stays at the highest seq held or buffered: the
		// outbox holds that row (unexpanded), so SQLite never hands its
		// seq, or a lower one, to a new event. Past a recorded event it
		// could (retention may delete it, and SQLite reuses the highest
		// rowid).
		top := int64(0)
		for seq := range x.held {
			top = max(top, seq)
		}
		x.cursor = min(x.cursor, top) // only ever lowered here: a rescan may not have reached every held seq
	}
}

// closeDirect records what is ready once nothing is in flight (Shutdown)
// and releases the lease, so another dispatcher can take it at once.
func (l *loop) closeDirect() {
	x := l.direct
	if x.busy {
		l.recorded(<-x.done)
	}
	if len(x.ready) > 0 {
		events := x.ready
		x.ready, x.results, x.later = nil, 0, 0
		r := l.d.recordDirect(l.ctx, x.owner, events, &recordScratch{})
		if r.err != nil && !errors.Is(r.err, errOutboxLeaseLost) {
			l.d.log.Error("webhooks: dispatcher: record deliveries at shutdown; they will be made again",
				slog.Any("error", r.err), slog.Int("events", len(events)))
		} else {
			l.recorded(r)
		}
	}
	l.releaseLease(l.ctx)
}

// abandonDirect (hard stop, nothing in flight any more) waits for the
// recorder and releases the lease, briefly, past the canceled context:
// what was not recorded is delivered again by the next holder.
func (l *loop) abandonDirect() {
	x := l.direct
	if x.busy {
		r := <-x.done
		x.busy = false
		if r.err == nil {
			x.forget(r.events)
		}
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(l.ctx), time.Second)
	defer cancel()
	l.releaseLease(ctx)
}

func (l *loop) releaseLease(ctx context.Context) {
	x := l.direct
	if x.until.IsZero() {
		return
	}
	if _, err := l.d.db.ExecContext(ctx, l.d.q.OutboxLease.Release, x.owner); err != nil {
		l.d.log.Warn("webhooks: dispatcher: release the outbox lease; another dispatcher takes it once it lapses",
			slog.Any("error", err))
		return
	}
	x.until = time.Time{}
}

// directStatementRows is how many rows one statement of a group commit
// binds: SQLite prepares long statements in more than linear time, and
// statements of one size are cached.
const directStatementRows = 50

// execChunks runs the statement stmt(k) for the rows in args (cols values
// each), directStatementRows rows at a time, and returns the rows affected.
func execChunks(ctx context.Context, tx dbtx.Tx, stmt func(k int) string, cols int, args []any) (int64, error) {
	var total int64
	for len(args) > 0 {
		k := min(directStatementRows, len(args)/cols)
		res, err := tx.ExecContext(ctx, stmt(k), args[:k*cols]...)
		if err != nil {
			return 0, err
		}
		n, err := res.RowsAffected()
		if err != nil {
			return 0, err
		}
		total += n
		args = args[k*cols:]
	}
	return total, nil
}

// sqlBySize keeps the text of a statement built per number of rows: building
// a statement of 50 rows cost about as much as binding them.
type sqlBySize struct {
	build func(n int) string
	mu    sync.Mutex
	texts []string // by number of rows; "": not built yet
}

func (c *sqlBySize) get(n int) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n >= len(c.texts) {
		c.texts = append(c.texts, make([]string, n+1-len(c.texts))...)
	}
	if c.texts[n] == "" {
		c.texts[n] = c.build(n)
	}
	return c.texts[n]
}

// madeRow is a delivery direct expansion inserts (OutboxLease.InsertDeliveries).
type madeRow struct {
	ID             string
	EventID        string
	SubscriptionID string
	Tenant         string
	State          string
	Attempts       int
	NextAt         int64
	LastStatus     int
	LastError      string
	CreatedAt      int64
	At             int64
	DeliveredAt    *int64
	// first is the attempt the delivery was made with, kept in its row;
	// nil for a delivery not started.
	first *result
}

// args appends the row's parameters, store.MadeDeliveryColumns of them.
func (r *madeRow) args(args []any) []any {
	var deliveredAt any
	if r.DeliveredAt != nil {
		deliveredAt = *r.DeliveredAt
	}
	args = append(args, r.ID, r.EventID, r.SubscriptionID, r.Tenant, r.State, r.Attempts, r.NextAt,
		r.LastStatus, r.LastError, r.CreatedAt, r.At, deliveredAt)
	if a := r.first; a != nil { // its status and error are LastStatus, LastError
		return append(args, a.started.UnixMilli(), a.duration.Milliseconds(), a.excerpt)
	}
	return append(args, nil, 0, "")
}

// recordScratch holds recordDirect's buffers, kept from one group commit to
// the next by the goroutine that records (allocating them per commit was a
// twentieth of what a delivery allocates, and so of the garbage collector's
// work).
type recordScratch struct {
	results []result
	seqs    []int64
	rows    []madeRow
	args    []any
}

// reset empties the buffers, dropping what they point to.
func (s *recordScratch) reset() {
	clear(s.results)
	clear(s.rows)
	clear(s.args)
	s.results, s.seqs, s.rows, s.args = s.results[:0], s.seqs[:0], s.rows[:0], s.args[:0]
}

// recordDirect writes events expanded with their deliveries, in one
// transaction that renews the lease (and fails with errOutboxLeaseLost if
// another dispatcher holds it).
func (d *Dispatcher) recordDirect(ctx context.Context, owner string, events []*heldEvent, s *recordScratch) directRecorded {
	out := directRecorded{events: events}
	now := d.clock.Now()
	defer s.reset()
	for _, he := range events {
		s.results = append(s.results, he.results...)
		s.seqs = append(s.seqs, he.seq)
	}
	results, seqs := s.results, s.seqs
	rec, err := d.recordBatch(results, now, &s.rows)
	if err != nil {
		out.err = err
		return out
	}
	made := len(s.rows)
	for _, he := range events {
		for _, j := range he.later {
			s.rows = append(s.rows, madeRow{ID: j.DeliveryID, EventID: j.EventID, SubscriptionID: j.SubscriptionID,
				Tenant: j.Tenant, State: string(DeliveryPending), NextAt: he.readAt.UnixMilli(),
				CreatedAt: he.readAt.UnixMilli(), At: now.UnixMilli()})
			out.later = true
		}
	}
	rows := s.rows
	s.args = slices.Grow(s.args, store.MadeDeliveryColumns*len(rows))
	for i := range rows {
		s.args = rows[i].args(s.args)
	}
	rowArgs := s.args
	q := d.q.OutboxLease
	until := now.Add(d.outboxLease())
	out.err = d.inTx(ctx, func(tx dbtx.Tx) error {
		out.ops = nil
		res, err := tx.ExecContext(ctx, q.Take, owner, until.UnixMilli(), now.UnixMilli())
		if err != nil {
			return fmt.Errorf("renew the outbox lease: %w", err)
		}
		if n, err := res.RowsAffected(); err != nil {
			return fmt.Errorf("renew the outbox lease: %w", err)
		} else if n != 1 {
			return errOutboxLeaseLost
		}
		if len(rows) > 0 {
			n, err := execChunks(ctx, tx, d.madeSQL.get, store.MadeDeliveryColumns, rowArgs)
			if err != nil {
				return fmt.Errorf("insert deliveries: %w", err)
			}
			var lost map[string]bool
			if n < int64(len(rows)) && made > 0 {
				// Rare: a subscription was deleted, or the event expanded
				// by another dispatcher, meanwhile.
				ids := make([]string, made)
				for i := range ids {
					ids[i] = rows[i].ID
				}
				var existing []string
				if err := sqlx.SelectContext(ctx, tx, &existing, q.SelectExisting, idsJSON(ids)); err != nil {
					return fmt.Errorf("select inserted deliveries: %w", err)
				}
				ok := make(map[string]bool, len(existing))
				for _, id := range existing {
					ok[id] = true
				}
				lost = map[string]bool{}
				for _, id := range ids {
					if !ok[id] {
						lost[id] = true // and so its attempt
					}
				}
			}
			if made > 0 {
				if _, err := tx.ExecContext(ctx, d.q.RecordHealth, rec.health); err != nil {
					return fmt.Errorf("record subscription health: %w", err)
				}
				out.ops = d.deliveryEvents(results, rec.outcomes, lost, now)
				disabled, err := d.disableFailing(ctx, tx, results, now)
				if err != nil {
					return err
				}
				out.ops = append(out.ops, disabled...)
				if err := d.publishOperational(ctx, tx, out.ops); err != nil {
					return err
				}
			}
		}
		if _, err := tx.ExecContext(ctx, d.q.MarkExpandedBatch, now.UnixMilli(), int64sJSON(seqs)); err != nil {
			return fmt.Errorf("mark events expanded: %w", err)
		}
		return nil
	})
	if out.err == nil {
		out.until = until
		for i := range results {
			d.metrics.attempt(&results[i], rec.outcomes[i], now)
		}
	}
	return out
}
