package webhooks

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"time"
	"unicode/utf8"

	"github.com/jmoiron/sqlx"

	"github.com/outboxhook/webhooks/internal/dbtx"
	"github.com/outboxhook/webhooks/store"
)

// The database side of the dispatcher: one step is one write transaction
// that records finished attempts, claims due deliveries and expands new
// events. Every statement of a step works on a whole batch (the rows go in
// as one JSON parameter), so a step costs a handful of statements whatever
// its size.

// job is a claimed delivery.
type job struct {
	DeliveryID     string  `db:"id"`
	EventID        string  `db:"event_id"`
	SubscriptionID string  `db:"subscription_id"`
	Tenant         string  `db:"tenant"`
	Attempts       int     `db:"attempts"`
	URL            string  `db:"url"`
	Secrets        string  `db:"secrets"`
	Headers        string  `db:"headers"`    // JSON object of static headers
	RateLimit      float64 `db:"rate_limit"` // deliveries/s; 0: none
	Payload        []byte  `db:"payload"`    // shared by the jobs of one event: read only
	claimToken     string
	held           *heldEvent // direct expansion's event (no row yet); nil for a claimed delivery
	disabled       bool       // direct expansion: its subscription is disabled
}

// stepInput is what the loop asks of one step.
type stepInput struct {
	results  []result       // finished attempts to record
	free     int            // slots free for new jobs
	perSub   map[string]int // jobs in flight per subscription
	claim    int            // claim up to this many due deliveries
	expand   bool           // expand new events into the remaining slots
	perEvent float64        // deliveries per event, to size the expansion
	limiter  *limiter       // rate limits and 429 pauses; nil: none
}

// stepOutput is what one step did.
type stepOutput struct {
	jobs       []*job   // claimed, to start
	moreDue    bool     // due deliveries were left unclaimed
	moreEvents bool     // events were left unexpanded
	refused    []string // subscriptions whose due work the step left behind: at their cap or held back by their limiter
	events     int      // events expanded
	deliveries int      // deliveries they made
	// ops are the operational events the step recorded, to hand to
	// Config.OnOperationalEvent now that it committed.
	ops []OperationalEvent
}

// probe checks, without the write lock, whether there is anything to claim
// (when claim is set) or expand (when expand is set), so idle polls take no
// lock.
func (d *Dispatcher) probe(ctx context.Context, perSub map[string]int, lim *limiter, claim, expand bool) (bool, bool, error) {
	if expand {
		var ids []string
		if err := sqlx.SelectContext(ctx, d.db, &ids, store.ProbeUnexpanded); err != nil {
			return false, false, fmt.Errorf("look for events: %w", err)
		}
		expand = len(ids) > 0
	}
	if claim {
		skip, now := d.skipJSON(perSub, lim, d.clock.Now()), d.clock.Now().UnixMilli()
		found := false
		for _, q := range []string{d.q.SelectDueFirst, d.q.SelectDueRetry} {
			var due []*job
			if err := sqlx.SelectContext(ctx, d.db, &due, q, now, skip, 1); err != nil {
				return false, false, fmt.Errorf("look for due deliveries: %w", err)
			}
			if found = len(due) > 0; found {
				break
			}
		}
		claim = found
	}
	return claim, expand, nil
}

// step runs one write transaction as in asks. The batches are encoded
// before the transaction begins, so the write lock is held only for the
// statements.
func (d *Dispatcher) step(ctx context.Context, in stepInput) (stepOutput, error) {
	now := d.clock.Now()
	var rec recordBatch
	if len(in.results) > 0 {
		var err error
		if rec, err = d.recordBatch(in.results, now, nil); err != nil {
			return stepOutput{}, err
		}
	}
	token, err := newID("")
	if err != nil {
		return stepOutput{}, err
	}
	var out stepOutput
	// The tokens this step's admissions take from the limiter count only
	// if it commits: a transaction that fails, or that PostgreSQL aborts
	// and dbtx.Run runs again, gives them back.
	saved := in.limiter.save()
	err = d.inTx(ctx, func(tx dbtx.Tx) error {
		in.limiter.restore(saved)
		out = stepOutput{}
		if len(in.results) > 0 {
			ops, err := d.record(ctx, tx, in.results, rec, now)
			if err != nil {
				return err
			}
			out.ops = ops
		}
		// Claims and their leases count from now that the write lock is
		// held: waiting for it (up to the busy timeout) must not eat into
		// a lease.
		now := d.clock.Now()
		taken := map[string]int{}
		if in.claim > 0 {
			jobs, more, err := d.claim(ctx, tx, &in, taken, token, now, &out.refused)
			if err != nil {
				return err
			}
			out.jobs, out.moreDue = jobs, more
		}
		if free := in.free - len(out.jobs); in.expand && free > 0 {
			if err := d.expand(ctx, tx, in, free, taken, token, now, &out); err != nil {
				return err
			}
		} else if in.expand {
			out.moreEvents = true // no slot left to expand into
		}
		return nil
	})
	if err != nil {
		in.limiter.restore(saved)
		return stepOutput{}, err
	}
	for i := range in.results {
		d.metrics.attempt(&in.results[i], rec.outcomes[i], now)
	}
	return out, nil
}

// outboxRow is an unexpanded event as expansion reads it.
type outboxRow struct {
	Seq     int64  `db:"seq"`
	ID      string `db:"id"`
	Type    string `db:"type"`
	Tenant  string `db:"tenant"`
	Payload []byte `db:"payload"`
}

// subRow is a subscription as expansion reads it.
type subRow struct {
	ID         string  `db:"id"`
	EventTypes string  `db:"event_types"`
	URL        string  `db:"url"`
	Secrets    string  `db:"secrets"`
	Headers    string  `db:"headers"`
	RateLimit  float64 `db:"rate_limit"`
	Enabled    bool    `db:"enabled"`
	patterns   []string
}

// tenantSubscriptions reads the subscriptions of a tenant, enabled or not,
// with their event type patterns decoded.
func (d *Dispatcher) tenantSubscriptions(ctx context.Context, q sqlx.QueryerContext, tenant string) ([]subRow, error) {
	var subs []subRow
	if err := sqlx.SelectContext(ctx, q, &subs, d.q.SelectTenantSubscriptions, tenant); err != nil {
		return nil, fmt.Errorf("select subscriptions: %w", err)
	}
	for i := range subs {
		if err := json.Unmarshal([]byte(subs[i].EventTypes), &subs[i].patterns); err != nil {
			return nil, fmt.Errorf("subscription %s: stored event types: %w", subs[i].ID, err)
		}
	}
	return subs, nil
}

// expand turns unexpanded events into deliveries, one per matching enabled
// subscription of the event's tenant, and marks the events expanded. It
// reads about as many events as make free deliveries (at most BatchSize);
// deliveries that fit in the free slots and their subscription's cap are
// inserted already claimed and become jobs at once, the others are inserted
// pending for later claims.
func (d *Dispatcher) expand(ctx context.Context, tx dbtx.Tx, in stepInput, free int, taken map[string]int,
	token string, now time.Time, out *stepOutput) error {
	limit := d.cfg.BatchSize
	if in.perEvent > 0 {
		limit = min(limit, max(1, int(math.Ceil(float64(free)/in.perEvent))))
	}
	var events []outboxRow
	if err := sqlx.SelectContext(ctx, tx, &events, d.q.SelectUnexpanded, limit); err != nil {
		return fmt.Errorf("select events: %w", err)
	}
	out.moreEvents = len(events) == limit
	if len(events) == 0 {
		return nil
	}
	type deliveryRow struct {
		ID             string  `json:"id"`
		EventID        string  `json:"event_id"`
		SubscriptionID string  `json:"subscription_id"`
		Tenant         string  `json:"tenant"`
		State          string  `json:"state"`
		NextAt         int64   `json:"next_at"`
		ClaimToken     *string `json:"claim_token"`
		At             int64   `json:"at"`
	}
	subsOf := map[string][]subRow{}
	var rows []deliveryRow
	claimed := map[string]*job{}
	seqs := make([]int64, 0, len(events))
	lease := now.Add(d.cfg.LeaseDuration).UnixMilli()
	for _, e := range events {
		seqs = append(seqs, e.Seq)
		subs, ok := subsOf[e.Tenant]
		if !ok {
			var err error
			if subs, err = d.tenantSubscriptions(ctx, tx, e.Tenant); err != nil {
				return err
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
			row := deliveryRow{ID: id, EventID: e.ID, SubscriptionID: s.ID, Tenant: e.Tenant,
				State: string(DeliveryPending), NextAt: now.UnixMilli(), At: now.UnixMilli()}
			j := &job{DeliveryID: id, EventID: e.ID, SubscriptionID: s.ID, Tenant: e.Tenant,
				URL: s.URL, Secrets: s.Secrets, Headers: s.Headers, RateLimit: s.RateLimit,
				Payload: e.Payload, claimToken: token}
			switch {
			case !s.Enabled:
				// Paused: it waits until the subscription is enabled
				// again.
				row.State = string(DeliveryPaused)
			case free > 0 && d.admit(&in, j, taken, now):
				free--
				taken[s.ID]++
				row.State, row.NextAt, row.ClaimToken = string(DeliveryDelivering), lease, &token
				claimed[id] = j
			case free == 0:
				out.moreDue = true // no slot left: claim it later
			default:
				// Its subscription is at its cap or held back by its
				// limiter: the loop claims it when one of its deliveries
				// finishes or its limiter admits again, not at every step
				// (a hanging endpoint would make every step claim).
				out.refused = append(out.refused, s.ID)
			}
			rows = append(rows, row)
		}
	}
	if len(rows) > 0 {
		batch, err := json.Marshal(rows)
		if err != nil {
			return fmt.Errorf("encode deliveries: %w", err)
		}
		res, err := tx.ExecContext(ctx, d.q.InsertDeliveries, string(batch))
		if err != nil {
			return fmt.Errorf("insert deliveries: %w", err)
		}
		// The events were unexpanded and are locked by this transaction,
		// so none of their deliveries can exist already; should one exist
		// all the same (ON CONFLICT skipped it), which one is unknown, so
		// no job starts now: the claimed rows that were inserted become due
		// again when their lease lapses.
		if n, err := res.RowsAffected(); err != nil || n != int64(len(rows)) {
			d.log.Warn("webhooks: some deliveries existed before their event was expanded; their jobs start when the lease lapses",
				slog.Int64("inserted", n), slog.Int("expected", len(rows)), slog.Any("error", err))
		} else {
			for _, row := range rows {
				if j, ok := claimed[row.ID]; ok {
					out.jobs = append(out.jobs, j)
				}
			}
		}
	}
	if _, err := tx.ExecContext(ctx, d.q.MarkExpandedBatch, now.UnixMilli(), int64sJSON(seqs)); err != nil {
		return fmt.Errorf("mark events expanded: %w", err)
	}
	out.events, out.deliveries = len(events), len(rows)
	return nil
}

// claim leases up to in.claim due deliveries that d.admit lets start (at
// most MaxInFlightPerSubscription per subscription counting those in
// flight and those this step took, within their rate limits), sharing the slots between first attempts and retries so
// neither starves the other. more reports that due work was left behind.
func (d *Dispatcher) claim(ctx context.Context, tx dbtx.Tx, in *stepInput, taken map[string]int,
	token string, now time.Time, refused *[]string) (jobs []*job, more bool, err error) {
	limit := in.claim
	skip := d.skipJSON(in.perSub, in.limiter, now)
	var first, retry []*job
	if err := sqlx.SelectContext(ctx, tx, &first, d.q.SelectDueFirst, now.UnixMilli(), skip, limit); err != nil {
		return nil, false, fmt.Errorf("select due deliveries: %w", err)
	}
	if err := sqlx.SelectContext(ctx, tx, &retry, d.q.SelectDueRetry, now.UnixMilli(), skip, limit); err != nil {
		return nil, false, fmt.Errorf("select due retries: %w", err)
	}
	take := func(j *job) {
		if d.admit(in, j, taken, now) {
			taken[j.SubscriptionID]++
			j.claimToken = token
			jobs = append(jobs, j)
		} else {
			*refused = append(*refused, j.SubscriptionID)
		}
	}
	// Alternate between the lanes while both have work. Successive claims
	// start with either lane in turn, so that claims of one slot
	// (Concurrency 1, or a single slot freed) serve retries too.
	both := len(first) > 0 && len(retry) > 0
	retryTurn := both && d.retryTurn.Load()
	if both {
		d.retryTurn.Store(!retryTurn)
	}
	for i, k := 0, 0; len(jobs) < limit && (i < len(first) || k < len(retry)); {
		if i < len(first) && ((len(jobs)%2 == 0) != retryTurn || k >= len(retry)) {
			take(first[i])
			i++
		} else {
			take(retry[k])
			k++
		}
	}
	more = len(first)+len(retry) > len(jobs) || len(jobs) == limit
	if len(jobs) == 0 {
		return nil, more, nil
	}
	ids := make([]string, len(jobs))
	for i, j := range jobs {
		ids[i] = j.DeliveryID
	}
	lease := now.Add(d.cfg.LeaseDuration).UnixMilli()
	if _, err := tx.ExecContext(ctx, d.q.ClaimDeliveries, lease, token, now.UnixMilli(), idsJSON(ids)); err != nil {
		return nil, false, fmt.Errorf("claim deliveries: %w", err)
	}
	return jobs, more, nil
}

// skipJSON lists the subscriptions at their in-flight cap or held back by
// their limiter, which claims skip.
func (d *Dispatcher) skipJSON(perSub map[string]int, lim *limiter, now time.Time) string {
	return idsJSON(append(d.capped(perSub), lim.blocked(now)...))
}

// capped lists the subscriptions at their in-flight cap.
func (d *Dispatcher) capped(perSub map[string]int) []string {
	ids := make([]string, 0, len(perSub))
	for s, n := range perSub {
		if n >= d.cfg.MaxInFlightPerSubscription {
			ids = append(ids, s)
		}
	}
	return ids
}

// maxErrorText bounds a recorded attempt's error text (bytes).
const maxErrorText = 1 << 10

// recordBatch is the encoded outcome of finished attempts.
type recordBatch struct {
	outcomes   []outcome // per result
	deliveries string    // RecordDeliveries' parameter
	attempts   string    // InsertAttempts' parameter
	health     string    // RecordHealth's parameter
}

// recordBatch decides each finished attempt's consequence and encodes the
// rows to store. With made set (direct expansion) the deliveries are rows
// to insert, appended to *made, rather than claims to update.
func (d *Dispatcher) recordBatch(results []result, now time.Time, made *[]madeRow) (recordBatch, error) {
	type deliveryRow struct {
		ID          string `json:"id"`
		ClaimToken  string `json:"claim_token"`
		State       string `json:"state"`
		NextAt      int64  `json:"next_at"`
		LastStatus  int    `json:"last_status"`
		LastError   string `json:"last_error"`
		At          int64  `json:"at"`
		DeliveredAt *int64 `json:"delivered_at"`
	}
	type attemptRow struct {
		DeliveryID   string `json:"delivery_id"`
		Attempt      int    `json:"attempt"`
		StartedAt    int64  `json:"started_at"`
		DurationMS   int64  `json:"duration_ms"`
		StatusCode   int    `json:"status_code"`
		Error        string `json:"error"`
		ResponseBody string `json:"response_body"`
	}
	b := recordBatch{outcomes: make([]outcome, len(results))}
	var deliveries []deliveryRow
	var attempts []attemptRow
	if made == nil { // else the rows the caller inserts carry the attempts
		deliveries = make([]deliveryRow, len(results))
		attempts = make([]attemptRow, len(results))
	} else {
		*made = slices.Grow(*made, len(results))
	}
	for i := range results {
		r := &results[i]
		// An error text can hold anything a peer sent (a certificate's
		// names, say): make it storable in every database, and short.
		if len(r.errText) > maxErrorText {
			cut := maxErrorText
			for cut > 0 && !utf8.RuneStart(r.errText[cut]) {
				cut-- // not inside a character
			}
			r.errText = r.errText[:cut]
		}
		r.errText = cleanText([]byte(r.errText))
		o := d.outcome(r, now)
		b.outcomes[i] = o
		var deliveredAt *int64
		if o.deliveredAt.Valid {
			deliveredAt = &o.deliveredAt.Int64
		}
		if made != nil {
			j := r.job
			*made = append(*made, madeRow{ID: j.DeliveryID, EventID: j.EventID, SubscriptionID: j.SubscriptionID,
				Tenant: j.Tenant, State: string(o.state), Attempts: 1, NextAt: o.nextAt, LastStatus: r.status,
				LastError: r.errText, CreatedAt: j.held.readAt.UnixMilli(), At: now.UnixMilli(), DeliveredAt: deliveredAt,
				first: r})
		} else {
			deliveries[i] = deliveryRow{ID: r.job.DeliveryID, ClaimToken: r.job.claimToken, State: string(o.state),
				NextAt: o.nextAt, LastStatus: r.status, LastError: r.errText, At: now.UnixMilli(), DeliveredAt: deliveredAt}
			attempts[i] = attemptRow{DeliveryID: r.job.DeliveryID, Attempt: r.job.Attempts + 1,
				StartedAt: r.started.UnixMilli(), DurationMS: r.duration.Milliseconds(),
				StatusCode: r.status, Error: r.errText, ResponseBody: r.excerpt}
		}
	}
	var dj, aj []byte
	if made == nil {
		var err error
		if dj, err = json.Marshal(deliveries); err != nil {
			return recordBatch{}, fmt.Errorf("encode delivery outcomes: %w", err)
		}
		if aj, err = json.Marshal(attempts); err != nil {
			return recordBatch{}, fmt.Errorf("encode attempts: %w", err)
		}
	}
	var err error
	if b.health, err = healthJSON(results, b.outcomes); err != nil {
		return recordBatch{}, err
	}
	b.deliveries, b.attempts = string(dj), string(aj)
	return b, nil
}

// record stores the outcome of finished attempts: the attempt rows, each
// delivery's new state, the health of their subscriptions and the
// subscriptions disabled (by 410 Gone or by failing too long). It returns
// the operational events to raise once the transaction commits.
func (d *Dispatcher) record(ctx context.Context, tx dbtx.Tx, results []result, b recordBatch, now time.Time) ([]OperationalEvent, error) {
	res, err := tx.ExecContext(ctx, d.q.RecordDeliveries, b.deliveries)
	if err != nil {
		return nil, fmt.Errorf("update deliveries: %w", err)
	}
	var lost map[string]bool
	if n, err := res.RowsAffected(); err != nil {
		return nil, fmt.Errorf("update deliveries: %w", err)
	} else if n < int64(len(results)) {
		// Rare: find out which ones the update recorded.
		ids := make([]string, len(results))
		for i := range results {
			ids[i] = results[i].job.DeliveryID
		}
		var recorded []string
		if err := sqlx.SelectContext(ctx, tx, &recorded, d.q.SelectRecorded, idsJSON(ids), now.UnixMilli()); err != nil {
			return nil, fmt.Errorf("select recorded deliveries: %w", err)
		}
		lost = d.lostClaims(results, recorded)
	}
	if _, err := tx.ExecContext(ctx, d.q.InsertAttempts, b.attempts); err != nil {
		return nil, fmt.Errorf("insert attempts: %w", err)
	}
	if _, err := tx.ExecContext(ctx, d.q.RecordHealth, b.health); err != nil {
		return nil, fmt.Errorf("record subscription health: %w", err)
	}
	ops := d.deliveryEvents(results, b.outcomes, lost, now)
	disabled, err := d.disableFailing(ctx, tx, results, now)
	if err != nil {
		return nil, err
	}
	ops = append(ops, disabled...)
	if err := d.publishOperational(ctx, tx, ops); err != nil {
		return nil, err
	}
	return ops, nil
}

// lostClaims returns (and logs) the finished attempts whose delivery the
// update did not record (it is not among recorded): it was claimed again
// (its lease lapsed) or canceled while in flight. Their attempts are
// recorded, but the delivery's state was left as it was.
func (d *Dispatcher) lostClaims(results []result, recorded []string) map[string]bool {
	ok := make(map[string]bool, len(recorded))
	for _, id := range recorded {
		ok[id] = true
	}
	lost := map[string]bool{}
	for i := range results {
		j := results[i].job
		if ok[j.DeliveryID] {
			continue
		}
		lost[j.DeliveryID] = true
		d.log.Warn("webhooks: delivery was claimed again or canceled while in flight; attempt recorded, state left as is",
			slog.String("delivery", j.DeliveryID))
	}
	return lost
}

func (d *Dispatcher) inTx(ctx context.Context, fn func(tx dbtx.Tx) error) error {
	return dbtx.Run(ctx, d.db, d.dialect == DialectSQLite, fn)
}

// int64sJSON encodes numbers as a JSON array.
func int64sJSON(ns []int64) string {
	b, _ := json.Marshal(ns)
	return string(b)
}
