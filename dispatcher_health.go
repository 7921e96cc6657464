package webhooks

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/outboxhook/webhooks/internal/dbtx"
	"github.com/outboxhook/webhooks/store"
)

// Endpoint health: every recorded attempt updates its subscription's
// consecutive failures, the time the current run of failures began and the
// last success (in the transaction that records the attempt). A
// subscription that answers 410 Gone, or that has failed without a success
// for Config.DisableAfter (and at least Config.DisableMinFailures attempts
// in a row), is disabled with the reason recorded. Its deliveries are not
// dropped: claims skip disabled subscriptions, so they wait, paused, and go
// out once it is enabled again, as do the deliveries of events published
// meanwhile.

// OperationalEventType names an operational event.
type OperationalEventType string

// The operational events.
const (
	// OpSubscriptionDisabled: the dispatcher disabled a subscription (410
	// Gone, or failing for Config.DisableAfter). Reason says why.
	OpSubscriptionDisabled OperationalEventType = "subscription.disabled"
	// OpDeliveryFailing: a delivery's Config.FailingAfterAttempts-th
	// attempt failed; it will be retried.
	OpDeliveryFailing OperationalEventType = "delivery.failing"
	// OpDeliveryExhausted: a delivery's last attempt failed and the retry
	// policy gave up; the delivery is dead (kept, and replayable).
	OpDeliveryExhausted OperationalEventType = "delivery.exhausted"
)

// OperationalEvent is something about the webhook system itself that an
// operator (or the tenant) should know. See Config.OnOperationalEvent and
// Config.PublishOperationalEvents.
type OperationalEvent struct {
	Type           OperationalEventType `json:"type"`
	Tenant         string               `json:"tenant"`
	SubscriptionID string               `json:"subscriptionId"`
	// DeliveryID and EventID are empty for OpSubscriptionDisabled.
	DeliveryID string `json:"deliveryId,omitempty"`
	EventID    string `json:"eventId,omitempty"`
	// Attempts is how many attempts the delivery has had.
	Attempts int `json:"attempts,omitempty"`
	// StatusCode and Error describe the last attempt (Error is the reason
	// for OpSubscriptionDisabled).
	StatusCode int       `json:"statusCode,omitempty"`
	Error      string    `json:"error,omitempty"`
	At         time.Time `json:"at"`
}

// healthJSON encodes RecordHealth's rows: per subscription, the last
// success of the batch and the failures after it.
func healthJSON(results []result, outcomes []outcome) (string, error) {
	type row struct {
		ID     string `json:"id"`
		OKAt   *int64 `json:"ok_at"`
		Failed int    `json:"failed"`
		FailAt *int64 `json:"fail_at"`
	}
	var rows []*row
	bySub := map[string]*row{}
	for i := range results {
		r := &results[i]
		h := bySub[r.job.SubscriptionID]
		if h == nil {
			h = &row{ID: r.job.SubscriptionID}
			bySub[h.ID] = h
			rows = append(rows, h)
		}
		at := r.started.UnixMilli()
		if outcomes[i].state == DeliverySucceeded {
			h.OKAt, h.Failed, h.FailAt = &at, 0, nil
			continue
		}
		h.Failed++
		if h.FailAt == nil {
			h.FailAt = &at
		}
	}
	// One order for every dispatcher, so concurrent steps lock the
	// subscriptions' rows (PostgreSQL) in the same order.
	slices.SortFunc(rows, func(a, b *row) int { return strings.Compare(a.ID, b.ID) })
	b, err := json.Marshal(rows)
	if err != nil {
		return "", fmt.Errorf("encode subscription health: %w", err)
	}
	return string(b), nil
}

// deliveryEvents returns the delivery.failing and delivery.exhausted events
// of a batch of recorded attempts (lost holds those whose record did not
// take).
func (d *Dispatcher) deliveryEvents(results []result, outcomes []outcome, lost map[string]bool, now time.Time) []OperationalEvent {
	var ops []OperationalEvent
	for i := range results {
		r, o := &results[i], outcomes[i]
		attempts := r.job.Attempts + 1
		var typ OperationalEventType
		switch {
		case lost[r.job.DeliveryID] || o.state == DeliverySucceeded:
			continue
		case o.state == DeliveryDead:
			typ = OpDeliveryExhausted
		case attempts == d.cfg.FailingAfterAttempts:
			typ = OpDeliveryFailing
		default:
			continue
		}
		ops = append(ops, OperationalEvent{Type: typ, Tenant: r.job.Tenant, SubscriptionID: r.job.SubscriptionID,
			DeliveryID: r.job.DeliveryID, EventID: r.job.EventID, Attempts: attempts,
			StatusCode: r.status, Error: r.errText, At: now})
	}
	return ops
}

// disableFailing disables the subscriptions of the batch that answered 410
// Gone, and those that have failed for too long, and returns an
// OpSubscriptionDisabled event for each one it disabled.
func (d *Dispatcher) disableFailing(ctx context.Context, tx dbtx.Tx, results []result, now time.Time) ([]OperationalEvent, error) {
	var ops []OperationalEvent
	failing := map[string]bool{}
	var ids []string
	for i := range results {
		r := &results[i]
		if r.status < 200 || r.status >= 300 {
			if !failing[r.job.SubscriptionID] {
				failing[r.job.SubscriptionID] = true
				ids = append(ids, r.job.SubscriptionID)
			}
		}
		if r.status != http.StatusGone {
			continue
		}
		reason := fmt.Sprintf("endpoint answered 410 Gone at %s", r.started.UTC().Format(time.RFC3339))
		var tenants []string
		if err := sqlx.SelectContext(ctx, tx, &tenants, store.DisableSubscription, reason, now.UnixMilli(), r.job.SubscriptionID); err != nil {
			return nil, fmt.Errorf("disable subscription %s: %w", r.job.SubscriptionID, err)
		}
		if len(tenants) == 1 {
			if err := pauseDeliveries(ctx, tx, r.job.SubscriptionID, now); err != nil {
				return nil, err
			}
			d.log.Warn("webhooks: subscription disabled: endpoint answered 410 Gone",
				slog.String("subscription", r.job.SubscriptionID))
			ops = append(ops, OperationalEvent{Type: OpSubscriptionDisabled, Tenant: tenants[0],
				SubscriptionID: r.job.SubscriptionID, StatusCode: r.status, Error: reason, At: now})
		}
	}
	if d.cfg.DisableAfter < 0 || len(ids) == 0 {
		return ops, nil
	}
	slices.Sort(ids) // lock order, as in healthJSON
	reason := fmt.Sprintf("every attempt failed for %v without a success (at least %d in a row)",
		d.cfg.DisableAfter, d.cfg.DisableMinFailures)
	var disabled []struct {
		ID     string `db:"id"`
		Tenant string `db:"tenant"`
	}
	if err := sqlx.SelectContext(ctx, tx, &disabled, d.q.AutoDisable, reason, now.UnixMilli(),
		now.Add(-d.cfg.DisableAfter).UnixMilli(), d.cfg.DisableMinFailures, idsJSON(ids)); err != nil {
		return nil, fmt.Errorf("disable failing subscriptions: %w", err)
	}
	for _, s := range disabled {
		if err := pauseDeliveries(ctx, tx, s.ID, now); err != nil {
			return nil, err
		}
		d.log.Warn("webhooks: subscription disabled: "+reason, slog.String("subscription", s.ID))
		ops = append(ops, OperationalEvent{Type: OpSubscriptionDisabled, Tenant: s.Tenant, SubscriptionID: s.ID,
			Error: reason, At: now})
	}
	return ops, nil
}

// pauseDeliveries parks the pending deliveries of a subscription just
// disabled (those in flight are paused when their attempt is recorded).
func pauseDeliveries(ctx context.Context, tx Execer, subscriptionID string, now time.Time) error {
	for _, q := range []string{store.PauseDeliveries, store.PauseRetries} {
		if _, err := tx.ExecContext(ctx, q, now.UnixMilli(), subscriptionID); err != nil {
			return fmt.Errorf("pause deliveries of %s: %w", subscriptionID, err)
		}
	}
	return nil
}

// publishOperational publishes ops as events of Config.OperationalTenant
// in tx, when Config.PublishOperationalEvents asks for it.
func (d *Dispatcher) publishOperational(ctx context.Context, tx dbtx.Tx, ops []OperationalEvent) error {
	if !d.cfg.PublishOperationalEvents {
		return nil
	}
	var events []Event
	for _, op := range ops {
		if op.Tenant == d.cfg.OperationalTenant {
			continue // about the operator's own subscriptions: no loop
		}
		events = append(events, Event{Type: string(op.Type), Tenant: d.cfg.OperationalTenant, Data: op, OccurredAt: op.At})
	}
	p := Publisher{Clock: d.clock}
	for len(events) > 0 {
		n := min(len(events), MaxBatchEvents)
		if _, err := p.PublishBatch(ctx, tx, events[:n]...); err != nil {
			return fmt.Errorf("publish operational events: %w", err)
		}
		events = events[n:]
	}
	return nil
}

// raise hands committed operational events to Config.OnOperationalEvent.
func (d *Dispatcher) raise(ctx context.Context, ops []OperationalEvent) {
	if d.cfg.OnOperationalEvent == nil {
		return
	}
	for _, op := range ops {
		d.cfg.OnOperationalEvent(ctx, op)
	}
}
