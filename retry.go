package webhooks

import (
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// RetryPolicy decides what happens after a failed attempt: retry after a
// delay, or give up and mark the delivery dead (kept, visible, and replayable
// with Subscriptions.RetryDelivery). Implementations must be safe for
// concurrent use.
type RetryPolicy interface {
	// NextAttempt returns how long to wait before the next attempt after
	// the failed attempt f, or false to give up.
	NextAttempt(f FailedAttempt) (delay time.Duration, retry bool)
}

// FailedAttempt describes a failed delivery attempt to a RetryPolicy.
type FailedAttempt struct {
	// Attempt is how many attempts the delivery has had, this one included
	// (1 after the first).
	Attempt int
	// StatusCode is the response status, or 0 when no response arrived.
	StatusCode int
	// Err is the transport error (connection refused, timeout, DNS failure),
	// or nil when a response arrived.
	Err error
	// RetryAfter is the delay the endpoint asked for in a Retry-After header
	// of a 429 or 503 response, or 0.
	RetryAfter time.Duration
}

// Defaults of ExponentialBackoff.
const (
	// RetryJitterDefault spreads each delay by up to ±20%.
	RetryJitterDefault = 0.2
	// MaxRetryAfterDefault bounds how long a Retry-After header can delay
	// the next attempt.
	MaxRetryAfterDefault = time.Hour
)

// RetryScheduleDefault returns the default delays between attempts, close to
// the industry's common schedule: the first attempt at once, then retries
// after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h: eight attempts over
// about 27.6 hours.
func RetryScheduleDefault() []time.Duration {
	return []time.Duration{
		5 * time.Second, 5 * time.Minute, 30 * time.Minute,
		2 * time.Hour, 5 * time.Hour, 10 * time.Hour, 10 * time.Hour,
	}
}

// ExponentialBackoff is the default RetryPolicy: a fixed schedule of growing
// delays with random jitter, honouring Retry-After. The zero value uses
// RetryScheduleDefault, RetryJitterDefault and MaxRetryAfterDefault.
type ExponentialBackoff struct {
	// Schedule[i] is the delay after attempt i+1 fails; when it runs out
	// the delivery is dead. Nil means RetryScheduleDefault(); an empty,
	// non-nil schedule never retries.
	Schedule []time.Duration
	// Jitter is the fraction by which each delay may vary either way,
	// between 0 and 1. Zero means RetryJitterDefault; negative means none.
	Jitter float64
	// MaxRetryAfter clamps a Retry-After delay. Zero means
	// MaxRetryAfterDefault.
	MaxRetryAfter time.Duration
}

// NextAttempt implements RetryPolicy. A Retry-After delay, clamped to
// MaxRetryAfter, replaces the scheduled delay when it is longer; it does not
// add attempts beyond the schedule.
func (b ExponentialBackoff) NextAttempt(f FailedAttempt) (time.Duration, bool) {
	schedule := b.Schedule
	if schedule == nil {
		schedule = RetryScheduleDefault()
	}
	if f.Attempt < 1 || f.Attempt > len(schedule) {
		return 0, false
	}
	delay := jitter(schedule[f.Attempt-1], b.Jitter)
	if f.RetryAfter > 0 {
		maxRA := b.MaxRetryAfter
		if maxRA <= 0 {
			maxRA = MaxRetryAfterDefault
		}
		delay = max(delay, min(f.RetryAfter, maxRA))
	}
	return delay, true
}

func jitter(d time.Duration, j float64) time.Duration {
	switch {
	case j == 0:
		j = RetryJitterDefault
	case j < 0:
		return d
	case j > 1:
		j = 1
	}
	if d <= 0 {
		return 0
	}
	// uniformly within [d*(1-j), d*(1+j)]
	return time.Duration(float64(d) * (1 - j + 2*j*rand.Float64()))
}

// retryAfter parses a Retry-After header of a 429 or 503 response: seconds or
// an HTTP date. It returns 0 when absent, malformed, or in the past.
func retryAfter(resp *http.Response, now time.Time) time.Duration {
	if resp == nil || resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusServiceUnavailable {
		return 0
	}
	v := strings.TrimSpace(resp.Header.Get("Retry-After"))
	if v == "" {
		return 0
	}
	if secs, err := strconv.ParseInt(v, 10, 64); err == nil {
		if secs <= 0 {
			return 0
		}
		if secs > int64(365*24*time.Hour/time.Second) {
			secs = int64(365 * 24 * time.Hour / time.Second)
		}
		return time.Duration(secs) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}
