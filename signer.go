package webhooks

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// SecretPrefix is the prefix of every signing secret ("whsec_"). The rest of
// a secret is the standard base64 encoding of the HMAC key.
const SecretPrefix = "whsec_"

// Header names of the Standard Webhooks v1 scheme, lower-case as the
// specification writes them. http.Header canonicalizes them on Set and Get.
const (
	// HeaderWebhookID carries the unique message id, which stays the same
	// across retries of one message.
	HeaderWebhookID = "webhook-id"
	// HeaderWebhookTimestamp carries the signing time as integer Unix seconds.
	HeaderWebhookTimestamp = "webhook-timestamp"
	// HeaderWebhookSignature carries one or more space-separated
	// "v1,<base64>" signatures.
	HeaderWebhookSignature = "webhook-signature"
)

// VerifyToleranceDefault is how far a webhook's timestamp may lie from the
// receiver's clock, in either direction, when Verifier.Tolerance is zero.
const VerifyToleranceDefault = 5 * time.Minute

// Bounds on the decoded length of a signing secret, in bytes.
const (
	secretMinKeyBytes = 24
	secretMaxKeyBytes = 64
	// newSecretKeyBytes is the key length NewSecret generates.
	newSecretKeyBytes = 32
)

// verifyMaxBodyDefault is the body limit of Verifier.Middleware when
// Verifier.MaxBodyBytes is zero: 1 MiB.
const verifyMaxBodyDefault = 1 << 20

// Errors returned by the signing and verification functions. Returned errors
// wrap one of these with detail; test for them with errors.Is. No error ever
// contains a signing secret or key.
var (
	// ErrInvalidSecret reports a malformed signing secret.
	ErrInvalidSecret = errors.New("webhooks: invalid signing secret")
	// ErrMissingHeaders reports a request without one of the three
	// Standard Webhooks headers.
	ErrMissingHeaders = errors.New("webhooks: missing webhook-id, webhook-timestamp or webhook-signature header")
	// ErrInvalidTimestamp reports a webhook-timestamp header that is not an
	// integer number of Unix seconds.
	ErrInvalidTimestamp = errors.New("webhooks: invalid webhook-timestamp header")
	// ErrTimestampTooOld reports a timestamp further in the past than the
	// verifier's tolerance.
	ErrTimestampTooOld = errors.New("webhooks: webhook timestamp too old")
	// ErrTimestampTooNew reports a timestamp further in the future than the
	// verifier's tolerance.
	ErrTimestampTooNew = errors.New("webhooks: webhook timestamp too new")
	// ErrNoMatchingSignature reports that no v1 signature in the
	// webhook-signature header matches the body under any secret.
	ErrNoMatchingSignature = errors.New("webhooks: no matching signature")
)

// NewSecret returns a fresh signing secret: SecretPrefix followed by the
// standard base64 encoding of 32 bytes from crypto/rand.
func NewSecret() (string, error) {
	var key [newSecretKeyBytes]byte
	if _, err := rand.Read(key[:]); err != nil {
		return "", fmt.Errorf("webhooks: generating signing secret: %w", err)
	}
	return SecretPrefix + base64.StdEncoding.EncodeToString(key[:]), nil
}

// ParseSecret validates a signing secret and returns its HMAC key. A secret
// is SecretPrefix followed by the standard base64 encoding of a key of 24 to
// 64 bytes, padded as base64.StdEncoding produces it or unpadded.
//
// Errors wrap ErrInvalidSecret and say what is wrong, without repeating the
// secret.
func ParseSecret(secret string) ([]byte, error) {
	encoded, ok := strings.CutPrefix(secret, SecretPrefix)
	if !ok {
		return nil, fmt.Errorf("%w: must start with %q", ErrInvalidSecret, SecretPrefix)
	}
	enc := base64.RawStdEncoding
	if len(encoded)%4 == 0 {
		enc = base64.StdEncoding
	}
	key, err := enc.DecodeString(encoded)
	if err != nil {
		// A base64.CorruptInputError names only an offset, never the input.
		var corrupt base64.CorruptInputError
		if errors.As(err, &corrupt) {
			return nil, fmt.Errorf("%w: not base64 after %q (bad data at byte %d)", ErrInvalidSecret, SecretPrefix, int64(corrupt)+int64(len(SecretPrefix)))
		}
		return nil, fmt.Errorf("%w: not base64 after %q", ErrInvalidSecret, SecretPrefix)
	}
	if len(key) < secretMinKeyBytes || len(key) > secretMaxKeyBytes {
		return nil, fmt.Errorf("%w: decodes to %d bytes; want %d to %d", ErrInvalidSecret, len(key), secretMinKeyBytes, secretMaxKeyBytes)
	}
	return key, nil
}

// Sign returns the Standard Webhooks v1 signature of a message, in the form
// "v1,<base64>", where <base64> is the standard base64 encoding of
// HMAC-SHA256(key, id + "." + unix-seconds + "." + body). The result is the
// value of the webhook-signature header for a single secret.
func Sign(secret, id string, timestamp time.Time, body []byte) (string, error) {
	key, err := ParseSecret(secret)
	if err != nil {
		return "", err
	}
	s := &signer{keys: [][]byte{key}}
	return s.header(id, timestamp.Unix(), body), nil
}

// Lengths of the parts of one signature entry.
const (
	sigVersion    = "v1"
	sigEncodedLen = 44 // base64.StdEncoding.EncodedLen(sha256.Size)
)

// signer computes webhook-signature values for a fixed set of keys. It is
// safe for concurrent use. Hash states are pooled per key, so that header
// allocates only its result.
type signer struct {
	keys [][]byte // one per active secret, in header order
	// macs holds one pool of *signerMAC per key. It may be nil (a signer
	// built as a literal), in which case every call makes fresh hash states.
	macs []sync.Pool
}

// signerMAC is the pooled state used to sign with one key.
type signerMAC struct {
	h   hash.Hash
	buf []byte // scratch for id "." unix "."
	sum [sha256.Size]byte
	enc [sigEncodedLen]byte
}

// newSigner parses every secret with ParseSecret. It fails when secrets is
// empty or any secret is invalid; errors wrap ErrInvalidSecret.
func newSigner(secrets []string) (*signer, error) {
	if len(secrets) == 0 {
		return nil, fmt.Errorf("%w: no secrets given", ErrInvalidSecret)
	}
	s := &signer{
		keys: make([][]byte, len(secrets)),
		macs: make([]sync.Pool, len(secrets)),
	}
	for i, secret := range secrets {
		key, err := ParseSecret(secret)
		if err != nil {
			if len(secrets) == 1 {
				return nil, err
			}
			return nil, fmt.Errorf("secret %d of %d: %w", i+1, len(secrets), err)
		}
		s.keys[i] = key
		s.macs[i].New = func() any {
			return &signerMAC{h: hmac.New(sha256.New, key)}
		}
	}
	return s, nil
}

// getMAC returns the signing state of key i, from its pool when there is one.
func (s *signer) getMAC(i int) *signerMAC {
	if i < len(s.macs) {
		if m, ok := s.macs[i].Get().(*signerMAC); ok {
			return m
		}
	}
	return &signerMAC{h: hmac.New(sha256.New, s.keys[i])}
}

// putMAC returns m, taken by getMAC(i), to its pool.
func (s *signer) putMAC(i int, m *signerMAC) {
	if i < len(s.macs) {
		s.macs[i].Put(m)
	}
}

// sign fills m.enc with the base64 v1 signature of the message under m's key.
func (m *signerMAC) sign(id string, unix int64, body []byte) {
	m.h.Reset()
	m.buf = append(m.buf[:0], id...)
	m.buf = append(m.buf, '.')
	m.buf = strconv.AppendInt(m.buf, unix, 10)
	m.buf = append(m.buf, '.')
	m.h.Write(m.buf)
	m.h.Write(body)
	base64.StdEncoding.Encode(m.enc[:], m.h.Sum(m.sum[:0]))
	if cap(m.buf) > 1024 {
		m.buf = nil // do not pin the scratch of an unusually long id
	}
}

// header returns the webhook-signature value: one "v1,<sig>" per key,
// space-separated, in key order.
func (s *signer) header(id string, unix int64, body []byte) string {
	if len(s.keys) == 0 {
		return ""
	}
	var b strings.Builder
	b.Grow(len(s.keys)*(len(sigVersion)+1+sigEncodedLen+1) - 1)
	for i := range s.keys {
		m := s.getMAC(i)
		m.sign(id, unix, body)
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(sigVersion)
		b.WriteByte(',')
		b.Write(m.enc[:])
		s.putMAC(i, m)
	}
	return b.String()
}

// Verifier checks incoming webhooks on the receiver side.
//
// A Verifier may be built with NewVerifier or as a struct literal. Its
// secrets are parsed on first use and cached, so Secrets must not change
// after that, and a Verifier must not be copied after first use. A Verifier
// is safe for concurrent use.
type Verifier struct {
	// Secrets are the accepted signing secrets. A webhook is accepted when
	// any one of its signatures matches any one secret, so that a secret can
	// be rotated by accepting the old and the new one for a while.
	Secrets []string
	// Tolerance is how far the webhook-timestamp may lie from Now, in
	// either direction. Zero or negative means VerifyToleranceDefault.
	Tolerance time.Duration
	// Now returns the current time. Nil means time.Now.
	Now func() time.Time
	// MaxBodyBytes limits the request body read by Middleware. Zero or
	// negative means 1 MiB. Larger bodies are answered with 413.
	MaxBodyBytes int64

	once    sync.Once
	signer  *signer
	initErr error
}

// NewVerifier returns a Verifier for the given secrets, parsed up front.
// Errors wrap ErrInvalidSecret.
func NewVerifier(secrets ...string) (*Verifier, error) {
	v := &Verifier{Secrets: append([]string(nil), secrets...)}
	if _, err := v.keys(); err != nil {
		return nil, err
	}
	return v, nil
}

// keys returns the signer of v's secrets, parsing them on first use.
func (v *Verifier) keys() (*signer, error) {
	v.once.Do(func() {
		v.signer, v.initErr = newSigner(v.Secrets)
	})
	return v.signer, v.initErr
}

// Verify checks the Standard Webhooks headers in h against body. It
// requires the webhook-id, webhook-timestamp and webhook-signature headers
// (else ErrMissingHeaders); a timestamp of integer Unix seconds (else
// ErrInvalidTimestamp) within Tolerance of Now (else ErrTimestampTooOld or
// ErrTimestampTooNew); and at least one space-separated "v1,<base64>"
// signature entry that matches body under any of the secrets (else
// ErrNoMatchingSignature). Entries of other versions are ignored.
// Signatures are compared in constant time.
//
// A Verifier whose Secrets are invalid or empty returns an error wrapping
// ErrInvalidSecret. Returned errors never contain a secret.
func (v *Verifier) Verify(h http.Header, body []byte) error {
	s, err := v.keys()
	if err != nil {
		return err
	}
	id := sigHeaderFirst(h, HeaderWebhookID)
	tsText := sigHeaderFirst(h, HeaderWebhookTimestamp)
	sigs := sigHeaderAll(h, HeaderWebhookSignature)
	if id == "" || tsText == "" || len(sigs) == 0 {
		var missing []string
		if id == "" {
			missing = append(missing, HeaderWebhookID)
		}
		if tsText == "" {
			missing = append(missing, HeaderWebhookTimestamp)
		}
		if len(sigs) == 0 {
			missing = append(missing, HeaderWebhookSignature)
		}
		return fmt.Errorf("%w (missing %s)", ErrMissingHeaders, strings.Join(missing, ", "))
	}

	unix, err := parseWebhookTimestamp(tsText)
	if err != nil {
		return fmt.Errorf("%w: %.32q is not integer Unix seconds", ErrInvalidTimestamp, tsText)
	}
	now := time.Now
	if v.Now != nil {
		now = v.Now
	}
	tolerance := v.Tolerance
	if tolerance <= 0 {
		tolerance = VerifyToleranceDefault
	}
	age := now().Sub(time.Unix(unix, 0))
	switch {
	case age > tolerance:
		return fmt.Errorf("%w: %s old, tolerance %s", ErrTimestampTooOld, age.Truncate(time.Second), tolerance)
	case age < -tolerance:
		return fmt.Errorf("%w: %s in the future, tolerance %s", ErrTimestampTooNew, (-age).Truncate(time.Second), tolerance)
	}

	for i := range s.keys {
		m := s.getMAC(i)
		m.sign(id, unix, body)
		ok := sigEntriesMatch(sigs, m.enc[:])
		s.putMAC(i, m)
		if ok {
			return nil
		}
	}
	return fmt.Errorf("%w (no v1 entry matches any configured secret)", ErrNoMatchingSignature)
}

// sigEntriesMatch reports whether any "v1,<base64>" entry of the
// webhook-signature header values equals want, comparing in constant time.
func sigEntriesMatch(values []string, want []byte) bool {
	for _, value := range values {
		for _, entry := range strings.Fields(value) {
			version, sig, ok := strings.Cut(entry, ",")
			if !ok || version != sigVersion {
				continue
			}
			if hmac.Equal([]byte(sig), want) {
				return true
			}
		}
	}
	return false
}

// parseWebhookTimestamp parses a webhook-timestamp: ASCII digits only, no sign.
func parseWebhookTimestamp(s string) (int64, error) {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, strconv.ErrSyntax
		}
	}
	return strconv.ParseInt(s, 10, 64)
}

// sigHeaderFirst returns the first value of the header name, looked up both
// canonically (as net/http stores it) and verbatim (as a hand-built map may).
func sigHeaderFirst(h http.Header, name string) string {
	if v := h.Get(name); v != "" {
		return v
	}
	if vs := h[name]; len(vs) > 0 {
		return vs[0]
	}
	return ""
}

// sigHeaderAll returns all non-empty values of the header name, looked up both
// canonically and verbatim.
func sigHeaderAll(h http.Header, name string) []string {
	vs := h.Values(name)
	if len(vs) == 0 {
		vs = h[name]
	}
	for _, v := range vs {
		if v == "" {
			// Rare: drop empty values without touching h's slice.
			var out []string
			for _, v := range vs {
				if v != "" {
					out = append(out, v)
				}
			}
			return out
		}
	}
	return vs
}

// Verify checks a webhook's headers and body against one secret with the
// default tolerance and the current time. It is NewVerifier(secret) followed
// by Verifier.Verify; prefer a long-lived Verifier, which parses the secret
// only once.
func Verify(secret string, h http.Header, body []byte) error {
	v, err := NewVerifier(secret)
	if err != nil {
		return err
	}
	return v.Verify(h, body)
}

// Middleware returns an http.Handler that verifies each request before
// passing it on to next. It reads the whole body, up to MaxBodyBytes
// (default 1 MiB; larger bodies get 413 Request Entity Too Large), and
// verifies it with Verify. A request that fails verification gets 401
// Unauthorized with a short plain-text reason and does not reach next. A
// Verifier with invalid secrets answers 500. Otherwise next is called with
// a shallow copy of the request whose Body reads the same bytes again.
func (v *Verifier) Middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		limit := v.MaxBodyBytes
		if limit <= 0 {
			limit = verifyMaxBodyDefault
		}
		if r.ContentLength > limit {
			http.Error(w, "webhook body too large", http.StatusRequestEntityTooLarge)
			return
		}
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
		if err != nil {
			var tooLarge *http.MaxBytesError
			if errors.As(err, &tooLarge) {
				http.Error(w, "webhook body too large", http.StatusRequestEntityTooLarge)
				return
			}
			http.Error(w, "cannot read webhook body", http.StatusBadRequest)
			return
		}
		if err := v.Verify(r.Header, body); err != nil {
			code, reason := verifyFailureResponse(err)
			http.Error(w, reason, code)
			return
		}
		r2 := new(http.Request)
		*r2 = *r
		r2.Body = io.NopCloser(bytes.NewReader(body))
		r2.ContentLength = int64(len(body))
		r2.GetBody = func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(body)), nil
		}
		next.ServeHTTP(w, r2)
	})
}

// verifyFailureResponse maps a Verify error to a status code and a short reason
// that echoes neither secrets nor request data.
func verifyFailureResponse(err error) (int, string) {
	switch {
	case errors.Is(err, ErrInvalidSecret):
		return http.StatusInternalServerError, "webhook verifier misconfigured"
	case errors.Is(err, ErrMissingHeaders):
		return http.StatusUnauthorized, "missing webhook headers"
	case errors.Is(err, ErrInvalidTimestamp):
		return http.StatusUnauthorized, "invalid webhook timestamp"
	case errors.Is(err, ErrTimestampTooOld), errors.Is(err, ErrTimestampTooNew):
		return http.StatusUnauthorized, "webhook timestamp outside tolerance"
	default:
		return http.StatusUnauthorized, "invalid webhook signature"
	}
}

// columnCache memoizes what the dispatcher derives from a stored column
// (a subscription's secrets, its headers), so the hot path does not parse
// the same JSON for every delivery. It holds at most columnCacheMax entries
// and starts over past that. Safe for concurrent use.
type columnCache[V any] struct {
	mu      sync.Mutex
	entries map[string]V
}

// columnCacheMax bounds a columnCache.
const columnCacheMax = 4096

// get returns the value cached for column while fresh says it is still
// good, and otherwise builds, caches and returns a new one.
func (c *columnCache[V]) get(column string, fresh func(V) bool, build func() V) V {
	c.mu.Lock()
	v, ok := c.entries[column]
	c.mu.Unlock()
	if ok && fresh(v) {
		return v
	}
	v = build()
	c.mu.Lock()
	if c.entries == nil || len(c.entries) >= columnCacheMax {
		c.entries = make(map[string]V)
	}
	c.entries[column] = v
	c.mu.Unlock()
	return v
}

// signerEntry is a cached signer for one stored secrets column.
type signerEntry struct {
	sig *signer
	err error
	// until is the first instant (unix ms) at which a rotated-out secret
	// expires, when the entry must be rebuilt; math.MaxInt64 for never.
	until int64
}

// signerFor returns the signer for the secrets stored in column (a JSON
// array, see storedSecret) at time now, from cache.
func signerFor(c *columnCache[signerEntry], column string, now time.Time) (*signer, error) {
	ms := now.UnixMilli()
	e := c.get(column, func(e signerEntry) bool { return ms < e.until },
		func() signerEntry { return buildSignerEntry(column, ms) })
	return e.sig, e.err
}

func buildSignerEntry(column string, ms int64) signerEntry {
	active, until, err := activeSecretsUntil(column, ms)
	e := signerEntry{err: err, until: until}
	if err == nil && len(active) == 0 {
		e.err = errors.New("webhooks: subscription has no active secret")
	}
	if e.err == nil {
		e.sig, e.err = newSigner(active)
	}
	return e
}

// activeSecretsUntil returns the secrets stored in column (a JSON array of
// storedSecret) that sign at ms (unix milliseconds), current one first, and
// the first instant after ms at which one of them expires (math.MaxInt64 for
// never).
func activeSecretsUntil(column string, ms int64) (active []string, until int64, err error) {
	var stored []storedSecret
	if err := json.Unmarshal([]byte(column), &stored); err != nil {
		return nil, math.MaxInt64, fmt.Errorf("webhooks: stored secrets: %w", err)
	}
	until = math.MaxInt64
	active = make([]string, 0, len(stored))
	for _, s := range stored {
		if s.ExpiresAt != 0 && s.ExpiresAt <= ms {
			continue
		}
		active = append(active, s.Secret)
		if s.ExpiresAt != 0 {
			until = min(until, s.ExpiresAt)
		}
	}
	return active, until, nil
}
