package webhooks

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/outboxhook/webhooks/internal/ssrf"
)

// Defaults and limits of the subscription management handler.
const (
	// MaxSubscriptionsPerTenantDefault is HandlerConfig.MaxSubscriptionsPerTenant
	// when it is zero.
	MaxSubscriptionsPerTenantDefault = 100
	// SecretGracePeriodDefault is HandlerConfig.SecretGracePeriod when it is
	// zero: how long the previous secret keeps signing after a rotation.
	SecretGracePeriodDefault = 24 * time.Hour
	// WWWAuthenticateDefault is HandlerConfig.WWWAuthenticate when it is
	// empty.
	WWWAuthenticateDefault = "Bearer"
	// HandlerMaxBodyBytes bounds a request body; larger ones get 413.
	HandlerMaxBodyBytes = 64 << 10
)

// resolveTimeout bounds the DNS lookups of a callback URL's host.
const resolveTimeout = 5 * time.Second

// Resolver looks up the addresses of a host name. *net.Resolver implements
// it; tests can supply fixed answers.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// EventTypeInfo describes one event type of the application's catalog.
type EventTypeInfo struct {
	// Name is the event type, e.g. "order.shipped".
	Name string
	// Description tells subscribers what the event means and when it is
	// sent.
	Description string
}

// HandlerConfig configures NewHandler. Apart from Authenticate, the zero
// value of every field is a safe default.
type HandlerConfig struct {
	// Authenticate identifies the caller of every request and returns the
	// tenant whose subscriptions it may manage (any UTF-8 text without
	// control characters, at most MaxTenantLength bytes). An error answers
	// 401 without calling anything else; the error itself is logged at
	// debug level and never sent to the client. Required, unless
	// UnsafeNoAuthSingleTenant is set.
	Authenticate func(r *http.Request) (tenant string, err error)
	// UnsafeNoAuthSingleTenant, when Authenticate is nil, serves every
	// request WITHOUT AUTHENTICATION as the tenant "". It is dangerous:
	// anyone who can reach the handler can read and change every
	// subscription and register URLs the server will call. Use it only
	// behind your own authentication middleware, or in tests.
	UnsafeNoAuthSingleTenant bool
	// EventTypes is the catalog of event types the application publishes,
	// listed by GET /event-types. When it is not empty, a subscription to a
	// type or pattern that matches none of its names is refused.
	EventTypes []EventTypeInfo
	// AllowHTTP accepts plain http callback URLs. By default only https is
	// accepted.
	AllowHTTP bool
	// AllowedNetworks are networks callback URLs may point to even though
	// they are not public: by default loopback, private, link-local, CGNAT,
	// multicast and reserved addresses are refused. Tests use 127.0.0.0/8.
	// Use the same list for the dispatcher's dial-time check.
	AllowedNetworks []netip.Prefix
	// MaxSubscriptionsPerTenant bounds how many subscriptions one tenant
	// may have; creating one more answers 409. Zero means
	// MaxSubscriptionsPerTenantDefault. The limit holds exactly, also
	// across processes sharing the database.
	MaxSubscriptionsPerTenant int
	// SecretGracePeriod is how long the previous secret keeps signing
	// beside the new one after POST .../rotate-secret. Zero means
	// SecretGracePeriodDefault; a negative value means no grace period
	// (the old secret stops at once).
	SecretGracePeriod time.Duration
	// Resolver resolves callback URL host names when a subscription is
	// created or its URL changed; every address must be allowed. Nil means
	// net.DefaultResolver.
	Resolver Resolver
	// Logger receives the handler's logs (never a secret). Nil means
	// slog.Default().
	Logger *slog.Logger
	// Notify, when set, is called after deliveries were queued by the
	// test, retry and replay routes, so a dispatcher in the same process
	// can start at once; pass the dispatcher's Notify method. It must not
	// block.
	Notify func()
	// WWWAuthenticate is the WWW-Authenticate header of 401 answers. Empty
	// means WWWAuthenticateDefault.
	WWWAuthenticate string
}

// handler serves the subscription management API.
type handler struct {
	subs     *Subscriptions
	cfg      HandlerConfig // defaults applied
	policy   ssrf.Policy
	resolver ssrf.Resolver
	log      *slog.Logger
	catalog  []EventTypeInfo
	mux      *http.ServeMux
}

// route is one operation of the API.
type route struct {
	method, pattern string
	serve           func(h *handler, w http.ResponseWriter, r *http.Request, tenant string)
}

// handlerRoutes lists every operation; openapi.yaml describes exactly these.
var handlerRoutes = []route{
	{"GET", "/webhook-subscriptions", (*handler).listSubscriptions},
	{"POST", "/webhook-subscriptions", (*handler).createSubscription},
	{"GET", "/webhook-subscriptions/{subscriptionId}", (*handler).getSubscription},
	{"PATCH", "/webhook-subscriptions/{subscriptionId}", (*handler).updateSubscription},
	{"DELETE", "/webhook-subscriptions/{subscriptionId}", (*handler).deleteSubscription},
	{"POST", "/webhook-subscriptions/{subscriptionId}/rotate-secret", (*handler).rotateSecret},
	{"GET", "/webhook-subscriptions/{subscriptionId}/deliveries", (*handler).listDeliveries},
	{"POST", "/webhook-subscriptions/{subscriptionId}/deliveries/{deliveryId}/retry", (*handler).retryDelivery},
	{"POST", "/webhook-subscriptions/{subscriptionId}/test", (*handler).sendTest},
	{"POST", "/webhook-subscriptions/{subscriptionId}/replay", (*handler).replay},
	{"GET", "/event-types", (*handler).listEventTypes},
}

// NewHandler returns the subscription management API over subs: an
// http.Handler that lets each tenant, as identified by cfg.Authenticate,
// manage its own webhook subscriptions and read their deliveries. Its routes
// (described by openapi.yaml in this module) are relative to where it is
// mounted; use http.StripPrefix to mount it under a prefix:
//
//	GET    /webhook-subscriptions?limit=&cursor=
//	POST   /webhook-subscriptions
//	GET    /webhook-subscriptions/{subscriptionId}
//	PATCH  /webhook-subscriptions/{subscriptionId}
//	DELETE /webhook-subscriptions/{subscriptionId}
//	POST   /webhook-subscriptions/{subscriptionId}/rotate-secret
//	GET    /webhook-subscriptions/{subscriptionId}/deliveries?status=&limit=&cursor=
//	POST   /webhook-subscriptions/{subscriptionId}/deliveries/{deliveryId}/retry
//	POST   /webhook-subscriptions/{subscriptionId}/test
//	POST   /webhook-subscriptions/{subscriptionId}/replay
//	GET    /event-types
//
// Errors are RFC 9457 problem documents (application/problem+json) whose
// "type" is a stable URI below https://github.com/outboxhook/webhooks/problems/.
// Other tenants' IDs answer 404, exactly like IDs that do not exist.
//
// Callback URLs must be absolute https URLs (http with cfg.AllowHTTP) whose
// host is, and resolves only to, public addresses (see
// HandlerConfig.AllowedNetworks). This check happens when the URL is
// registered; the dispatcher's HTTP client must repeat it when it dials, so
// that a name that later resolves to a private address is still refused.
//
// NewHandler returns an error wrapping ErrInvalidConfig when cfg.Authenticate
// is nil (unless cfg.UnsafeNoAuthSingleTenant is set) or cfg is otherwise
// unusable.
func NewHandler(subs *Subscriptions, cfg HandlerConfig) (http.Handler, error) {
	if subs == nil {
		return nil, fmt.Errorf("%w: NewHandler needs a *Subscriptions", ErrInvalidConfig)
	}
	if cfg.Authenticate == nil && !cfg.UnsafeNoAuthSingleTenant {
		return nil, fmt.Errorf("%w: HandlerConfig.Authenticate is required (or set UnsafeNoAuthSingleTenant to serve everyone without authentication)", ErrInvalidConfig)
	}
	switch {
	case cfg.MaxSubscriptionsPerTenant < 0:
		return nil, fmt.Errorf("%w: negative MaxSubscriptionsPerTenant", ErrInvalidConfig)
	case cfg.MaxSubscriptionsPerTenant == 0:
		cfg.MaxSubscriptionsPerTenant = MaxSubscriptionsPerTenantDefault
	}
	switch {
	case cfg.SecretGracePeriod == 0:
		cfg.SecretGracePeriod = SecretGracePeriodDefault
	case cfg.SecretGracePeriod < 0:
		cfg.SecretGracePeriod = 0
	}
	if cfg.WWWAuthenticate == "" {
		cfg.WWWAuthenticate = WWWAuthenticateDefault
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	seen := make(map[string]bool, len(cfg.EventTypes))
	for _, et := range cfg.EventTypes {
		if err := validateEventType(et.Name); err != nil {
			return nil, fmt.Errorf("%w: HandlerConfig.EventTypes: %v", ErrInvalidConfig, err)
		}
		if seen[et.Name] {
			return nil, fmt.Errorf("%w: HandlerConfig.EventTypes lists %q twice", ErrInvalidConfig, et.Name)
		}
		seen[et.Name] = true
	}
	for _, p := range cfg.AllowedNetworks {
		if !p.IsValid() {
			return nil, fmt.Errorf("%w: HandlerConfig.AllowedNetworks holds an invalid prefix", ErrInvalidConfig)
		}
	}
	h := &handler{
		subs: subs, cfg: cfg, log: cfg.Logger,
		policy:  ssrf.Policy{Allowed: append([]netip.Prefix(nil), cfg.AllowedNetworks...)},
		catalog: append([]EventTypeInfo(nil), cfg.EventTypes...),
		mux:     http.NewServeMux(),
	}
	if cfg.Resolver != nil {
		h.resolver = cfg.Resolver
	} else {
		h.resolver = net.DefaultResolver
	}
	for _, rt := range handlerRoutes {
		serve := rt.serve
		h.mux.HandleFunc(rt.method+" "+rt.pattern, func(w http.ResponseWriter, r *http.Request) {
			tenant, _ := r.Context().Value(tenantKey{}).(string)
			serve(h, w, r, tenant)
		})
	}
	return h, nil
}

type tenantKey struct{}

// ServeHTTP authenticates the request and routes it, answering unknown paths
// and methods with problem documents.
func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	hdr := w.Header()
	hdr.Set("Cache-Control", "no-store")
	hdr.Set("X-Content-Type-Options", "nosniff")

	// Refuse paths that are not canonical rather than letting ServeMux
	// redirect to a location that would lack the mount prefix.
	if p := r.URL.Path; p == "" || p != path.Clean(p) {
		h.writeProblem(w, r, problemNotFound("no such resource"))
		return
	}
	tenant := ""
	if h.cfg.Authenticate != nil {
		t, err := h.cfg.Authenticate(r)
		if err != nil {
			h.log.LogAttrs(r.Context(), slog.LevelDebug, "webhooks: request not authenticated",
				slog.String("method", r.Method), slog.String("path", r.URL.Path), slog.String("error", err.Error()))
			hdr.Set("WWW-Authenticate", h.cfg.WWWAuthenticate)
			h.writeProblem(w, r, &problem{Type: problemTypeUnauthorized, Status: http.StatusUnauthorized,
				Detail: "the request is not authenticated"})
			return
		}
		if err := validateTenant(t); err != nil {
			h.log.LogAttrs(r.Context(), slog.LevelError, "webhooks: HandlerConfig.Authenticate returned an unusable tenant",
				slog.String("error", err.Error()))
			h.writeProblem(w, r, problemInternal())
			return
		}
		tenant = t
	}
	if _, pattern := h.mux.Handler(r); pattern == "" {
		// No route: let the mux decide between 404 and 405 (with Allow),
		// then answer with a problem document instead of its text.
		inner, _ := h.mux.Handler(r)
		rec := &headerRecorder{header: http.Header{}, status: http.StatusNotFound}
		inner.ServeHTTP(rec, r)
		if rec.status == http.StatusMethodNotAllowed {
			allow := rec.header.Get("Allow")
			hdr.Set("Allow", allow)
			h.writeProblem(w, r, &problem{Type: problemTypeMethodNotAllowed, Status: http.StatusMethodNotAllowed,
				Detail: fmt.Sprintf("method %s is not allowed here; allowed: %s", sanitizeMethod(r.Method), allow)})
			return
		}
		h.writeProblem(w, r, problemNotFound("no such resource"))
		return
	}
	h.mux.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), tenantKey{}, tenant)))
}

// headerRecorder captures the status and headers ServeMux's own 404 and 405
// handlers write, discarding their bodies.
type headerRecorder struct {
	header http.Header
	status int
}

func (rec *headerRecorder) Header() http.Header         { return rec.header }
func (rec *headerRecorder) Write(b []byte) (int, error) { return len(b), nil }
func (rec *headerRecorder) WriteHeader(status int)      { rec.status = status }

func sanitizeMethod(m string) string {
	if len(m) > 20 {
		m = m[:20]
	}
	return strconv.QuoteToASCII(m)
}

func (h *handler) listSubscriptions(w http.ResponseWriter, r *http.Request, tenant string) {
	q, p := parseQuery(r)
	if p != nil {
		h.writeProblem(w, r, p)
		return
	}
	var errs fieldErrors
	opts := ListOptions{}
	opts.Limit, opts.Cursor = pageParams(q, &errs)
	if len(errs) > 0 {
		h.writeProblem(w, r, problemValidation(errs))
		return
	}
	page, err := h.subs.List(r.Context(), tenant, opts)
	if err != nil {
		h.storeError(w, r, err, "list subscriptions")
		return
	}
	out := subscriptionListJSON{Data: make([]subscriptionJSON, 0, len(page.Subscriptions)), NextCursor: page.NextCursor}
	for i := range page.Subscriptions {
		out.Data = append(out.Data, toSubscriptionJSON(&page.Subscriptions[i], false))
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *handler) createSubscription(w http.ResponseWriter, r *http.Request, tenant string) {
	body, p := readJSONBody(w, r)
	if p != nil {
		h.writeProblem(w, r, p)
		return
	}
	sub, p := h.decodeCreate(r.Context(), body)
	if p != nil {
		h.writeProblem(w, r, p)
		return
	}
	sub.Tenant = tenant

	sub, err := h.subs.create(r.Context(), sub, h.cfg.MaxSubscriptionsPerTenant)
	if errors.Is(err, ErrSubscriptionLimit) {
		h.writeProblem(w, r, &problem{Type: problemTypeSubscriptionLimit, Status: http.StatusConflict,
			Detail: fmt.Sprintf("this account has %d subscriptions, the most allowed; delete one first", h.cfg.MaxSubscriptionsPerTenant)})
		return
	}
	if err != nil {
		h.storeError(w, r, err, "create subscription")
		return
	}
	h.log.LogAttrs(r.Context(), slog.LevelInfo, "webhooks: subscription created",
		slog.String("tenant", tenant), slog.String("subscriptionId", sub.ID))
	w.Header().Set("Location", subscriptionLocation(r, sub.ID))
	writeJSON(w, http.StatusCreated, toSubscriptionJSON(&sub, true))
}

// subscriptionLocation is the Location of a new subscription: an absolute
// path, mount prefix included, when the request's target shows it, else a
// reference relative to the collection's URL.
func subscriptionLocation(r *http.Request, id string) string {
	target, _, _ := strings.Cut(r.RequestURI, "?")
	if strings.HasPrefix(target, "/") && strings.HasSuffix(target, "/webhook-subscriptions") {
		return target + "/" + url.PathEscape(id)
	}
	return "webhook-subscriptions/" + url.PathEscape(id)
}

func (h *handler) getSubscription(w http.ResponseWriter, r *http.Request, tenant string) {
	sub, err := h.subs.Get(r.Context(), tenant, r.PathValue("subscriptionId"))
	if err != nil {
		h.storeError(w, r, err, "get subscription")
		return
	}
	writeJSON(w, http.StatusOK, toSubscriptionJSON(&sub, false))
}

func (h *handler) updateSubscription(w http.ResponseWriter, r *http.Request, tenant string) {
	if !jsonContentType(r, true) {
		w.Header().Set("Accept-Patch", "application/json, application/merge-patch+json")
		h.writeProblem(w, r, problemUnsupportedMediaType("application/json or application/merge-patch+json"))
		return
	}
	body, p := readBody(w, r)
	if p != nil {
		h.writeProblem(w, r, p)
		return
	}
	u, empty, p := h.decodeUpdate(r.Context(), body)
	if p != nil {
		h.writeProblem(w, r, p)
		return
	}
	id := r.PathValue("subscriptionId")
	var sub Subscription
	var err error
	if empty {
		sub, err = h.subs.Get(r.Context(), tenant, id)
	} else {
		sub, err = h.subs.Update(r.Context(), tenant, id, u)
	}
	if err != nil {
		h.storeError(w, r, err, "update subscription")
		return
	}
	if !empty {
		h.log.LogAttrs(r.Context(), slog.LevelInfo, "webhooks: subscription updated",
			slog.String("tenant", tenant), slog.String("subscriptionId", sub.ID))
	}
	writeJSON(w, http.StatusOK, toSubscriptionJSON(&sub, false))
}

func (h *handler) deleteSubscription(w http.ResponseWriter, r *http.Request, tenant string) {
	if p := noBody(w, r); p != nil {
		h.writeProblem(w, r, p)
		return
	}
	id := r.PathValue("subscriptionId")
	if err := h.subs.Delete(r.Context(), tenant, id); err != nil {
		h.storeError(w, r, err, "delete subscription")
		return
	}
	h.log.LogAttrs(r.Context(), slog.LevelInfo, "webhooks: subscription deleted",
		slog.String("tenant", tenant), slog.String("subscriptionId", id))
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) rotateSecret(w http.ResponseWriter, r *http.Request, tenant string) {
	if p := noBody(w, r); p != nil {
		h.writeProblem(w, r, p)
		return
	}
	sub, err := h.subs.RotateSecret(r.Context(), tenant, r.PathValue("subscriptionId"), "", h.cfg.SecretGracePeriod)
	if err != nil {
		h.storeError(w, r, err, "rotate secret")
		return
	}
	h.log.LogAttrs(r.Context(), slog.LevelInfo, "webhooks: subscription secret rotated",
		slog.String("tenant", tenant), slog.String("subscriptionId", sub.ID),
		slog.Duration("gracePeriod", h.cfg.SecretGracePeriod))
	out := toSubscriptionJSON(&sub, true)
	if h.cfg.SecretGracePeriod > 0 && len(sub.previous) > 0 {
		exp := fromMilli(sub.previous[len(sub.previous)-1].ExpiresAt)
		out.PreviousSecretExpiresAt = &exp
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *handler) listDeliveries(w http.ResponseWriter, r *http.Request, tenant string) {
	q, p := parseQuery(r)
	if p != nil {
		h.writeProblem(w, r, p)
		return
	}
	var errs fieldErrors
	opts := DeliveryListOptions{}
	opts.Limit, opts.Cursor = pageParams(q, &errs)
	if vs, ok := q["status"]; ok {
		switch st := DeliveryState(vs[0]); {
		case len(vs) != 1:
			errs.add("status", "must be given once")
		case st == DeliveryPending, st == DeliveryDelivering, st == DeliverySucceeded, st == DeliveryDead, st == DeliveryCanceled:
			opts.State = st
		default:
			errs.add("status", "must be one of pending, delivering, succeeded, dead, canceled")
		}
	}
	if len(errs) > 0 {
		h.writeProblem(w, r, problemValidation(errs))
		return
	}
	id := r.PathValue("subscriptionId")
	if _, err := h.subs.Get(r.Context(), tenant, id); err != nil {
		h.storeError(w, r, err, "list deliveries")
		return
	}
	page, err := h.subs.ListDeliveries(r.Context(), tenant, id, opts)
	if err != nil {
		h.storeError(w, r, err, "list deliveries")
		return
	}
	out := deliveryListJSON{Data: make([]deliveryJSON, 0, len(page.Deliveries)), NextCursor: page.NextCursor}
	for i := range page.Deliveries {
		out.Data = append(out.Data, toDeliveryJSON(&page.Deliveries[i]))
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *handler) retryDelivery(w http.ResponseWriter, r *http.Request, tenant string) {
	if p := noBody(w, r); p != nil {
		h.writeProblem(w, r, p)
		return
	}
	ctx := r.Context()
	subID, dlvID := r.PathValue("subscriptionId"), r.PathValue("deliveryId")
	if _, err := h.subs.Get(ctx, tenant, subID); err != nil {
		h.storeError(w, r, err, "retry delivery")
		return
	}
	dl, err := h.subs.Delivery(ctx, tenant, dlvID)
	if err == nil && dl.SubscriptionID != subID {
		err = fmt.Errorf("%w: delivery of another subscription", ErrNotFound)
	}
	if err == nil && dl.State != DeliverySucceeded && dl.State != DeliveryDead {
		err = fmt.Errorf("%w: delivery is %s", ErrInvalidSubscription, dl.State)
	}
	if err == nil {
		err = h.subs.RetryDelivery(ctx, tenant, dlvID)
	}
	if errors.Is(err, ErrInvalidSubscription) {
		h.writeProblem(w, r, &problem{Type: problemTypeNotRetryable, Status: http.StatusConflict,
			Detail: "only succeeded or dead deliveries can be retried; this one is " + string(dl.State)})
		return
	}
	if err == nil {
		dl, err = h.subs.Delivery(ctx, tenant, dlvID)
	}
	if err != nil {
		h.storeError(w, r, err, "retry delivery")
		return
	}
	h.log.LogAttrs(ctx, slog.LevelInfo, "webhooks: delivery queued again",
		slog.String("tenant", tenant), slog.String("subscriptionId", subID), slog.String("deliveryId", dlvID))
	h.notify()
	writeJSON(w, http.StatusAccepted, toDeliveryJSON(&dl))
}

func (h *handler) sendTest(w http.ResponseWriter, r *http.Request, tenant string) {
	if p := noBody(w, r); p != nil {
		h.writeProblem(w, r, p)
		return
	}
	dl, err := h.subs.SendTest(r.Context(), tenant, r.PathValue("subscriptionId"))
	if err != nil {
		h.storeError(w, r, err, "send test event")
		return
	}
	h.notify()
	writeJSON(w, http.StatusAccepted, toDeliveryJSON(&dl))
}

func (h *handler) listEventTypes(w http.ResponseWriter, r *http.Request, _ string) {
	out := eventTypeListJSON{Data: make([]eventTypeJSON, 0, len(h.catalog))}
	for _, et := range h.catalog {
		out.Data = append(out.Data, eventTypeJSON{Name: et.Name, Description: et.Description})
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *handler) notify() {
	if h.cfg.Notify != nil {
		h.cfg.Notify()
	}
}

// storeError answers for an error of the Subscriptions store: 404 for
// ErrNotFound, 422 for ErrInvalidSubscription, 500 (logged) otherwise.
func (h *handler) storeError(w http.ResponseWriter, r *http.Request, err error, op string) {
	switch {
	case errors.Is(err, ErrNotFound):
		h.writeProblem(w, r, problemNotFound("no such subscription or delivery"))
	case errors.Is(err, ErrInvalidSubscription):
		// A rule of the library that the handler's own validation did
		// not catch: a remark on the whole request.
		detail := strings.TrimPrefix(err.Error(), ErrInvalidSubscription.Error()+": ")
		h.writeProblem(w, r, problemValidation(fieldErrors{{Field: "", Detail: detail}}))
	case r.Context().Err() != nil:
		h.log.LogAttrs(r.Context(), slog.LevelDebug, "webhooks: request canceled", slog.String("op", op))
		h.writeProblem(w, r, &problem{Type: problemTypeUnavailable, Status: http.StatusServiceUnavailable,
			Detail: "the request was canceled"})
	default:
		h.log.LogAttrs(r.Context(), slog.LevelError, "webhooks: handler "+op+" failed", slog.String("error", err.Error()))
		h.writeProblem(w, r, problemInternal())
	}
}

// pageParams reads limit and cursor.
func pageParams(q url.Values, errs *fieldErrors) (limit int, cursor string) {
	if vs, ok := q["limit"]; ok {
		n, err := strconv.Atoi(vs[0])
		switch {
		case len(vs) != 1:
			errs.add("limit", "must be given once")
		case err != nil || n < 1 || n > ListLimitMax:
			errs.add("limit", fmt.Sprintf("must be an integer from 1 to %d", ListLimitMax))
		default:
			limit = n
		}
	}
	if vs, ok := q["cursor"]; ok {
		switch c := vs[0]; {
		case len(vs) != 1:
			errs.add("cursor", "must be given once")
		case !validCursor(c):
			errs.add("cursor", "is not a cursor returned by this API (pass nextCursor back unchanged)")
		default:
			cursor = c
		}
	}
	return limit, cursor
}

// validCursor accepts what the API hands out as nextCursor (IDs).
func validCursor(c string) bool {
	if c == "" || len(c) > 128 {
		return false
	}
	for i := 0; i < len(c); i++ {
		if b := c[i]; !(b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' || b == '_' || b == '-') {
			return false
		}
	}
	return true
}

func parseQuery(r *http.Request) (url.Values, *problem) {
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return nil, problemBadRequest("the query string is malformed")
	}
	return q, nil
}
