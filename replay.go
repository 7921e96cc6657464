package webhooks

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/outboxhook/webhooks/store"
)

// ReplayScope selects which deliveries Subscriptions.Replay queues again.
type ReplayScope string

// The replay scopes.
const (
	// ReplayFailed (the default) queues the dead deliveries and the
	// pending ones that already failed at least once (waiting for a retry).
	ReplayFailed ReplayScope = "failed"
	// ReplayAll queues what ReplayFailed does and the succeeded
	// deliveries too.
	ReplayAll ReplayScope = "all"
)

// ReplayBatchSize is how many deliveries Replay queues per statement, so
// that a huge history never holds the database's write lock for long.
const ReplayBatchSize = 1000

// ReplayOptions selects the deliveries of a Replay.
type ReplayOptions struct {
	// Since and Until bound the deliveries' creation time (when the event
	// was matched to the subscription, normally just after it was
	// published): at or after Since, and before Until. A zero Since means
	// from the first delivery, a zero Until means up to now.
	Since, Until time.Time
	// Scope says which deliveries: empty means ReplayFailed.
	Scope ReplayScope
}

// requeueMode says which deliveries requeue changes and how.
type requeueMode struct {
	fresh     bool // restart the attempt count: a fresh retry schedule
	succeeded bool // succeeded deliveries too (dead ones always)
	failing   bool // pending deliveries that already failed too
}

// requeue makes the tenant's deliveries ids due now, keeping their attempt
// log, as mode allows, in statements of at most ReplayBatchSize IDs, and
// returns how many it changed. Deliveries in flight, first attempts still
// pending, canceled deliveries and those of deleted subscriptions are left
// as they are. This is the one place where deliveries are queued again.
func (s *Subscriptions) requeue(ctx context.Context, tenant string, ids []string, mode requeueMode) (int, error) {
	total := 0
	for len(ids) > 0 {
		batch := ids[:min(len(ids), ReplayBatchSize)]
		ids = ids[len(batch):]
		now := s.clock.Now().UnixMilli()
		res, err := s.db.ExecContext(ctx, s.ops.RequeueDeliveries,
			now, mode.fresh, mode.succeeded, mode.failing, tenant, idsJSON(batch))
		if err != nil {
			return total, err
		}
		n, err := res.RowsAffected()
		if err != nil {
			return total, err
		}
		total += int(n)
	}
	return total, nil
}

// Replay queues again the deliveries of the tenant's subscription
// subscriptionID that opts selects, to be attempted now, and returns how
// many it queued. The receiver gets them with their original webhook-id
// (the event ID) and may deduplicate on it. Each replayed delivery starts a
// fresh retry schedule (its attempt count restarts from 0; its attempt log
// is kept), so that a dead delivery is retried as fully as a new one.
// Deliveries in flight or not yet attempted are left alone.
//
// Replay works in batches of ReplayBatchSize, each its own short write;
// deliveries queued by earlier batches stay queued when a later one fails,
// and the count returned with the error says how many. The subscription
// must exist (ErrNotFound otherwise, also for another tenant's or a deleted
// one); a disabled subscription's replayed deliveries wait until it is
// enabled. An unknown Scope or an Until not after Since is
// ErrInvalidSubscription.
func (s *Subscriptions) Replay(ctx context.Context, tenant, subscriptionID string, opts ReplayOptions) (int, error) {
	switch opts.Scope {
	case "", ReplayFailed, ReplayAll:
	default:
		return 0, fmt.Errorf("%w: unknown replay scope %q", ErrInvalidSubscription, string(opts.Scope))
	}
	since, until := int64(math.MinInt64), int64(math.MaxInt64)
	if !opts.Since.IsZero() {
		since = opts.Since.UnixMilli()
	}
	if !opts.Until.IsZero() {
		until = opts.Until.UnixMilli()
	}
	if until <= since {
		return 0, fmt.Errorf("%w: replay Until must be after Since", ErrInvalidSubscription)
	}
	if _, err := s.Get(ctx, tenant, subscriptionID); err != nil {
		return 0, err
	}
	mode := requeueMode{fresh: true, succeeded: opts.Scope == ReplayAll, failing: true}
	total, cursor := 0, ""
	for {
		var ids []string
		if err := sqlx.SelectContext(ctx, s.db, &ids, store.SelectReplayBatch,
			subscriptionID, tenant, cursor, since, until, mode.succeeded, ReplayBatchSize); err != nil {
			return total, fmt.Errorf("webhooks: replay subscription %q: %w", subscriptionID, err)
		}
		if len(ids) == 0 {
			return total, nil
		}
		n, err := s.requeue(ctx, tenant, ids, mode)
		total += n
		if err != nil {
			return total, fmt.Errorf("webhooks: replay subscription %q: %w", subscriptionID, err)
		}
		if len(ids) < ReplayBatchSize {
			return total, nil
		}
		cursor = ids[len(ids)-1]
	}
}

// Resend queues again the existing deliveries of the tenant's event eventID
// (to subscriptionID alone, or with subscriptionID empty to every
// subscription it was delivered to), to be attempted now with the same
// webhook-id and a fresh retry schedule, like Replay. Succeeded, dead and
// failing deliveries are queued; one not yet attempted or in flight is
// already on its way and left as it is.
//
// Resend never creates deliveries: a subscription that did not match the
// event when it was published (or did not exist yet) does not receive it,
// even if it matches now. Without a delivery of the event to a subscription
// that still exists, it returns ErrNotFound.
func (s *Subscriptions) Resend(ctx context.Context, tenant, eventID, subscriptionID string) error {
	var ids []string
	if err := sqlx.SelectContext(ctx, s.db, &ids, store.SelectEventDeliveries, tenant, eventID, subscriptionID); err != nil {
		return fmt.Errorf("webhooks: resend event %q: %w", eventID, err)
	}
	if len(ids) == 0 {
		if subscriptionID != "" {
			return fmt.Errorf("%w: no delivery of event %q to subscription %q", ErrNotFound, eventID, subscriptionID)
		}
		return fmt.Errorf("%w: no delivery of event %q", ErrNotFound, eventID)
	}
	if _, err := s.requeue(ctx, tenant, ids, requeueMode{fresh: true, succeeded: true, failing: true}); err != nil {
		return fmt.Errorf("webhooks: resend event %q: %w", eventID, err)
	}
	return nil
}

// replayJSON is the answer of POST .../replay.
type replayJSON struct {
	Requeued int `json:"requeued"`
}

var replayFields = map[string]bool{"since": true, "until": true, "scope": true}

// decodeReplay reads and validates the body of POST .../replay: since is
// required, so that a whole history is never replayed by accident.
func decodeReplay(body []byte) (ReplayOptions, *problem) {
	fields, p := parseObject(body)
	if p != nil {
		return ReplayOptions{}, p
	}
	if p := unknownFields(fields, replayFields); p != nil {
		return ReplayOptions{}, p
	}
	var errs fieldErrors
	var opts ReplayOptions
	dateTime := func(name string) time.Time {
		v, ok := decodeField[string](fields, name, "a date-time string", &errs)
		if !ok {
			return time.Time{}
		}
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil || t.Year() < 1970 {
			errs.add(name, "must be an RFC 3339 date-time after 1970, such as 2025-01-02T03:04:05Z")
			return time.Time{}
		}
		return t
	}
	opts.Since = dateTime("since")
	if _, given := fields["since"]; !given {
		errs.add("since", "is required: replay the deliveries created since when")
	}
	opts.Until = dateTime("until")
	if !opts.Since.IsZero() && !opts.Until.IsZero() && !opts.Until.After(opts.Since) {
		errs.add("until", "must be after since")
	}
	if sc, ok := decodeField[string](fields, "scope", "a string", &errs); ok {
		switch ReplayScope(sc) {
		case ReplayFailed, ReplayAll:
			opts.Scope = ReplayScope(sc)
		default:
			errs.add("scope", `must be "failed" (dead and failing deliveries) or "all" (succeeded ones too)`)
		}
	}
	if len(errs) > 0 {
		return ReplayOptions{}, problemValidation(errs)
	}
	return opts, nil
}

// replay serves POST /webhook-subscriptions/{subscriptionId}/replay.
func (h *handler) replay(w http.ResponseWriter, r *http.Request, tenant string) {
	body, p := readJSONBody(w, r)
	if p != nil {
		h.writeProblem(w, r, p)
		return
	}
	opts, p := decodeReplay(body)
	if p != nil {
		h.writeProblem(w, r, p)
		return
	}
	id := r.PathValue("subscriptionId")
	n, err := h.subs.Replay(r.Context(), tenant, id, opts)
	if n > 0 {
		h.notify()
	}
	if err != nil {
		h.storeError(w, r, err, "replay deliveries")
		return
	}
	h.log.LogAttrs(r.Context(), slog.LevelInfo, "webhooks: deliveries replayed",
		slog.String("tenant", tenant), slog.String("subscriptionId", id), slog.Int("requeued", n))
	writeJSON(w, http.StatusAccepted, replayJSON{Requeued: n})
}
