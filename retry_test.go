package webhooks

import (
	"net/http"
	"testing"
	"time"
)

func TestDefaultScheduleWithJitter(t *testing.T) {
	want := []time.Duration{5 * time.Second, 5 * time.Minute, 30 * time.Minute, 2 * time.Hour, 5 * time.Hour, 10 * time.Hour, 10 * time.Hour}
	var p ExponentialBackoff
	for i := 0; i < 200; i++ {
		for n, base := range want {
			d, ok := p.NextAttempt(FailedAttempt{Attempt: n + 1, StatusCode: 500})
			if !ok {
				t.Fatalf("attempt %d: gave up", n+1)
			}
			lo := time.Duration(float64(base) * (1 - RetryJitterDefault))
			hi := time.Duration(float64(base) * (1 + RetryJitterDefault))
			if d < lo || d > hi {
				t.Fatalf("attempt %d: delay %v outside [%v, %v]", n+1, d, lo, hi)
			}
		}
		if _, ok := p.NextAttempt(FailedAttempt{Attempt: len(want) + 1}); ok {
			t.Fatal("retried after the last scheduled attempt (8 attempts in all)")
		}
	}
}

func TestJitterVaries(t *testing.T) {
	var p ExponentialBackoff
	seen := map[time.Duration]bool{}
	for i := 0; i < 20; i++ {
		d, _ := p.NextAttempt(FailedAttempt{Attempt: 3})
		seen[d] = true
	}
	if len(seen) < 2 {
		t.Fatal("no jitter: every delay is the same")
	}
	exact := ExponentialBackoff{Schedule: []time.Duration{time.Minute}, Jitter: -1}
	if d, ok := exact.NextAttempt(FailedAttempt{Attempt: 1}); !ok || d != time.Minute {
		t.Fatalf("negative jitter: %v %v", d, ok)
	}
	never := ExponentialBackoff{Schedule: []time.Duration{}}
	if _, ok := never.NextAttempt(FailedAttempt{Attempt: 1}); ok {
		t.Fatal("empty schedule retried")
	}
}

func TestRetryAfterClamped(t *testing.T) {
	p := ExponentialBackoff{Schedule: []time.Duration{time.Second, time.Second}, Jitter: -1, MaxRetryAfter: 10 * time.Minute}
	cases := []struct{ ra, want time.Duration }{
		{0, time.Second},
		{30 * time.Second, 30 * time.Second},
		{time.Hour, 10 * time.Minute},
		{time.Millisecond, time.Second}, // never shorter than the schedule
	}
	for _, c := range cases {
		if d, ok := p.NextAttempt(FailedAttempt{Attempt: 1, StatusCode: 429, RetryAfter: c.ra}); !ok || d != c.want {
			t.Errorf("Retry-After %v: delay %v, want %v", c.ra, d, c.want)
		}
	}
	if _, ok := p.NextAttempt(FailedAttempt{Attempt: 3, RetryAfter: time.Second}); ok {
		t.Error("Retry-After added attempts beyond the schedule")
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	resp := func(status int, v string) *http.Response {
		r := &http.Response{StatusCode: status, Header: http.Header{}}
		if v != "" {
			r.Header.Set("Retry-After", v)
		}
		return r
	}
	cases := []struct {
		r    *http.Response
		want time.Duration
	}{
		{resp(429, "120"), 120 * time.Second},
		{resp(503, " 7 "), 7 * time.Second},
		{resp(503, now.Add(90*time.Second).Format(http.TimeFormat)), 90 * time.Second},
		{resp(503, now.Add(-time.Hour).Format(http.TimeFormat)), 0},
		{resp(500, "120"), 0}, // only 429 and 503
		{resp(429, "soon"), 0},
		{resp(429, "-5"), 0},
		{resp(429, ""), 0},
		{resp(429, "99999999999"), 365 * 24 * time.Hour},
		{nil, 0},
	}
	for i, c := range cases {
		if got := retryAfter(c.r, now); got != c.want {
			t.Errorf("case %d: %v, want %v", i, got, c.want)
		}
	}
}
