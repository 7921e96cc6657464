package webhooks

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"

	"github.com/outboxhook/webhooks/store"
)

// The dispatcher's metrics, through the OpenTelemetry metric API. Set
// Config.MeterProvider to an SDK MeterProvider to collect them; without one
// every instrument is a no-op and recording costs a few interface calls, no
// allocation.
//
// Attributes are deliberately few and bounded: the outcome and the response
// status class. Tenants, subscription IDs, URLs, event IDs and event types
// are unbounded sets and are never attributes.
//
// The pending gauges are database-wide: every dispatcher sharing a database
// reports the same values, so aggregate them across replicas with max (or
// avg), never sum.

// Names of the dispatcher's instruments.
const (
	// MetricDeliveryAttempts counts finished delivery attempts (unit
	// {attempt}), by AttrOutcome and AttrStatusClass.
	MetricDeliveryAttempts = "webhooks.delivery.attempts"
	// MetricAttemptDuration is a histogram of attempt durations in seconds,
	// from signing the request to having read the response (its recorded
	// excerpt), by AttrOutcome and AttrStatusClass.
	MetricAttemptDuration = "webhooks.delivery.attempt.duration"
	// MetricDeliveryLag is a histogram of the seconds from an event's
	// OccurredAt (the payload's "timestamp") to the successful delivery of
	// it, retries included, measured by the dispatcher's Clock.
	MetricDeliveryLag = "webhooks.delivery.lag"
	// MetricPendingDeliveries is a gauge of the deliveries not finished yet
	// (states pending and delivering) in the whole database, plus, on
	// SQLite, those the reporting dispatcher started straight from the
	// outbox and has not recorded yet (see Dispatcher).
	MetricPendingDeliveries = "webhooks.deliveries.pending"
	// MetricOldestPendingAge is a gauge of the age in seconds of the oldest
	// unfinished delivery (since its creation, by the dispatcher's Clock),
	// 0 when there is none. A delivery waiting for a late retry counts as
	// old.
	MetricOldestPendingAge = "webhooks.deliveries.pending.oldest_age"
)

// Attributes of MetricDeliveryAttempts and MetricAttemptDuration.
const (
	// AttrOutcome is what an attempt led to: "succeeded", "retrying" (it
	// failed and will be retried) or "dead" (it failed and the retry policy
	// gave up).
	AttrOutcome = "webhooks.outcome"
	// AttrStatusClass is the class of the response status: "2xx", "3xx",
	// "4xx", "5xx", "network" (no response: a transport error or timeout,
	// or the request could not be made) or "other".
	AttrStatusClass = "webhooks.status_class"
)

// meterName is the instrumentation scope of the dispatcher's instruments.
const meterName = "github.com/outboxhook/webhooks"

// gaugeQueryTimeout bounds the query behind the pending gauges.
const gaugeQueryTimeout = 5 * time.Second

var (
	outcomeNames     = [...]string{"succeeded", "retrying", "dead"}
	statusClassNames = [...]string{"2xx", "3xx", "4xx", "5xx", "network", "other"}
)

// attemptOptions are the precomputed measurement options of one
// (outcome, status class) pair, so recording allocates nothing.
type attemptOptions struct {
	add    []metric.AddOption
	record []metric.RecordOption
}

// dispatcherMetrics holds the dispatcher's instruments.
type dispatcherMetrics struct {
	meter    metric.Meter
	attempts metric.Int64Counter
	duration metric.Float64Histogram
	lag      metric.Float64Histogram
	pending  metric.Int64ObservableGauge
	oldest   metric.Float64ObservableGauge
	opts     [len(outcomeNames)][len(statusClassNames)]attemptOptions
}

// newDispatcherMetrics creates the instruments on mp (nil: no-op). An
// instrument the provider fails to create is logged and replaced by a no-op
// one: metrics never stop deliveries.
func newDispatcherMetrics(mp metric.MeterProvider, log *slog.Logger) *dispatcherMetrics {
	if mp == nil {
		mp = noop.NewMeterProvider()
	}
	m := &dispatcherMetrics{meter: mp.Meter(meterName)}
	warn := func(name string, err error) bool {
		if err != nil {
			log.Warn("webhooks: metrics: cannot create instrument", slog.String("instrument", name), slog.Any("error", err))
		}
		return err != nil
	}
	var np noop.Meter // stands in for an instrument the provider failed to create
	var err error
	m.attempts, err = m.meter.Int64Counter(MetricDeliveryAttempts, metric.WithUnit("{attempt}"),
		metric.WithDescription("Finished webhook delivery attempts, by outcome and response status class."))
	if warn(MetricDeliveryAttempts, err) || m.attempts == nil {
		m.attempts, _ = np.Int64Counter(MetricDeliveryAttempts)
	}
	m.duration, err = m.meter.Float64Histogram(MetricAttemptDuration, metric.WithUnit("s"),
		metric.WithDescription("Duration of webhook delivery attempts, by outcome and response status class."),
		metric.WithExplicitBucketBoundaries(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60))
	if warn(MetricAttemptDuration, err) || m.duration == nil {
		m.duration, _ = np.Float64Histogram(MetricAttemptDuration)
	}
	m.lag, err = m.meter.Float64Histogram(MetricDeliveryLag, metric.WithUnit("s"),
		metric.WithDescription("Time from an event's occurrence to its successful delivery, retries included."),
		metric.WithExplicitBucketBoundaries(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 7200, 21600, 43200, 86400))
	if warn(MetricDeliveryLag, err) || m.lag == nil {
		m.lag, _ = np.Float64Histogram(MetricDeliveryLag)
	}
	m.pending, err = m.meter.Int64ObservableGauge(MetricPendingDeliveries, metric.WithUnit("{delivery}"),
		metric.WithDescription("Unfinished webhook deliveries (pending or delivering) in the database; the same for every dispatcher sharing it."))
	if warn(MetricPendingDeliveries, err) || m.pending == nil {
		m.pending, _ = np.Int64ObservableGauge(MetricPendingDeliveries)
	}
	m.oldest, err = m.meter.Float64ObservableGauge(MetricOldestPendingAge, metric.WithUnit("s"),
		metric.WithDescription("Age of the oldest unfinished webhook delivery in the database (0: none); the same for every dispatcher sharing it."))
	if warn(MetricOldestPendingAge, err) || m.oldest == nil {
		m.oldest, _ = np.Float64ObservableGauge(MetricOldestPendingAge)
	}
	for o, on := range outcomeNames {
		for c, cn := range statusClassNames {
			set := metric.WithAttributeSet(attribute.NewSet(attribute.String(AttrOutcome, on), attribute.String(AttrStatusClass, cn)))
			m.opts[o][c] = attemptOptions{add: []metric.AddOption{set}, record: []metric.RecordOption{set}}
		}
	}
	return m
}

// attempt records one finished attempt whose consequence is o, decided at
// now (the dispatcher's clock).
func (m *dispatcherMetrics) attempt(r *result, o outcome, now time.Time) {
	ctx := context.Background()
	opts := &m.opts[outcomeIndex(o.state)][statusClassIndex(r.status)]
	m.attempts.Add(ctx, 1, opts.add...)
	m.duration.Record(ctx, r.duration.Seconds(), opts.record...)
	// The event's time is read from the payload only when someone listens.
	if o.state == DeliverySucceeded && m.lag.Enabled(ctx) {
		if at, ok := payloadOccurredAt(r.job.Payload); ok {
			m.lag.Record(ctx, max(0, now.Sub(at).Seconds()))
		}
	}
}

func outcomeIndex(s DeliveryState) int {
	switch s {
	case DeliverySucceeded:
		return 0
	case DeliveryPending:
		return 1
	default:
		return 2
	}
}

func statusClassIndex(status int) int {
	switch {
	case status == 0:
		return 4
	case status >= 200 && status < 600:
		return status/100 - 2
	default:
		return 5
	}
}

// payloadOccurredAt reads the "timestamp" of a Standard Webhooks envelope as
// buildPayload writes it, without decoding the JSON: the id and type before
// it contain no quotes, so the first `"timestamp":"` is the envelope's.
func payloadOccurredAt(payload []byte) (time.Time, bool) {
	const key = `"timestamp":"`
	i := bytes.Index(payload, []byte(key))
	if i < 0 {
		return time.Time{}, false
	}
	rest := payload[i+len(key):]
	j := bytes.IndexByte(rest, '"')
	if j < 0 {
		return time.Time{}, false
	}
	t, err := time.Parse(time.RFC3339Nano, string(rest[:j]))
	if err != nil {
		return time.Time{}, false
	}
	return t, true
}

// registerGauges starts observing the pending gauges, one database query
// per collection, and returns the function that stops it. Run observes
// while it runs.
func (d *Dispatcher) registerGauges() (unregister func()) {
	m := d.metrics
	reg, err := m.meter.RegisterCallback(d.observePending, m.pending, m.oldest)
	if err != nil || reg == nil {
		if err != nil {
			d.log.Warn("webhooks: metrics: cannot register the pending gauges", slog.Any("error", err))
		}
		return func() {}
	}
	return func() {
		if err := reg.Unregister(); err != nil {
			d.log.Warn("webhooks: metrics: cannot unregister the pending gauges", slog.Any("error", err))
		}
	}
}

// observePending is the pending gauges' callback. A failed query is logged
// and observes nothing; it never fails the collection.
func (d *Dispatcher) observePending(ctx context.Context, o metric.Observer) error {
	n, oldest, err := d.pendingStats(ctx)
	if err != nil {
		d.log.Warn("webhooks: metrics: cannot read the pending deliveries", slog.Any("error", err))
		return nil
	}
	age := 0.0
	if oldest.Valid {
		age = max(0, float64(d.clock.Now().UnixMilli()-oldest.Int64)/1000)
	}
	o.ObserveInt64(d.metrics.pending, n)
	o.ObserveFloat64(d.metrics.oldest, age)
	return nil
}

// pendingStats counts the unfinished deliveries and finds the oldest one's
// created_at (NULL when there is none).
func (d *Dispatcher) pendingStats(ctx context.Context) (int64, sql.NullInt64, error) {
	ctx, cancel := context.WithTimeout(ctx, gaugeQueryTimeout)
	defer cancel()
	var n int64
	var oldest sql.NullInt64
	if err := d.db.QueryRowContext(ctx, store.SelectPendingStats).Scan(&n, &oldest); err != nil {
		return 0, sql.NullInt64{}, fmt.Errorf("webhooks: count pending deliveries: %w", err)
	}
	// With direct expansion, the deliveries of the events this dispatcher
	// holds are not rows yet.
	n += d.heldDeliveries.Load()
	if at := d.heldOldest.Load(); at > 0 && (!oldest.Valid || at < oldest.Int64) {
		oldest = sql.NullInt64{Int64: at, Valid: true}
	}
	return n, oldest, nil
}
