package webhooks

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"time"

	"go.opentelemetry.io/otel/metric"
)

// Defaults of Config.
const (
	PollIntervalDefault               = 100 * time.Millisecond
	BatchSizeDefault                  = 100
	ConcurrencyDefault                = 32
	MaxInFlightPerSubscriptionDefault = 8
	RequestTimeoutDefault             = 15 * time.Second
	// LeaseMarginDefault is how much longer than RequestTimeout a claim
	// lasts by default, so a healthy in-flight delivery is never claimed
	// (and sent) a second time while it runs.
	LeaseMarginDefault = 30 * time.Second
	UserAgentDefault   = "outboxhook/1 (+https://github.com/outboxhook/webhooks)"
	// ResponseExcerptBytes is how much of each response body is recorded.
	ResponseExcerptBytes = 4 << 10
)

// Config configures a Dispatcher. The zero value works; zero fields take the
// …Default constants.
type Config struct {
	// Dialect of the database; empty detects it from the driver.
	Dialect Dialect
	// PollInterval is how often the dispatcher looks for new events and due
	// deliveries when it has not been woken by Notify.
	PollInterval time.Duration
	// BatchSize is how many events one expansion step reads.
	BatchSize int
	// Concurrency bounds the deliveries in flight at once.
	Concurrency int
	// MaxInFlightPerSubscription bounds the deliveries in flight to one
	// subscription, so a slow or dead endpoint cannot take every slot.
	MaxInFlightPerSubscription int
	// RequestTimeout bounds one delivery attempt, response body included.
	RequestTimeout time.Duration
	// LeaseDuration is how long a claimed delivery stays claimed; if the
	// dispatcher dies, the delivery becomes due again when it ends. It must
	// exceed RequestTimeout. Zero means RequestTimeout + LeaseMarginDefault.
	// On SQLite the outbox lease of direct expansion (see Dispatcher) lasts
	// the shorter of LeaseDuration and RequestTimeout + 5s.
	LeaseDuration time.Duration
	// RetryPolicy decides when failed attempts are retried. Nil means
	// ExponentialBackoff{}.
	RetryPolicy RetryPolicy
	// UserAgent is sent with every delivery. Empty means UserAgentDefault.
	UserAgent string
	// Logger receives the dispatcher's logs. Nil means slog.Default().
	Logger *slog.Logger
	// AllowedNetworks lists the otherwise forbidden address ranges the
	// default HTTP client may connect to. By default it refuses, at dial
	// time and on the resolved address (so DNS rebinding cannot pass),
	// loopback, private, link-local (cloud metadata included), CGNAT,
	// multicast, unspecified and reserved addresses: a tenant's callback URL
	// must not reach into the service's own network. Add e.g.
	// netip.MustParsePrefix("127.0.0.0/8") for local receivers in tests, or
	// your private ranges when webhooks go to internal services.
	AllowedNetworks []netip.Prefix
	// HTTPClient sends the deliveries. Nil means a client with a transport
	// sized for Concurrency that enforces AllowedNetworks and uses no proxy.
	// A client you provide is used as it is: give its dialer
	// DialControl(allowed) to keep the protection. Redirects are never
	// followed (a 3xx answer is a failed attempt), whatever the client's
	// CheckRedirect says.
	HTTPClient *http.Client
	// Clock tells the time for scheduling, leases and signatures. Nil means
	// the system clock.
	Clock Clock

	// Retention of delivery history: the cleaner (retention.go).

	// Retention is how long succeeded and canceled deliveries (with their
	// attempts) and expanded events are kept: a delivery counts from its
	// last update, an event from its expansion, and an event goes only
	// once it has no delivery left (pending, delivering and dead deliveries
	// keep theirs). Zero means RetentionDefault; negative (RetentionForever)
	// keeps everything and runs no cleaner.
	Retention time.Duration
	// DeadRetention is how long dead deliveries (with their attempts) are
	// kept, counted from their last update. It must not be shorter than
	// Retention. Zero means DeadRetentionDefault, or Retention when that is
	// longer; negative (RetentionForever) keeps dead deliveries forever.
	DeadRetention time.Duration
	// CleanupInterval is how often the cleaner deletes expired rows. Zero
	// means CleanupIntervalDefault.
	CleanupInterval time.Duration
	// CleanupBatchSize is how many rows the cleaner deletes per
	// transaction; it pauses between transactions, so deliveries are never
	// held up long. Zero means CleanupBatchSizeDefault.
	CleanupBatchSize int

	// Metrics (metrics.go).

	// MeterProvider receives the dispatcher's OpenTelemetry metrics:
	// attempts by outcome and status class, attempt durations, delivery lag
	// and the database's pending deliveries (the Metric… constants). Nil
	// means no-op: nothing is measured.
	MeterProvider metric.MeterProvider

	// Endpoint health and operational events (dispatcher_health.go).

	// DisableAfter disables a subscription whose attempts have all failed,
	// without a single success, for this long, once at least
	// DisableMinFailures attempts in a row failed. Its deliveries are kept
	// (paused, never dropped) and go out when it is enabled again. Zero
	// means DisableAfterDefault; negative never disables automatically.
	DisableAfter time.Duration
	// DisableMinFailures is the least number of failed attempts in a row
	// before DisableAfter applies. Zero means DisableMinFailuresDefault.
	DisableMinFailures int
	// FailingAfterAttempts is after how many failed attempts of one
	// delivery a delivery.failing operational event is raised. Zero means
	// FailingAfterAttemptsDefault.
	FailingAfterAttempts int
	// OnOperationalEvent, when set, receives every operational event
	// (subscription.disabled, delivery.failing, delivery.exhausted) once
	// the transaction that recorded it has committed. It runs on the
	// dispatcher's loop: it must return quickly and must not block.
	OnOperationalEvent func(context.Context, OperationalEvent)
	// PublishOperationalEvents also publishes every operational event as
	// an event (its Type, with the OperationalEvent as Data) of tenant
	// OperationalTenant, in the transaction that records it, so the
	// application's own subscriptions receive them like any other event.
	// Operational events about OperationalTenant's own subscriptions are
	// not published, so a failing receiver of them cannot feed itself.
	PublishOperationalEvents bool
	// OperationalTenant is the tenant of published operational events.
	OperationalTenant string
}

// Defaults of Config's health fields.
const (
	DisableAfterDefault         = 5 * 24 * time.Hour
	DisableMinFailuresDefault   = 10
	FailingAfterAttemptsDefault = 3
)

// Defaults of Config's retention fields.
const (
	RetentionDefault        = 30 * 24 * time.Hour
	DeadRetentionDefault    = 90 * 24 * time.Hour
	CleanupIntervalDefault  = time.Minute
	CleanupBatchSizeDefault = 500
	// RetentionForever, as Config.Retention, keeps all history and turns
	// the cleaner off; as Config.DeadRetention, it keeps dead deliveries
	// forever.
	RetentionForever time.Duration = -1
)

func (c *Config) setDefaults() error {
	type check struct {
		bad bool
		msg string
	}
	for _, ch := range []check{
		{c.PollInterval < 0, "negative PollInterval"},
		{c.BatchSize < 0, "negative BatchSize"},
		{c.Concurrency < 0, "negative Concurrency"},
		{c.MaxInFlightPerSubscription < 0, "negative MaxInFlightPerSubscription"},
		{c.RequestTimeout < 0, "negative RequestTimeout"},
		{c.LeaseDuration < 0, "negative LeaseDuration"},
		{c.DisableMinFailures < 0, "negative DisableMinFailures"},
		{c.FailingAfterAttempts < 0, "negative FailingAfterAttempts"},
	} {
		if ch.bad {
			return fmt.Errorf("%w: %s", ErrInvalidConfig, ch.msg)
		}
	}
	setDefault(&c.PollInterval, PollIntervalDefault)
	setDefault(&c.BatchSize, BatchSizeDefault)
	setDefault(&c.Concurrency, ConcurrencyDefault)
	setDefault(&c.MaxInFlightPerSubscription, MaxInFlightPerSubscriptionDefault)
	setDefault(&c.RequestTimeout, RequestTimeoutDefault)
	setDefault(&c.LeaseDuration, c.RequestTimeout+LeaseMarginDefault)
	setDefault(&c.UserAgent, UserAgentDefault)
	setDefault(&c.DisableAfter, DisableAfterDefault)
	setDefault(&c.DisableMinFailures, DisableMinFailuresDefault)
	setDefault(&c.FailingAfterAttempts, FailingAfterAttemptsDefault)
	if c.LeaseDuration <= c.RequestTimeout {
		return fmt.Errorf("%w: LeaseDuration %v must exceed RequestTimeout %v, or a delivery still in flight could be sent twice at once",
			ErrInvalidConfig, c.LeaseDuration, c.RequestTimeout)
	}
	if c.RetryPolicy == nil {
		c.RetryPolicy = ExponentialBackoff{}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.PublishOperationalEvents {
		if err := validateTenant(c.OperationalTenant); err != nil {
			return fmt.Errorf("%w: OperationalTenant: %w", ErrInvalidConfig, err)
		}
	}
	if err := c.setRetentionDefaults(); err != nil {
		return err
	}
	return nil
}

func setDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}
