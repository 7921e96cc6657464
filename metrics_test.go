package webhooks

import (
	"bytes"
	"context"
	"database/sql"
	"log/slog"
	"maps"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// newTestMeterProvider returns an SDK MeterProvider and the ManualReader
// that collects from it.
func newTestMeterProvider(t testing.TB) (*sdkmetric.MeterProvider, *sdkmetric.ManualReader) {
	t.Helper()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
	return mp, reader
}

// collected is one collection of the dispatcher's metrics, by name.
type collected map[string]metricdata.Metrics

func collectMetrics(t testing.TB, reader *sdkmetric.ManualReader) collected {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatalf("collect: %v", err)
	}
	out := collected{}
	for _, sm := range rm.ScopeMetrics {
		if sm.Scope.Name != meterName {
			t.Errorf("instrumentation scope %q, want %q", sm.Scope.Name, meterName)
		}
		for _, m := range sm.Metrics {
			out[m.Name] = m
		}
	}
	return out
}

// attemptKey is an (outcome, status class) attribute pair.
type attemptKey struct{ outcome, class string }

// key reads the attributes of an attempt data point, failing on any other
// attribute than the two bounded ones.
func attemptKeyOf(t testing.TB, set attribute.Set) attemptKey {
	t.Helper()
	if set.Len() != 2 {
		t.Errorf("attempt data point has attributes %v, want only %s and %s", set.ToSlice(), AttrOutcome, AttrStatusClass)
	}
	o, _ := set.Value(AttrOutcome)
	c, _ := set.Value(AttrStatusClass)
	return attemptKey{o.AsString(), c.AsString()}
}

// attempts returns the attempts counter's values.
func (c collected) attempts(t testing.TB) map[attemptKey]int64 {
	t.Helper()
	m, ok := c[MetricDeliveryAttempts]
	if !ok {
		return nil
	}
	if m.Unit != "{attempt}" || m.Description == "" {
		t.Errorf("%s: unit %q, description %q", m.Name, m.Unit, m.Description)
	}
	sum, ok := m.Data.(metricdata.Sum[int64])
	if !ok || !sum.IsMonotonic {
		t.Fatalf("%s is %T, want a monotonic Sum[int64]", m.Name, m.Data)
	}
	out := map[attemptKey]int64{}
	for _, dp := range sum.DataPoints {
		out[attemptKeyOf(t, dp.Attributes)] += dp.Value
	}
	return out
}

// durations returns the attempt duration histogram's counts, and checks
// that the recorded durations are plausible.
func (c collected) durations(t testing.TB) map[attemptKey]int64 {
	t.Helper()
	m, ok := c[MetricAttemptDuration]
	if !ok {
		return nil
	}
	if m.Unit != "s" {
		t.Errorf("%s: unit %q, want s", m.Name, m.Unit)
	}
	h, ok := m.Data.(metricdata.Histogram[float64])
	if !ok {
		t.Fatalf("%s is %T, want Histogram[float64]", m.Name, m.Data)
	}
	out := map[attemptKey]int64{}
	for _, dp := range h.DataPoints {
		out[attemptKeyOf(t, dp.Attributes)] += int64(dp.Count)
		if dp.Sum < 0 || dp.Sum > float64(dp.Count)*60 {
			t.Errorf("%s: %d attempts took %v s in all", m.Name, dp.Count, dp.Sum)
		}
	}
	return out
}

// lag returns the lag histogram's count and sum.
func (c collected) lag(t testing.TB) (uint64, float64) {
	t.Helper()
	m, ok := c[MetricDeliveryLag]
	if !ok {
		return 0, 0
	}
	h, ok := m.Data.(metricdata.Histogram[float64])
	if !ok || len(h.DataPoints) != 1 || h.DataPoints[0].Attributes.Len() != 0 {
		t.Fatalf("%s: %#v, want one data point without attributes", m.Name, m.Data)
	}
	return h.DataPoints[0].Count, h.DataPoints[0].Sum
}

// gauges returns the pending gauges' values; ok is false when neither was
// observed.
func (c collected) gauges(t testing.TB) (pending int64, age float64, ok bool) {
	t.Helper()
	pm, pok := c[MetricPendingDeliveries]
	am, aok := c[MetricOldestPendingAge]
	if !pok && !aok {
		return 0, 0, false
	}
	p, _ := pm.Data.(metricdata.Gauge[int64])
	a, _ := am.Data.(metricdata.Gauge[float64])
	if len(p.DataPoints) != 1 || len(a.DataPoints) != 1 {
		t.Fatalf("gauges: %#v and %#v, want one data point each", pm.Data, am.Data)
	}
	return p.DataPoints[0].Value, a.DataPoints[0].Value, true
}

func TestMetricsOfARealDispatcher(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		mp, reader := newTestMeterProvider(t)
		cfg := Config{Clock: clock, MeterProvider: mp, RetryPolicy: immediateRetry{max: 2}, RequestTimeout: time.Minute}

		ok := newReceiver(t, nil)
		flaky := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) int {
			if n == 1 {
				return http.StatusInternalServerError
			}
			return http.StatusOK
		})
		broken := newReceiver(t, func(int, http.ResponseWriter, *http.Request) int { return http.StatusBadGateway })
		hangup := newReceiver(t, func(_ int, w http.ResponseWriter, _ *http.Request) int {
			if c, _, err := w.(http.Hijacker).Hijack(); err == nil {
				c.Close() // no response at all
			}
			return 0
		})
		release := make(chan struct{})
		var releaseOnce sync.Once
		releaseSlow := func() { releaseOnce.Do(func() { close(release) }) }
		arrived := make(chan struct{}, 1)
		slow := newReceiver(t, func(int, http.ResponseWriter, *http.Request) int {
			arrived <- struct{}{}
			<-release
			return http.StatusOK
		})
		t.Cleanup(releaseSlow) // before the receiver's server closes
		for tenant, rc := range map[string]*receiver{"ok": ok, "flaky": flaky, "broken": broken, "hangup": hangup, "slow": slow} {
			mustSubscribe(t, subs, rc, tenant, "order.placed")
		}

		// A first run: a success, a success on the retry after a 500, and
		// two deliveries that die after their second attempt (5xx, and no
		// response). The events occurred 10 s before they are delivered.
		d, stop := startDispatcher(t, db, cfg)
		var events []Event
		for _, tenant := range []string{"ok", "flaky", "broken", "hangup"} {
			events = append(events, Event{Type: "order.placed", Tenant: tenant, OccurredAt: clock.Now().Add(-10 * time.Second)})
		}
		publishTx(t, db, events...)
		d.Notify()
		ok.wait(1)
		flaky.wait(2)
		broken.wait(2)
		hangup.wait(2)
		stop() // records everything in flight
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state IN ('succeeded', 'dead')`); n != 4 {
			t.Fatalf("%d finished deliveries, want 4", n)
		}

		want := map[attemptKey]int64{
			{"succeeded", "2xx"}:    2,
			{"retrying", "5xx"}:     2,
			{"dead", "5xx"}:         1,
			{"retrying", "network"}: 1,
			{"dead", "network"}:     1,
		}
		m := collectMetrics(t, reader)
		if got := m.attempts(t); !maps.Equal(got, want) {
			t.Errorf("attempts after the first run: %v, want %v", got, want)
		}
		if got := m.durations(t); !maps.Equal(got, want) {
			t.Errorf("attempt durations after the first run: %v, want %v", got, want)
		}
		if n, sum := m.lag(t); n != 2 || sum != 20 {
			t.Errorf("lag: %d deliveries, %v s in all; want 2 and 20 s", n, sum)
		}
		if _, _, ok := m.gauges(t); ok {
			t.Errorf("pending gauges observed after Run returned")
		}

		// A second run, sharing the MeterProvider: one delivery hangs in
		// flight while the clock moves 42 s.
		d, stop = startDispatcher(t, db, cfg)
		publishTx(t, db, Event{Type: "order.placed", Tenant: "slow", OccurredAt: clock.Now().Add(-10 * time.Second)})
		d.Notify()
		select {
		case <-arrived:
		case <-time.After(60 * time.Second): // a hang guard
			t.Fatal("the slow delivery did not arrive")
		}
		clock.Advance(42 * time.Second)
		m = collectMetrics(t, reader)
		if n, age, ok := m.gauges(t); !ok || n != 1 || age != 42 {
			t.Errorf("gauges with one delivery in flight: %d pending, oldest %v s old (observed: %v); want 1 and 42 s", n, age, ok)
		}
		releaseSlow()
		slow.wait(1)
		stop()

		want[attemptKey{"succeeded", "2xx"}]++
		m = collectMetrics(t, reader)
		if got := m.attempts(t); !maps.Equal(got, want) {
			t.Errorf("attempts after the second run: %v, want %v", got, want)
		}
		if got := m.durations(t); !maps.Equal(got, want) {
			t.Errorf("attempt durations after the second run: %v, want %v", got, want)
		}
		if n, sum := m.lag(t); n != 3 || sum != 10+10+52 {
			t.Errorf("lag: %d deliveries, %v s in all; want 3 and 72 s", n, sum)
		}
	})
}

func TestMetricsPendingGauges(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		mp, reader := newTestMeterProvider(t)
		var logs bytes.Buffer
		var logMu sync.Mutex
		d, err := NewDispatcher(db, Config{Clock: clock, MeterProvider: mp,
			Logger: slog.New(slog.NewTextHandler(lockedLogWriter{&logMu, &logs}, nil))})
		if err != nil {
			t.Fatal(err)
		}
		unregister := d.registerGauges()

		if n, age, ok := collectMetrics(t, reader).gauges(t); !ok || n != 0 || age != 0 {
			t.Errorf("empty database: %d pending, oldest %v s (observed: %v); want 0 and 0", n, age, ok)
		}
		a, b := newReceiver(t, nil), newReceiver(t, nil)
		mustSubscribe(t, subs, a, "acme", "*")
		mustSubscribe(t, subs, b, "acme", "*")
		publishTx(t, db, Event{Type: "order.placed", Tenant: "acme"})
		if _, err := testExpand(context.Background(), d); err != nil {
			t.Fatal(err)
		}
		clock.Advance(90 * time.Second)
		publishTx(t, db, Event{Type: "order.placed", Tenant: "acme"})
		if _, err := testExpand(context.Background(), d); err != nil {
			t.Fatal(err)
		}
		clock.Advance(1500 * time.Millisecond)
		if n, age, ok := collectMetrics(t, reader).gauges(t); !ok || n != 4 || age != 91.5 {
			t.Errorf("four pending deliveries: %d pending, oldest %v s (observed: %v); want 4 and 91.5 s", n, age, ok)
		}
		// Finished deliveries do not count; retries (attempts > 0) do.
		if _, err := db.Exec(`UPDATE webhook_deliveries SET state = 'succeeded' WHERE created_at = (SELECT MIN(created_at) FROM webhook_deliveries)`); err != nil {
			t.Fatal(err)
		}
		if _, err := db.Exec(`UPDATE webhook_deliveries SET attempts = 2 WHERE id = (SELECT MIN(id) FROM webhook_deliveries WHERE state = 'pending')`); err != nil {
			t.Fatal(err)
		}
		if n, age, ok := collectMetrics(t, reader).gauges(t); !ok || n != 2 || age != 1.5 {
			t.Errorf("two pending deliveries: %d pending, oldest %v s (observed: %v); want 2 and 1.5 s", n, age, ok)
		}

		// A failing query is logged and observes nothing; the collection
		// goes on.
		db.Close()
		if _, _, ok := collectMetrics(t, reader).gauges(t); ok {
			t.Errorf("gauges observed although their query failed")
		}
		logMu.Lock()
		got := logs.String()
		logMu.Unlock()
		if !strings.Contains(got, "cannot read the pending deliveries") || !strings.Contains(got, "count pending deliveries") {
			t.Errorf("failed gauge query not logged; logs:\n%s", got)
		}

		unregister()
		if _, _, ok := collectMetrics(t, reader).gauges(t); ok {
			t.Errorf("gauges observed after unregistering")
		}
	})
}

func TestMetricsWithoutMeterProvider(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		good := newReceiver(t, nil)
		bad := newReceiver(t, func(int, http.ResponseWriter, *http.Request) int { return http.StatusInternalServerError })
		mustSubscribe(t, subs, good, "good", "*")
		mustSubscribe(t, subs, bad, "bad", "*")
		d, stop := startDispatcher(t, db, Config{RetryPolicy: immediateRetry{max: 2}})
		if d.metrics == nil {
			t.Fatal("dispatcher without MeterProvider has no metrics")
		}
		publishTx(t, db, Event{Type: "order.placed", Tenant: "good"}, Event{Type: "order.placed", Tenant: "bad"})
		d.Notify()
		good.wait(1)
		bad.wait(2)
		stop()
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'succeeded'`); n != 1 {
			t.Errorf("%d succeeded deliveries, want 1", n)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'dead'`); n != 1 {
			t.Errorf("%d dead deliveries, want 1", n)
		}
	})
}

func TestMetricsPayloadOccurredAt(t *testing.T) {
	at := time.Date(2025, 1, 2, 3, 4, 5, 123456789, time.UTC)
	for name, c := range map[string]struct {
		payload string
		ok      bool
	}{
		"envelope":           {string(buildPayload("evt_1", "order.placed", at, []byte(`{"n":1}`))), true},
		"timestamp in data":  {string(buildPayload("evt_1", "order.placed", at, []byte(`{"x":{"timestamp":"1999-01-01T00:00:00Z"}}`))), true},
		"no timestamp":       {`{"id":"evt_1","type":"a","data":{}}`, false},
		"unterminated":       {`{"id":"evt_1","type":"a","timestamp":"2025-01-02T03:04:05Z`, false},
		"malformed":          {`{"id":"evt_1","type":"a","timestamp":"yesterday","data":{}}`, false},
		"empty":              {``, false},
		"number, not string": {`{"id":"evt_1","type":"a","timestamp":1735787045,"data":{}}`, false},
	} {
		got, ok := payloadOccurredAt([]byte(c.payload))
		if ok != c.ok || ok && !got.Equal(at) {
			t.Errorf("%s: got %v, %v; want %v, %v", name, got, ok, at, c.ok)
		}
	}
}

func TestMetricsStatusClass(t *testing.T) {
	for status, want := range map[int]string{0: "network", 200: "2xx", 204: "2xx", 301: "3xx", 404: "4xx", 410: "4xx",
		500: "5xx", 599: "5xx", 101: "other", 600: "other", -1: "other"} {
		if got := statusClassNames[statusClassIndex(status)]; got != want {
			t.Errorf("status %d: class %q, want %q", status, got, want)
		}
	}
	for state, want := range map[DeliveryState]string{DeliverySucceeded: "succeeded", DeliveryPending: "retrying", DeliveryDead: "dead"} {
		if got := outcomeNames[outcomeIndex(state)]; got != want {
			t.Errorf("state %s: outcome %q, want %q", state, got, want)
		}
	}
}

// metricsBenchAttempt is a finished successful attempt to record.
func metricsBenchAttempt() (*result, outcome, time.Time) {
	now := time.Now()
	payload := buildPayload("evt_1", "order.placed", now.Add(-time.Second), []byte(`{"orderId":42}`))
	r := &result{job: &job{Payload: payload}, started: now, duration: 30 * time.Millisecond, status: 200}
	return r, outcome{state: DeliverySucceeded, nextAt: now.UnixMilli()}, now
}

func TestMetricsNoopAllocatesNothing(t *testing.T) {
	m := newDispatcherMetrics(nil, slog.Default())
	r, o, now := metricsBenchAttempt()
	fail := *r
	fail.status = 0
	if n := testing.AllocsPerRun(100, func() {
		m.attempt(r, o, now)
		m.attempt(&fail, outcome{state: DeliveryPending}, now)
	}); n != 0 {
		t.Errorf("recording without a MeterProvider allocates %v times per attempt, want 0", n)
	}
}

// BenchmarkMetricsNoop compares recording an attempt without a
// MeterProvider ("noop") with a nil check ("nil-check", what skipping
// metrics entirely would cost) and with the SDK ("sdk", for scale).
func BenchmarkMetricsNoop(b *testing.B) {
	r, o, now := metricsBenchAttempt()
	b.Run("nil-check", func(b *testing.B) {
		var m *dispatcherMetrics
		b.ReportAllocs()
		for b.Loop() {
			if m != nil {
				m.attempt(r, o, now)
			}
		}
	})
	b.Run("noop", func(b *testing.B) {
		m := newDispatcherMetrics(nil, slog.Default())
		b.ReportAllocs()
		for b.Loop() {
			m.attempt(r, o, now)
		}
	})
	b.Run("sdk", func(b *testing.B) {
		mp, _ := newTestMeterProvider(b)
		m := newDispatcherMetrics(mp, slog.Default())
		b.ReportAllocs()
		for b.Loop() {
			m.attempt(r, o, now)
		}
	})
}
