package webhooks

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jmoiron/sqlx"

	"github.com/outboxhook/webhooks/internal/dbtx"
	"github.com/outboxhook/webhooks/store"
)

// Limits on subscriptions.
const (
	MaxURLLength          = 2048
	MaxEventTypePatterns  = 100
	MaxDescriptionLength  = 1024
	MaxMetadataKeys       = 32
	MaxMetadataKeyLength  = 64
	MaxMetadataValueBytes = 512
	// ListLimitDefault and ListLimitMax bound a page of a List call.
	ListLimitDefault = 50
	ListLimitMax     = 500
)

// Subscription is an endpoint that receives the events of its tenant whose
// types match one of its EventTypes.
type Subscription struct {
	// ID is "sub_" followed by a UUIDv7; assigned by Create.
	ID string
	// Tenant owns the subscription; it receives only the tenant's events.
	Tenant string
	// URL is where deliveries are POSTed: absolute http or https, no
	// user information.
	URL string
	// EventTypes are the types to receive: exact names such as
	// "order.shipped", a trailing wildcard such as "order.*" (any type
	// below "order."), or "*" (everything).
	EventTypes []string
	// Secret is the signing secret: "whsec_" followed by the base64 of 24
	// to 64 bytes. Create generates one (32 bytes) when empty.
	Secret string
	// Description is free text for people, at most MaxDescriptionLength.
	Description string
	// Metadata is free key/value data for the application.
	Metadata map[string]string
	// Disabled subscriptions receive no new events, and their pending
	// deliveries wait until they are enabled again.
	Disabled bool
	// DisabledReason says why the subscription was disabled, for example
	// because its endpoint answered 410 Gone.
	DisabledReason string
	// Headers are static HTTP headers sent with every delivery, for
	// receivers that want a token of their own beside the signature: at
	// most MaxHeaders, names RFC 9110 tokens of at most MaxHeaderNameBytes,
	// values without control characters other than tab, MaxHeadersBytes
	// in all. Names are stored in canonical form (http.CanonicalHeaderKey).
	// Headers the library sets or that govern the connection cannot be
	// set: every "webhook-*" name, Content-Type, Content-Length,
	// Content-Encoding, Host, User-Agent, Accept-Encoding, Expect and the
	// hop-by-hop headers (Connection, Transfer-Encoding, ...).
	Headers map[string]string
	// RateLimit bounds the deliveries to this subscription, per second;
	// 0 means no limit.
	RateLimit float64
	// ConsecutiveFailures, FailingSince and LastSuccessAt describe the
	// endpoint's health as the dispatcher records it: the failed attempts
	// since the last success, when that run of failures began (zero while
	// healthy), and the last success (zero before the first). They are
	// read-only: Create and Update ignore them, and enabling a disabled
	// subscription resets the first two.
	ConsecutiveFailures int
	FailingSince        time.Time
	LastSuccessAt       time.Time
	// CreatedAt and UpdatedAt are set by the store.
	CreatedAt, UpdatedAt time.Time

	// previous holds secrets being rotated out, still signing until they
	// expire.
	previous []storedSecret
}

// storedSecret is one element of the secrets column.
type storedSecret struct {
	Secret    string `json:"secret"`
	ExpiresAt int64  `json:"expiresAt,omitempty"` // unix ms; 0: never
}

// SubscriptionUpdate changes some fields of a subscription; nil fields stay
// as they are.
type SubscriptionUpdate struct {
	URL         *string
	EventTypes  []string
	Description *string
	Metadata    map[string]string
	// Disabled set to false enables the subscription and clears its
	// DisabledReason; enabling a disabled subscription also resets its
	// health (ConsecutiveFailures and FailingSince). Set to true it
	// disables the subscription with DisabledReason (or "disabled by the
	// application" when that is nil).
	Disabled       *bool
	DisabledReason *string
	// Headers, when not nil, replaces the static headers (an empty map
	// removes them all).
	Headers map[string]string
	// RateLimit, when not nil, replaces the rate limit (0: none).
	RateLimit *float64
}

// ListOptions selects a page of a List call.
type ListOptions struct {
	// Limit is the page size: zero means ListLimitDefault; at most
	// ListLimitMax.
	Limit int
	// Cursor is the NextCursor of the previous page, empty for the first.
	Cursor string
}

// SubscriptionPage is one page of subscriptions, ordered by ID.
type SubscriptionPage struct {
	Subscriptions []Subscription
	// NextCursor continues the listing; empty on the last page.
	NextCursor string
}

// SubscriptionsConfig configures a Subscriptions store. The zero value works.
type SubscriptionsConfig struct {
	// Dialect of the database; empty detects it from the driver.
	Dialect Dialect
	// Clock sets CreatedAt and UpdatedAt. Nil means the system clock.
	Clock Clock
}

// Subscriptions manages subscriptions and reads their deliveries. Every
// method is scoped to a tenant: IDs of another tenant's subscriptions and
// deliveries are reported as ErrNotFound. It is safe for concurrent use.
type Subscriptions struct {
	db      *sqlx.DB
	dialect Dialect
	q       store.Queries
	ops     store.OpsQueries
	clock   Clock
}

// NewSubscriptions returns a subscription store over db, whose tables Migrate
// created.
func NewSubscriptions(db *sql.DB, cfg SubscriptionsConfig) (*Subscriptions, error) {
	d, err := detectDialect(db, cfg.Dialect)
	if err != nil {
		return nil, err
	}
	q, err := d.Queries()
	if err != nil {
		return nil, fmt.Errorf("webhooks: %w", err)
	}
	ops, err := d.OpsQueries()
	if err != nil {
		return nil, fmt.Errorf("webhooks: %w", err)
	}
	return &Subscriptions{db: sqlx.NewDb(db, driverName(d)), dialect: d, q: q, ops: ops, clock: clockOrSystem(cfg.Clock)}, nil
}

// subscriptionRow is the database form of a Subscription.
type subscriptionRow struct {
	ID             string        `db:"id"`
	Tenant         string        `db:"tenant"`
	URL            string        `db:"url"`
	EventTypes     string        `db:"event_types"`
	Secrets        string        `db:"secrets"`
	Description    string        `db:"description"`
	Metadata       string        `db:"metadata"`
	Enabled        bool          `db:"enabled"`
	DisabledReason string        `db:"disabled_reason"`
	CreatedAt      int64         `db:"created_at"`
	UpdatedAt      int64         `db:"updated_at"`
	Headers        string        `db:"headers"`
	RateLimit      float64       `db:"rate_limit"`
	Failures       int           `db:"consecutive_failures"`
	FailingSince   sql.NullInt64 `db:"failing_since"`
	LastSuccessAt  sql.NullInt64 `db:"last_success_at"`
}

// Create validates sub and stores it, enabled unless sub.Disabled. ID,
// CreatedAt and UpdatedAt are assigned; a missing Secret is generated. It
// returns the stored subscription, secret included.
func (s *Subscriptions) Create(ctx context.Context, sub Subscription) (Subscription, error) {
	return s.create(ctx, sub, 0)
}

// create is Create refusing with ErrSubscriptionLimit when the tenant
// already has limit subscriptions (0: no limit). The count and the insert
// happen in one transaction, serialized per tenant, so concurrent creates, in
// any number of processes, cannot pass the limit.
func (s *Subscriptions) create(ctx context.Context, sub Subscription, limit int) (Subscription, error) {
	if err := validateTenant(sub.Tenant); err != nil {
		return Subscription{}, fmt.Errorf("%w: %v", ErrInvalidSubscription, err)
	}
	if sub.Secret == "" {
		secret, err := NewSecret()
		if err != nil {
			return Subscription{}, err
		}
		sub.Secret = secret
	}
	if err := validateSubscription(&sub); err != nil {
		return Subscription{}, err
	}
	id, err := newID("sub_")
	if err != nil {
		return Subscription{}, err
	}
	now := s.clock.Now().UTC().Truncate(time.Millisecond)
	sub.ID, sub.CreatedAt, sub.UpdatedAt, sub.previous = id, now, now, nil
	sub.ConsecutiveFailures, sub.FailingSince, sub.LastSuccessAt = 0, time.Time{}, time.Time{}
	if sub.Disabled && sub.DisabledReason == "" {
		sub.DisabledReason = "disabled by the application"
	}
	r := toRow(&sub)
	err = dbtx.Run(ctx, s.db, s.dialect == DialectSQLite, func(tx dbtx.Tx) error {
		if limit > 0 {
			if s.q.LockTenantSubscriptions != "" {
				if _, err := tx.ExecContext(ctx, s.q.LockTenantSubscriptions, sub.Tenant); err != nil {
					return fmt.Errorf("webhooks: create subscription: %w", err)
				}
			}
			var n int
			if err := sqlx.GetContext(ctx, tx, &n, store.CountSubscriptions, sub.Tenant); err != nil {
				return fmt.Errorf("webhooks: create subscription: %w", err)
			}
			if n >= limit {
				return fmt.Errorf("%w: the tenant has %d subscriptions", ErrSubscriptionLimit, n)
			}
		}
		_, err := tx.ExecContext(ctx, store.InsertSubscriptionFull,
			r.ID, r.Tenant, r.URL, r.EventTypes, r.Secrets, r.Description, r.Metadata,
			r.Enabled, r.DisabledReason, r.CreatedAt, r.UpdatedAt, r.Headers, r.RateLimit)
		if err != nil {
			return fmt.Errorf("webhooks: create subscription: %w", err)
		}
		return nil
	})
	if err != nil {
		return Subscription{}, err
	}
	return sub, nil
}

// Get returns the tenant's subscription id.
func (s *Subscriptions) Get(ctx context.Context, tenant, id string) (Subscription, error) {
	return s.get(ctx, s.db, store.SelectSubscriptionFull, tenant, id)
}

func (s *Subscriptions) get(ctx context.Context, q sqlx.QueryerContext, query, tenant, id string) (Subscription, error) {
	var r subscriptionRow
	err := sqlx.GetContext(ctx, q, &r, query, tenant, id)
	if errors.Is(err, sql.ErrNoRows) {
		return Subscription{}, fmt.Errorf("%w: subscription %q", ErrNotFound, id)
	}
	if err != nil {
		return Subscription{}, fmt.Errorf("webhooks: get subscription %q: %w", id, err)
	}
	return fromRow(&r)
}

// List returns a page of the tenant's subscriptions, ordered by ID.
func (s *Subscriptions) List(ctx context.Context, tenant string, opts ListOptions) (SubscriptionPage, error) {
	limit, err := pageLimit(opts.Limit)
	if err != nil {
		return SubscriptionPage{}, err
	}
	var rows []subscriptionRow
	if err := sqlx.SelectContext(ctx, s.db, &rows, store.ListSubscriptionsFull, tenant, opts.Cursor, limit+1); err != nil {
		return SubscriptionPage{}, fmt.Errorf("webhooks: list subscriptions: %w", err)
	}
	var page SubscriptionPage
	if len(rows) > limit {
		rows = rows[:limit]
		page.NextCursor = rows[limit-1].ID
	}
	page.Subscriptions = make([]Subscription, 0, len(rows))
	for i := range rows {
		sub, err := fromRow(&rows[i])
		if err != nil {
			return SubscriptionPage{}, err
		}
		page.Subscriptions = append(page.Subscriptions, sub)
	}
	return page, nil
}

// Count returns how many subscriptions the tenant has.
func (s *Subscriptions) Count(ctx context.Context, tenant string) (int, error) {
	var n int
	if err := sqlx.GetContext(ctx, s.db, &n, store.CountSubscriptions, tenant); err != nil {
		return 0, fmt.Errorf("webhooks: count subscriptions: %w", err)
	}
	return n, nil
}

func pageLimit(limit int) (int, error) {
	switch {
	case limit == 0:
		return ListLimitDefault, nil
	case limit < 0 || limit > ListLimitMax:
		return 0, fmt.Errorf("%w: limit %d out of range 1..%d", ErrInvalidSubscription, limit, ListLimitMax)
	}
	return limit, nil
}

// Update applies u to the tenant's subscription id and returns the result.
func (s *Subscriptions) Update(ctx context.Context, tenant, id string, u SubscriptionUpdate) (Subscription, error) {
	return s.modify(ctx, tenant, id, func(sub *Subscription) error {
		if u.URL != nil {
			sub.URL = *u.URL
		}
		if u.EventTypes != nil {
			sub.EventTypes = u.EventTypes
		}
		if u.Description != nil {
			sub.Description = *u.Description
		}
		if u.Metadata != nil {
			sub.Metadata = u.Metadata
		}
		if u.Headers != nil {
			sub.Headers = u.Headers
		}
		if u.RateLimit != nil {
			sub.RateLimit = *u.RateLimit
		}
		if u.Disabled != nil {
			sub.Disabled = *u.Disabled
			switch {
			case !sub.Disabled:
				sub.DisabledReason = ""
			case u.DisabledReason != nil:
				sub.DisabledReason = *u.DisabledReason
			case sub.DisabledReason == "":
				sub.DisabledReason = "disabled by the application"
			}
		}
		return validateSubscription(sub)
	})
}

// RotateSecret makes newSecret (generated when empty) the subscription's
// signing secret. The current secret keeps signing beside it for grace, so
// receivers can switch without rejecting deliveries; with grace zero it stops
// at once. It returns the subscription with the new Secret.
func (s *Subscriptions) RotateSecret(ctx context.Context, tenant, id, newSecret string, grace time.Duration) (Subscription, error) {
	if newSecret == "" {
		var err error
		if newSecret, err = NewSecret(); err != nil {
			return Subscription{}, err
		}
	}
	if _, err := ParseSecret(newSecret); err != nil {
		return Subscription{}, fmt.Errorf("%w: %w", ErrInvalidSubscription, err)
	}
	if grace < 0 {
		return Subscription{}, fmt.Errorf("%w: negative grace period", ErrInvalidSubscription)
	}
	return s.modify(ctx, tenant, id, func(sub *Subscription) error {
		now := s.clock.Now()
		var keep []storedSecret
		for _, p := range sub.previous {
			if p.ExpiresAt > now.UnixMilli() {
				keep = append(keep, p)
			}
		}
		if grace > 0 {
			keep = append(keep, storedSecret{Secret: sub.Secret, ExpiresAt: now.Add(grace).UnixMilli()})
		}
		sub.Secret, sub.previous = newSecret, keep
		return nil
	})
}

// modify reads, changes and writes back one subscription in a transaction.
func (s *Subscriptions) modify(ctx context.Context, tenant, id string, change func(*Subscription) error) (Subscription, error) {
	var out Subscription
	err := dbtx.Run(ctx, s.db, s.dialect == DialectSQLite, func(tx dbtx.Tx) error {
		sub, err := s.get(ctx, tx, s.ops.SelectSubscriptionForUpdate, tenant, id)
		if err != nil {
			return err
		}
		wasDisabled := sub.Disabled
		if err := change(&sub); err != nil {
			return err
		}
		if wasDisabled && !sub.Disabled {
			// UpdateSubscriptionFull resets the stored health likewise.
			sub.ConsecutiveFailures, sub.FailingSince = 0, time.Time{}
		}
		sub.UpdatedAt = s.clock.Now().UTC().Truncate(time.Millisecond)
		if wasDisabled != sub.Disabled {
			// Disabled pauses the subscription's pending deliveries;
			// enabled sends them again.
			var err error
			if sub.Disabled {
				err = pauseDeliveries(ctx, tx, sub.ID, sub.UpdatedAt)
			} else {
				_, err = tx.ExecContext(ctx, store.ResumeDeliveries, sub.UpdatedAt.UnixMilli(), sub.ID)
			}
			if err != nil {
				return fmt.Errorf("webhooks: update subscription %q: %w", id, err)
			}
		}
		r := toRow(&sub)
		if _, err := tx.ExecContext(ctx, store.UpdateSubscriptionFull,
			r.URL, r.EventTypes, r.Secrets, r.Description, r.Metadata,
			r.Enabled, r.DisabledReason, r.Headers, r.RateLimit, r.UpdatedAt, r.Tenant, r.ID); err != nil {
			return fmt.Errorf("webhooks: update subscription %q: %w", id, err)
		}
		out = sub
		return nil
	})
	return out, err
}

// Delete removes the tenant's subscription id and cancels its pending
// deliveries; their history stays readable through Delivery.
func (s *Subscriptions) Delete(ctx context.Context, tenant, id string) error {
	return dbtx.Run(ctx, s.db, s.dialect == DialectSQLite, func(tx dbtx.Tx) error {
		res, err := tx.ExecContext(ctx, store.DeleteSubscription, tenant, id)
		if err != nil {
			return fmt.Errorf("webhooks: delete subscription %q: %w", id, err)
		}
		if n, err := res.RowsAffected(); err != nil {
			return fmt.Errorf("webhooks: delete subscription %q: %w", id, err)
		} else if n == 0 {
			return fmt.Errorf("%w: subscription %q", ErrNotFound, id)
		}
		if _, err := tx.ExecContext(ctx, store.CancelSubscriptionDeliveries, s.clock.Now().UnixMilli(), id); err != nil {
			return fmt.Errorf("webhooks: cancel deliveries of subscription %q: %w", id, err)
		}
		return nil
	})
}

func toRow(sub *Subscription) *subscriptionRow {
	types, _ := json.Marshal(sub.EventTypes)
	secrets, _ := json.Marshal(append([]storedSecret{{Secret: sub.Secret}}, sub.previous...))
	meta := []byte("{}")
	if len(sub.Metadata) > 0 {
		meta, _ = json.Marshal(sub.Metadata)
	}
	headers := []byte("{}")
	if len(sub.Headers) > 0 {
		headers, _ = json.Marshal(sub.Headers)
	}
	return &subscriptionRow{
		ID: sub.ID, Tenant: sub.Tenant, URL: sub.URL,
		EventTypes: string(types), Secrets: string(secrets),
		Description: sub.Description, Metadata: string(meta),
		Enabled: !sub.Disabled, DisabledReason: sub.DisabledReason,
		CreatedAt: sub.CreatedAt.UnixMilli(), UpdatedAt: sub.UpdatedAt.UnixMilli(),
		Headers: string(headers), RateLimit: sub.RateLimit,
	}
}

func fromRow(r *subscriptionRow) (Subscription, error) {
	sub := Subscription{
		ID: r.ID, Tenant: r.Tenant, URL: r.URL, Description: r.Description,
		Disabled: !r.Enabled, DisabledReason: r.DisabledReason,
		CreatedAt: fromMilli(r.CreatedAt), UpdatedAt: fromMilli(r.UpdatedAt),
		RateLimit: r.RateLimit, ConsecutiveFailures: r.Failures,
	}
	if r.FailingSince.Valid {
		sub.FailingSince = fromMilli(r.FailingSince.Int64)
	}
	if r.LastSuccessAt.Valid {
		sub.LastSuccessAt = fromMilli(r.LastSuccessAt.Int64)
	}
	var secrets []storedSecret
	if err := json.Unmarshal([]byte(r.EventTypes), &sub.EventTypes); err != nil {
		return Subscription{}, fmt.Errorf("webhooks: subscription %q: stored event types: %w", r.ID, err)
	}
	if err := json.Unmarshal([]byte(r.Secrets), &secrets); err != nil || len(secrets) == 0 {
		return Subscription{}, fmt.Errorf("webhooks: subscription %q: stored secrets are malformed", r.ID)
	}
	sub.Secret, sub.previous = secrets[0].Secret, secrets[1:]
	if err := json.Unmarshal([]byte(r.Metadata), &sub.Metadata); err != nil {
		return Subscription{}, fmt.Errorf("webhooks: subscription %q: stored metadata: %w", r.ID, err)
	}
	if err := json.Unmarshal([]byte(r.Headers), &sub.Headers); err != nil {
		return Subscription{}, fmt.Errorf("webhooks: subscription %q: stored headers: %w", r.ID, err)
	}
	return sub, nil
}

// validateSubscription checks the fields a caller sets.
func validateSubscription(sub *Subscription) error {
	if err := validateURL(sub.URL); err != nil {
		return err
	}
	if len(sub.EventTypes) == 0 {
		return fmt.Errorf("%w: at least one event type is required", ErrInvalidSubscription)
	}
	if len(sub.EventTypes) > MaxEventTypePatterns {
		return fmt.Errorf("%w: %d event types; at most %d", ErrInvalidSubscription, len(sub.EventTypes), MaxEventTypePatterns)
	}
	for _, p := range sub.EventTypes {
		if err := validatePattern(p); err != nil {
			return err
		}
	}
	if _, err := ParseSecret(sub.Secret); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidSubscription, err)
	}
	if utf8.RuneCountInString(sub.Description) > MaxDescriptionLength || !utf8.ValidString(sub.Description) {
		return fmt.Errorf("%w: description must be valid UTF-8 of at most %d characters", ErrInvalidSubscription, MaxDescriptionLength)
	}
	if len(sub.Metadata) > MaxMetadataKeys {
		return fmt.Errorf("%w: %d metadata keys; at most %d", ErrInvalidSubscription, len(sub.Metadata), MaxMetadataKeys)
	}
	for k, v := range sub.Metadata {
		if k == "" || len(k) > MaxMetadataKeyLength || !utf8.ValidString(k) {
			return fmt.Errorf("%w: metadata keys must be 1 to %d bytes of UTF-8", ErrInvalidSubscription, MaxMetadataKeyLength)
		}
		if len(v) > MaxMetadataValueBytes || !utf8.ValidString(v) {
			return fmt.Errorf("%w: metadata value of %q must be at most %d bytes of UTF-8", ErrInvalidSubscription, k, MaxMetadataValueBytes)
		}
	}
	if d := checkRateLimit(sub.RateLimit); d != "" {
		return fmt.Errorf("%w: rate limit %s", ErrInvalidSubscription, d)
	}
	headers, problems := canonicalHeaders(sub.Headers)
	if len(problems) > 0 {
		return fmt.Errorf("%w: %s", ErrInvalidSubscription, problems[0])
	}
	sub.Headers = headers
	return nil
}

// validateURL accepts absolute http and https URLs with a host and without
// user information.
func validateURL(raw string) error {
	if raw == "" {
		return fmt.Errorf("%w: URL is required", ErrInvalidSubscription)
	}
	if len(raw) > MaxURLLength {
		return fmt.Errorf("%w: URL is %d bytes long; at most %d", ErrInvalidSubscription, len(raw), MaxURLLength)
	}
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("%w: URL does not parse", ErrInvalidSubscription)
	}
	if u.Scheme != "https" && u.Scheme != "http" {
		return fmt.Errorf("%w: URL scheme must be https or http", ErrInvalidSubscription)
	}
	if u.Host == "" || u.Hostname() == "" {
		return fmt.Errorf("%w: URL has no host", ErrInvalidSubscription)
	}
	if u.User != nil {
		return fmt.Errorf("%w: URL must not contain user information", ErrInvalidSubscription)
	}
	return nil
}

// validatePattern checks an event type pattern: "*", an event type, or an
// event type prefix followed by ".*".
func validatePattern(p string) error {
	if p == "*" {
		return nil
	}
	t := strings.TrimSuffix(p, ".*")
	if err := validateEventType(t); err != nil {
		return fmt.Errorf("%w: event type pattern %q: want an event type, a prefix ending in \".*\", or \"*\"", ErrInvalidSubscription, p)
	}
	return nil
}

// matchesAny reports whether eventType matches one of the patterns.
func matchesAny(patterns []string, eventType string) bool {
	for _, p := range patterns {
		if matchPattern(p, eventType) {
			return true
		}
	}
	return false
}

// matchPattern: "*" matches everything, "a.*" matches every type that
// starts with "a.", anything else matches exactly.
func matchPattern(pattern, eventType string) bool {
	if pattern == "*" {
		return true
	}
	if prefix, ok := strings.CutSuffix(pattern, "*"); ok {
		return len(eventType) > len(prefix) && strings.HasPrefix(eventType, prefix)
	}
	return pattern == eventType
}
