package webhooks

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/outboxhook/webhooks/internal/ssrf"
)

// The JSON forms of the API (see openapi.yaml).

type subscriptionJSON struct {
	SubscriptionID string `json:"subscriptionId"`
	// EventType repeats the only element of EventTypes when there is
	// exactly one, for clients of the single-type form.
	EventType      string            `json:"eventType,omitempty"`
	EventTypes     []string          `json:"eventTypes"`
	CallbackURL    string            `json:"callbackUrl"`
	Secret         string            `json:"secret,omitempty"`
	Description    string            `json:"description"`
	Metadata       map[string]string `json:"metadata"`
	Enabled        bool              `json:"enabled"`
	DisabledReason string            `json:"disabledReason,omitempty"`
	// Headers are shown with their values: they are the tenant's own, like
	// the callback URL.
	Headers             map[string]string `json:"headers"`
	RateLimit           float64           `json:"rateLimit"`
	ConsecutiveFailures int               `json:"consecutiveFailures"`
	FailingSince        *time.Time        `json:"failingSince,omitempty"`
	LastSuccessAt       *time.Time        `json:"lastSuccessAt,omitempty"`
	CreatedAt           time.Time         `json:"createdAt"`
	UpdatedAt           time.Time         `json:"updatedAt"`
	// PreviousSecretExpiresAt, on rotate-secret answers, is when the
	// replaced secret stops signing.
	PreviousSecretExpiresAt *time.Time `json:"previousSecretExpiresAt,omitempty"`
}

type subscriptionListJSON struct {
	Data       []subscriptionJSON `json:"data"`
	NextCursor string             `json:"nextCursor,omitempty"`
}

type deliveryJSON struct {
	DeliveryID     string        `json:"deliveryId"`
	SubscriptionID string        `json:"subscriptionId"`
	EventID        string        `json:"eventId"`
	Status         DeliveryState `json:"status"`
	AttemptCount   int           `json:"attemptCount"`
	NextAttemptAt  *time.Time    `json:"nextAttemptAt,omitempty"`
	LastStatusCode int           `json:"lastStatusCode,omitempty"`
	LastError      string        `json:"lastError,omitempty"`
	CreatedAt      time.Time     `json:"createdAt"`
	UpdatedAt      time.Time     `json:"updatedAt"`
	DeliveredAt    *time.Time    `json:"deliveredAt,omitempty"`
	Attempts       []attemptJSON `json:"attempts"`
}

type attemptJSON struct {
	Attempt    int       `json:"attempt"`
	StartedAt  time.Time `json:"startedAt"`
	DurationMs int64     `json:"durationMs"`
	StatusCode int       `json:"statusCode"`
	Error      string    `json:"error"`
	Response   string    `json:"response"`
}

type deliveryListJSON struct {
	Data       []deliveryJSON `json:"data"`
	NextCursor string         `json:"nextCursor,omitempty"`
}

type eventTypeJSON struct {
	Name        string `json:"name"`
	Description string `json:"description"`
}

type eventTypeListJSON struct {
	Data []eventTypeJSON `json:"data"`
}

func toSubscriptionJSON(s *Subscription, withSecret bool) subscriptionJSON {
	out := subscriptionJSON{
		SubscriptionID: s.ID, EventTypes: s.EventTypes, CallbackURL: s.URL,
		Description: s.Description, Metadata: s.Metadata, Enabled: !s.Disabled,
		DisabledReason: s.DisabledReason, CreatedAt: s.CreatedAt, UpdatedAt: s.UpdatedAt,
		Headers: s.Headers, RateLimit: s.RateLimit, ConsecutiveFailures: s.ConsecutiveFailures,
	}
	if !s.FailingSince.IsZero() {
		at := s.FailingSince
		out.FailingSince = &at
	}
	if !s.LastSuccessAt.IsZero() {
		at := s.LastSuccessAt
		out.LastSuccessAt = &at
	}
	if out.Headers == nil {
		out.Headers = map[string]string{}
	}
	if len(s.EventTypes) == 1 {
		out.EventType = s.EventTypes[0]
	}
	if out.EventTypes == nil {
		out.EventTypes = []string{}
	}
	if out.Metadata == nil {
		out.Metadata = map[string]string{}
	}
	if withSecret {
		out.Secret = s.Secret
	}
	return out
}

func toDeliveryJSON(d *Delivery) deliveryJSON {
	out := deliveryJSON{
		DeliveryID: d.ID, SubscriptionID: d.SubscriptionID, EventID: d.EventID, Status: d.State,
		AttemptCount: d.Attempts, LastStatusCode: d.LastStatus, LastError: d.LastError,
		CreatedAt: d.CreatedAt, UpdatedAt: d.UpdatedAt, Attempts: make([]attemptJSON, 0, len(d.AttemptLog)),
	}
	if d.State == DeliveryPending || d.State == DeliveryDelivering {
		next := d.NextAttemptAt
		out.NextAttemptAt = &next
	}
	if !d.DeliveredAt.IsZero() {
		at := d.DeliveredAt
		out.DeliveredAt = &at
	}
	for _, a := range d.AttemptLog {
		out.Attempts = append(out.Attempts, attemptJSON{
			Attempt: a.Attempt, StartedAt: a.StartedAt, DurationMs: a.Duration.Milliseconds(),
			StatusCode: a.StatusCode, Error: a.Error, Response: a.Response,
		})
	}
	return out
}

// Reading requests.

// jsonContentType reports whether the request declares a JSON body
// (application/json, or with mergePatch application/merge-patch+json),
// in UTF-8 if a charset is named.
func jsonContentType(r *http.Request, mergePatch bool) bool {
	values := r.Header.Values("Content-Type")
	if len(values) != 1 {
		return false
	}
	mt, params, err := mime.ParseMediaType(values[0])
	if err != nil {
		return false
	}
	if mt != "application/json" && !(mergePatch && mt == "application/merge-patch+json") {
		return false
	}
	if cs, ok := params["charset"]; ok && !strings.EqualFold(cs, "utf-8") {
		return false
	}
	return true
}

// readBody reads at most HandlerMaxBodyBytes of the body.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, *problem) {
	if r.ContentLength > HandlerMaxBodyBytes {
		return nil, problemTooLarge()
	}
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, HandlerMaxBodyBytes))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			return nil, problemTooLarge()
		}
		return nil, problemBadRequest("the request body could not be read")
	}
	return b, nil
}

// readJSONBody reads the JSON body of a POST, refusing other media types
// (with Accept-Post set).
func readJSONBody(w http.ResponseWriter, r *http.Request) ([]byte, *problem) {
	if !jsonContentType(r, false) {
		w.Header().Set("Accept-Post", "application/json")
		return nil, problemUnsupportedMediaType("application/json")
	}
	return readBody(w, r)
}

// noBody accepts an operation's request without a body, or with a JSON
// object without fields.
func noBody(w http.ResponseWriter, r *http.Request) *problem {
	b, p := readBody(w, r)
	if p != nil {
		return p
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return nil
	}
	if !jsonContentType(r, false) {
		return problemUnsupportedMediaType("application/json (or send no body)")
	}
	fields, p := parseObject(b)
	if p != nil {
		return p
	}
	return unknownFields(fields, nil)
}

// parseObject reads a body that must be exactly one JSON object, with no
// duplicate keys and nothing after it, into its raw fields.
func parseObject(body []byte) (map[string]json.RawMessage, *problem) {
	if !utf8.Valid(body) {
		return nil, problemBadRequest("the request body is not valid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	tok, err := dec.Token()
	if err == io.EOF {
		return nil, problemBadRequest("the request body is empty; a JSON object is expected")
	}
	if err != nil {
		return nil, problemBadRequest(jsonErrorDetail(err))
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, problemBadRequest("the request body must be a JSON object")
	}
	fields := make(map[string]json.RawMessage)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, problemBadRequest(jsonErrorDetail(err))
		}
		key, ok := tok.(string)
		if !ok {
			return nil, problemBadRequest("malformed JSON: object key expected")
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, problemBadRequest(jsonErrorDetail(err))
		}
		if _, dup := fields[key]; dup {
			return nil, problemBadRequest("field " + quoteField(key) + " appears more than once")
		}
		fields[key] = raw
	}
	if _, err := dec.Token(); err != nil {
		return nil, problemBadRequest(jsonErrorDetail(err))
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, problemBadRequest("unexpected data after the JSON object")
	}
	return fields, nil
}

func jsonErrorDetail(err error) string {
	var syn *json.SyntaxError
	switch {
	case errors.As(err, &syn):
		return fmt.Sprintf("malformed JSON at byte %d: %s", syn.Offset, syn.Error())
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return "malformed JSON: the body ends too early"
	}
	return "malformed JSON"
}

// quoteField quotes a client-supplied field name for a message, shortened.
func quoteField(s string) string {
	if len(s) > 64 {
		s = s[:64] + "…"
	}
	return strconv.QuoteToASCII(s)
}

// unknownFields reports every field not in known.
func unknownFields(fields map[string]json.RawMessage, known map[string]bool) *problem {
	var errs fieldErrors
	for k := range fields {
		if !known[k] {
			errs.add(fieldName(k), "is not a known field")
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return problemValidation(errs)
}

// fieldName is a client-supplied field name as it appears in errors.
func fieldName(s string) string {
	if len(s) > 64 || !utf8.ValidString(s) || strings.IndexFunc(s, unicode.IsControl) >= 0 {
		q := quoteField(s)
		return q[1 : len(q)-1]
	}
	return s
}

var (
	createFields = map[string]bool{"eventType": true, "eventTypes": true, "callbackUrl": true, "secret": true,
		"description": true, "metadata": true, "enabled": true, "headers": true, "rateLimit": true}
	updateFields = map[string]bool{"eventTypes": true, "callbackUrl": true, "description": true,
		"metadata": true, "enabled": true, "headers": true, "rateLimit": true}
)

// field decodes fields[name] into a T; a missing field leaves ok false,
// a null or mistyped one records an error.
func decodeField[T any](fields map[string]json.RawMessage, name, kind string, errs *fieldErrors) (v T, ok bool) {
	raw, present := fields[name]
	if !present {
		return v, false
	}
	if string(raw) == "null" {
		errs.add(name, "must be "+kind+", not null")
		return v, false
	}
	if err := json.Unmarshal(raw, &v); err != nil {
		errs.add(name, "must be "+kind)
		return v, false
	}
	return v, true
}

// decodeCreate reads and validates the body of POST /webhook-subscriptions
// into a Subscription without ID and tenant.
func (h *handler) decodeCreate(ctx context.Context, body []byte) (Subscription, *problem) {
	fields, p := parseObject(body)
	if p != nil {
		return Subscription{}, p
	}
	if p := unknownFields(fields, createFields); p != nil {
		return Subscription{}, p
	}
	var errs fieldErrors
	var sub Subscription

	one, hasOne := decodeField[string](fields, "eventType", "a string", &errs)
	many, hasMany := decodeField[[]string](fields, "eventTypes", "an array of strings", &errs)
	_, oneGiven := fields["eventType"]
	_, manyGiven := fields["eventTypes"]
	switch {
	case oneGiven && manyGiven:
		errs.add("eventTypes", "cannot be given together with eventType")
	case hasOne:
		sub.EventTypes = []string{one}
		h.checkEventTypes("eventType", sub.EventTypes, &errs)
	case hasMany:
		sub.EventTypes = many
		h.checkEventTypes("eventTypes", sub.EventTypes, &errs)
	case !oneGiven && !manyGiven:
		errs.add("eventTypes", "is required: the event types or patterns to receive")
	}

	if u, ok := decodeField[string](fields, "callbackUrl", "a string", &errs); ok {
		if d := h.checkCallbackURL(ctx, u); d != "" {
			errs.add("callbackUrl", d)
		}
		sub.URL = u
	} else if _, given := fields["callbackUrl"]; !given {
		errs.add("callbackUrl", "is required")
	}
	if s, ok := decodeField[string](fields, "secret", "a string", &errs); ok {
		if _, err := ParseSecret(s); err != nil {
			// ParseSecret's errors never repeat the secret.
			errs.add("secret", "must be \""+SecretPrefix+"\" followed by the base64 of 24 to 64 random bytes: "+
				strings.TrimPrefix(err.Error(), ErrInvalidSecret.Error()+": "))
		}
		sub.Secret = s
	}
	if d, ok := decodeField[string](fields, "description", "a string", &errs); ok {
		checkDescription(d, &errs)
		sub.Description = d
	}
	if m, ok := decodeField[map[string]string](fields, "metadata", "an object of strings", &errs); ok {
		checkMetadata(m, &errs)
		sub.Metadata = m
	}
	if e, ok := decodeField[bool](fields, "enabled", "a boolean", &errs); ok {
		sub.Disabled = !e
	}
	if hs, ok := decodeHeaders(fields, &errs); ok {
		sub.Headers = hs
	}
	if rl, ok := decodeRateLimit(fields, &errs); ok {
		sub.RateLimit = rl
	}
	if len(errs) > 0 {
		return Subscription{}, problemValidation(errs)
	}
	return sub, nil
}

// decodeUpdate reads and validates the body of PATCH; empty reports a body
// without fields.
func (h *handler) decodeUpdate(ctx context.Context, body []byte) (u SubscriptionUpdate, empty bool, p *problem) {
	fields, p := parseObject(body)
	if p != nil {
		return u, false, p
	}
	if p := unknownFields(fields, updateFields); p != nil {
		return u, false, p
	}
	var errs fieldErrors
	if types, ok := decodeField[[]string](fields, "eventTypes", "an array of strings", &errs); ok {
		h.checkEventTypes("eventTypes", types, &errs)
		u.EventTypes = types
		if u.EventTypes == nil {
			u.EventTypes = []string{}
		}
	}
	if s, ok := decodeField[string](fields, "callbackUrl", "a string", &errs); ok {
		if d := h.checkCallbackURL(ctx, s); d != "" {
			errs.add("callbackUrl", d)
		}
		u.URL = &s
	}
	if d, ok := decodeField[string](fields, "description", "a string", &errs); ok {
		checkDescription(d, &errs)
		u.Description = &d
	}
	if m, ok := decodeField[map[string]string](fields, "metadata", "an object of strings", &errs); ok {
		checkMetadata(m, &errs)
		if m == nil {
			m = map[string]string{}
		}
		u.Metadata = m
	}
	if e, ok := decodeField[bool](fields, "enabled", "a boolean", &errs); ok {
		off := !e
		u.Disabled = &off
	}
	if hs, ok := decodeHeaders(fields, &errs); ok {
		if hs == nil {
			hs = map[string]string{}
		}
		u.Headers = hs
	}
	if rl, ok := decodeRateLimit(fields, &errs); ok {
		u.RateLimit = &rl
	}
	if len(errs) > 0 {
		return SubscriptionUpdate{}, false, problemValidation(errs)
	}
	return u, len(fields) == 0, nil
}

// checkEventTypes validates patterns and, with a catalog, that each matches
// one of its types.
func (h *handler) checkEventTypes(name string, types []string, errs *fieldErrors) {
	if len(types) == 0 {
		errs.add(name, "must name at least one event type or pattern")
		return
	}
	if len(types) > MaxEventTypePatterns {
		errs.add(name, fmt.Sprintf("has %d elements; at most %d", len(types), MaxEventTypePatterns))
		return
	}
	for i, t := range types {
		fname := name
		if name == "eventTypes" {
			fname = fmt.Sprintf("eventTypes[%d]", i)
		}
		if err := validatePattern(t); err != nil {
			errs.add(fname, `must be an event type such as "order.shipped", a prefix such as "order.*", or "*"`)
			continue
		}
		if len(h.catalog) > 0 && !h.inCatalog(t) {
			errs.add(fname, "matches none of the event types this service publishes (see GET /event-types)")
		}
	}
}

func (h *handler) inCatalog(pattern string) bool {
	for _, et := range h.catalog {
		if matchPattern(pattern, et.Name) {
			return true
		}
	}
	return false
}

func checkDescription(d string, errs *fieldErrors) {
	if n := utf8.RuneCountInString(d); n > MaxDescriptionLength {
		errs.add("description", fmt.Sprintf("is %d characters long; at most %d", n, MaxDescriptionLength))
	}
	if hasControl(d, true) {
		errs.add("description", "must not contain control characters other than tab and line breaks")
	}
}

func checkMetadata(m map[string]string, errs *fieldErrors) {
	if len(m) > MaxMetadataKeys {
		errs.add("metadata", fmt.Sprintf("has %d keys; at most %d", len(m), MaxMetadataKeys))
		return
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := m[k]
		switch {
		case k == "" || len(k) > MaxMetadataKeyLength:
			errs.add("metadata", fmt.Sprintf("keys must be 1 to %d bytes long", MaxMetadataKeyLength))
		case hasControl(k, false):
			errs.add("metadata", "keys must not contain control characters")
		case len(v) > MaxMetadataValueBytes:
			errs.add("metadata", fmt.Sprintf("the value of %s is %d bytes long; at most %d", quoteField(k), len(v), MaxMetadataValueBytes))
		case hasControl(v, true):
			errs.add("metadata", fmt.Sprintf("the value of %s must not contain control characters other than tab and line breaks", quoteField(k)))
		}
	}
}

// hasControl reports control characters (C0, DEL, C1), except tab, CR and
// LF when whitespace is allowed.
func hasControl(s string, allowWhitespace bool) bool {
	for _, r := range s {
		if unicode.IsControl(r) && !(allowWhitespace && (r == '\t' || r == '\n' || r == '\r')) {
			return true
		}
	}
	return false
}

// checkCallbackURL validates a callback URL and returns what is wrong with
// it, or "" when it is acceptable: absolute https (http with AllowHTTP),
// printable ASCII, no user information, fragment or percent-encoded host,
// and a host that is, and resolves only to, addresses the SSRF policy
// allows.
func (h *handler) checkCallbackURL(ctx context.Context, raw string) string {
	schemes := "https"
	if h.cfg.AllowHTTP {
		schemes = "https or http"
	}
	if raw == "" {
		return "is required"
	}
	if len(raw) > MaxURLLength {
		return fmt.Sprintf("is %d bytes long; at most %d", len(raw), MaxURLLength)
	}
	for i := 0; i < len(raw); i++ {
		if c := raw[i]; c < 0x21 || c > 0x7e {
			return "must be printable ASCII without spaces (percent-encode the path; use the punycode form of international names)"
		}
	}
	u, err := parseURL(raw)
	if err != nil {
		return "is not a valid URL"
	}
	if u.scheme != "https" && !(h.cfg.AllowHTTP && u.scheme == "http") {
		return "must be an absolute URL using " + schemes
	}
	if u.userinfo {
		return "must not contain user information (user:password@)"
	}
	if u.fragment {
		return "must not contain a fragment (#...)"
	}
	if strings.Contains(u.host, "%") {
		return "must not percent-encode its host"
	}
	if u.host == "" {
		return "must name a host"
	}
	if u.port != "" {
		if n, err := strconv.Atoi(u.port); err != nil || n < 1 || n > 65535 {
			return "has an invalid port"
		}
	}
	ctx, cancel := context.WithTimeout(ctx, resolveTimeout)
	defer cancel()
	err = h.policy.CheckHost(ctx, h.resolver, u.host)
	switch {
	case err == nil:
		return ""
	case errors.Is(err, ssrf.ErrForbidden):
		var ne *ssrf.NameError
		if errors.As(err, &ne) {
			// The answer does not say which address, so that callers
			// cannot map internal names; the log does.
			h.log.LogAttrs(ctx, slog.LevelInfo, "webhooks: callback URL refused: its host resolves to a non-public address",
				slog.String("host", ne.Host), slog.String("addr", ne.Addr.Addr.String()), slog.String("reason", ne.Addr.Reason))
		}
		return "must point to a public address: " + strings.TrimPrefix(err.Error(), "ssrf: ")
	case errors.Is(err, ssrf.ErrResolve):
		return "has a host that does not resolve: " + strings.TrimPrefix(err.Error(), ssrf.ErrResolve.Error()+": ")
	default:
		return "has an invalid host: " + strings.TrimPrefix(err.Error(), ssrf.ErrInvalidHost.Error()+": ")
	}
}

// callbackURL is a URL as the dispatcher's HTTP client will read it, with
// what the handler refuses flagged.
type callbackURL struct {
	scheme, host, port string
	userinfo, fragment bool
}

// parseURL parses an absolute URL with net/url, as the dispatcher will, and
// flags what is written in its authority: user information (any '@') and
// percent-encoding (which net/url would decode in the host). Characters that
// RFC 3986 does not allow in a URL are errors.
func parseURL(raw string) (callbackURL, error) {
	var c callbackURL
	for i := 0; i < len(raw); i++ {
		if !isURLChar(raw[i]) {
			return c, errors.New("character not allowed in a URL")
		}
	}
	u, err := url.Parse(raw)
	if err != nil {
		return c, err
	}
	i := strings.Index(raw, "://")
	if !u.IsAbs() || u.Opaque != "" || i < 0 || !strings.EqualFold(raw[:i], u.Scheme) {
		return c, errors.New("not an absolute URL with an authority")
	}
	auth := raw[i+3:]
	if j := strings.IndexAny(auth, "/?#"); j >= 0 {
		auth = auth[:j]
	}
	c.scheme = u.Scheme
	c.userinfo = u.User != nil || strings.Contains(auth, "@")
	c.fragment = u.Fragment != "" || strings.Contains(raw, "#")
	c.host, c.port = u.Hostname(), u.Port()
	if strings.Contains(auth, "%") {
		c.host = "%"
	}
	if strings.Contains(c.host, ":") && !strings.HasPrefix(u.Host, "[") {
		return c, errors.New("IPv6 address without brackets")
	}
	return c, nil
}

// isURLChar reports the characters RFC 3986 allows in a URL: unreserved,
// reserved and '%'.
func isURLChar(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return strings.IndexByte("-._~:/?#[]@!$&'()*+,;=%", c) >= 0
}
