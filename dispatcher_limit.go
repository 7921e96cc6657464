package webhooks

import (
	"net/http"
	"time"
)

// Per-subscription admission: besides the in-flight cap
// (Config.MaxInFlightPerSubscription), a subscription with a RateLimit gets
// at most that many deliveries per second (a token bucket holding one
// second's worth), and one that answered 429 Too Many Requests gets none
// until its Retry-After has passed (ThrottleDefault when it gave none).
// Both hold only that subscription back: claims skip it, so its due
// deliveries wait in the database while the others go on. The limits are
// kept by each dispatcher: N dispatchers sharing a database send a
// subscription up to N times its RateLimit.

// ThrottleDefault is how long a subscription gets no deliveries after a 429
// answer without a usable Retry-After; Retry-After is clamped to
// ThrottleMax.
const (
	ThrottleDefault = time.Second
	ThrottleMax     = time.Minute
)

// limiter holds the token buckets and 429 pauses of one dispatcher loop. It
// is used by the loop's goroutine only.
type limiter struct {
	buckets map[string]*bucket
}

type bucket struct {
	rate   float64   // tokens per second; 0: no rate limit
	tokens float64   // available now (as of last)
	last   time.Time // when tokens was computed
	until  time.Time // no deliveries before then (429)
}

func newLimiter() *limiter { return &limiter{buckets: map[string]*bucket{}} }

// get returns sub's bucket, creating it for a rate-limited subscription;
// nil means no limit applies.
func (l *limiter) get(sub string, rate float64, now time.Time) *bucket {
	if l == nil {
		return nil
	}
	b := l.buckets[sub]
	if b == nil {
		if rate <= 0 {
			return nil
		}
		b = &bucket{rate: rate, tokens: burst(rate), last: now}
		l.buckets[sub] = b
	}
	if b.rate != rate { // the subscription's limit changed
		b.rate, b.tokens = rate, min(b.tokens, burst(rate))
	}
	b.refill(now)
	return b
}

func burst(rate float64) float64 { return max(1, rate) }

func (b *bucket) refill(now time.Time) {
	if b.rate > 0 && now.After(b.last) {
		b.tokens = min(burst(b.rate), b.tokens+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
}

// ready reports that the bucket admits a delivery now.
func (b *bucket) ready(now time.Time) bool {
	return b == nil || !now.Before(b.until) && (b.rate <= 0 || b.tokens >= 1)
}

// take admits one delivery of sub (whose RateLimit is rate) at now, if its
// bucket allows, and takes a token for it.
func (l *limiter) take(sub string, rate float64, now time.Time) bool {
	b := l.get(sub, rate, now)
	if !b.ready(now) {
		return false
	}
	if b != nil && b.rate > 0 {
		b.tokens--
	}
	return true
}

// limiterState is a copy of a limiter's buckets.
type limiterState map[string]bucket

// save copies the buckets, for restore to put back the tokens a step took
// should its transaction fail or run again. With no buckets (no rate
// limits or pauses live) it allocates nothing: the dispatcher loop calls it
// every step.
func (l *limiter) save() limiterState {
	if l == nil || len(l.buckets) == 0 {
		return nil
	}
	s := make(limiterState, len(l.buckets))
	for id, b := range l.buckets {
		s[id] = *b
	}
	return s
}

// restore puts the buckets back as save found them.
func (l *limiter) restore(s limiterState) {
	if l == nil {
		return
	}
	clear(l.buckets)
	for id, b := range s {
		l.buckets[id] = &b
	}
}

// blocked lists the subscriptions that admit nothing at now, which claims
// skip.
func (l *limiter) blocked(now time.Time) []string {
	if l == nil {
		return nil
	}
	var ids []string
	for id, b := range l.buckets {
		b.refill(now)
		if !b.ready(now) {
			ids = append(ids, id)
		}
	}
	return ids
}

// wait returns how long until the first blocked subscription admits a
// delivery again (0 when none is blocked). Buckets that are full and
// unthrottled are dropped, so the limiter holds only live state.
func (l *limiter) wait(now time.Time) time.Duration {
	if l == nil {
		return 0
	}
	var next time.Duration
	for id, b := range l.buckets {
		b.refill(now)
		var w time.Duration
		switch {
		case now.Before(b.until):
			w = b.until.Sub(now)
		case b.rate > 0 && b.tokens < 1:
			w = time.Duration(min((1-b.tokens)/b.rate, 3600) * float64(time.Second))
		case b.rate <= 0 || b.tokens >= burst(b.rate):
			delete(l.buckets, id)
			continue
		default:
			continue
		}
		if next == 0 || w < next {
			next = max(w, time.Millisecond)
		}
	}
	return next
}

// throttle holds sub back after a 429 answer.
func (l *limiter) throttle(r *result, now time.Time) {
	if l == nil || r.status != http.StatusTooManyRequests {
		return
	}
	pause := r.retryAfter
	if pause <= 0 {
		pause = ThrottleDefault
	}
	pause = min(pause, ThrottleMax)
	b := l.buckets[r.job.SubscriptionID]
	if b == nil {
		b = &bucket{rate: r.job.RateLimit, tokens: burst(r.job.RateLimit), last: now}
		l.buckets[r.job.SubscriptionID] = b
	}
	if until := now.Add(pause); until.After(b.until) {
		b.until = until
	}
}

// admit reports whether job j may start now: its subscription is below its
// in-flight cap (counting those in flight and those this step took) and its
// limiter admits it (taking a token).
func (d *Dispatcher) admit(in *stepInput, j *job, taken map[string]int, now time.Time) bool {
	if in.perSub[j.SubscriptionID]+taken[j.SubscriptionID] >= d.cfg.MaxInFlightPerSubscription {
		return false
	}
	return in.limiter == nil || in.limiter.take(j.SubscriptionID, j.RateLimit, now)
}
