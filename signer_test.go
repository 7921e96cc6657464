package webhooks

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
)

// The official test vector of the Standard Webhooks specification.
const (
	swVectorSecret    = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	swVectorID        = "msg_p5jXN8AQM9LWM0D4loKWxJek"
	swVectorUnix      = 1614265330
	swVectorBody      = `{"test": 2432232314}`
	swVectorSignature = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
)

// sigFixedNow returns a Now func pinned to t.
func sigFixedNow(t time.Time) func() time.Time {
	return func() time.Time { return t }
}

// sigTestSecret returns a valid secret whose key is n deterministic bytes
// derived from seed.
func sigTestSecret(n int, seed byte) string {
	key := make([]byte, n)
	for i := range key {
		key[i] = seed + byte(i*7+3)
	}
	return SecretPrefix + base64.StdEncoding.EncodeToString(key)
}

// sigMustNewSecret returns NewSecret's secret or fails the test.
func sigMustNewSecret(t *testing.T) string {
	t.Helper()
	s, err := NewSecret()
	if err != nil {
		t.Fatalf("NewSecret: %v", err)
	}
	return s
}

// sigSignedHeaders returns the three webhook headers for a message signed by
// every secret in secrets.
func sigSignedHeaders(t *testing.T, secrets []string, id string, unix int64, body []byte) http.Header {
	t.Helper()
	s, err := newSigner(secrets)
	if err != nil {
		t.Fatalf("newSigner: %v", err)
	}
	h := http.Header{}
	h.Set(HeaderWebhookID, id)
	h.Set(HeaderWebhookTimestamp, strconv.FormatInt(unix, 10))
	h.Set(HeaderWebhookSignature, s.header(id, unix, body))
	return h
}

func TestSignOfficialVector(t *testing.T) {
	ts := time.Unix(swVectorUnix, 0)

	got, err := Sign(swVectorSecret, swVectorID, ts, []byte(swVectorBody))
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	if got != swVectorSignature {
		t.Errorf("Sign = %q, want %q", got, swVectorSignature)
	}

	s, err := newSigner([]string{swVectorSecret})
	if err != nil {
		t.Fatalf("newSigner: %v", err)
	}
	// Twice, so that the second call uses pooled hash state.
	for i := 0; i < 2; i++ {
		if got := s.header(swVectorID, swVectorUnix, []byte(swVectorBody)); got != swVectorSignature {
			t.Errorf("signer.header (call %d) = %q, want %q", i+1, got, swVectorSignature)
		}
	}

	// A signer built as a literal, without pools, signs the same.
	lit := &signer{keys: s.keys}
	if got := lit.header(swVectorID, swVectorUnix, []byte(swVectorBody)); got != swVectorSignature {
		t.Errorf("literal signer.header = %q, want %q", got, swVectorSignature)
	}

	h := http.Header{}
	h.Set(HeaderWebhookID, swVectorID)
	h.Set(HeaderWebhookTimestamp, strconv.Itoa(swVectorUnix))
	h.Set(HeaderWebhookSignature, swVectorSignature)

	v, err := NewVerifier(swVectorSecret)
	if err != nil {
		t.Fatalf("NewVerifier: %v", err)
	}
	v.Now = sigFixedNow(ts)
	if err := v.Verify(h, []byte(swVectorBody)); err != nil {
		t.Errorf("Verify(official vector) = %v, want nil", err)
	}

	// The reference library agrees on the vector.
	ref, err := standardwebhooks.NewWebhook(swVectorSecret)
	if err != nil {
		t.Fatalf("reference NewWebhook: %v", err)
	}
	refSig, err := ref.Sign(swVectorID, ts, []byte(swVectorBody))
	if err != nil {
		t.Fatalf("reference Sign: %v", err)
	}
	if refSig != swVectorSignature {
		t.Errorf("reference Sign = %q, want %q", refSig, swVectorSignature)
	}
}

func TestInteropWithReferenceLibrary(t *testing.T) {
	secret := sigMustNewSecret(t)
	ref, err := standardwebhooks.NewWebhook(secret)
	if err != nil {
		t.Fatalf("reference NewWebhook: %v", err)
	}
	body := []byte(`{"type":"invoice.paid","data":{"id":"inv_1","amount":4200}}`)
	now := time.Now()

	t.Run("reference verifies ours", func(t *testing.T) {
		sig, err := Sign(secret, "msg_ours", now, body)
		if err != nil {
			t.Fatalf("Sign: %v", err)
		}
		h := http.Header{}
		h.Set(HeaderWebhookID, "msg_ours")
		h.Set(HeaderWebhookTimestamp, strconv.FormatInt(now.Unix(), 10))
		h.Set(HeaderWebhookSignature, sig)
		if err := ref.Verify(body, h); err != nil {
			t.Errorf("reference Verify(our signature) = %v", err)
		}

		// Our multi-secret header too, with the reference holding either key.
		other := sigMustNewSecret(t)
		multi := sigSignedHeaders(t, []string{other, secret}, "msg_multi", now.Unix(), body)
		if err := ref.Verify(body, multi); err != nil {
			t.Errorf("reference Verify(our two-secret header) = %v", err)
		}
	})

	t.Run("we verify the reference's", func(t *testing.T) {
		sig, err := ref.Sign("msg_theirs", now, body)
		if err != nil {
			t.Fatalf("reference Sign: %v", err)
		}
		h := http.Header{}
		h.Set(standardwebhooks.HeaderWebhookID, "msg_theirs")
		h.Set(standardwebhooks.HeaderWebhookTimestamp, strconv.FormatInt(now.Unix(), 10))
		h.Set(standardwebhooks.HeaderWebhookSignature, sig)
		if err := Verify(secret, h, body); err != nil {
			t.Errorf("Verify(reference signature) = %v", err)
		}
		if err := Verify(secret, h, append(body, ' ')); !errors.Is(err, ErrNoMatchingSignature) {
			t.Errorf("Verify(reference signature, changed body) = %v, want ErrNoMatchingSignature", err)
		}
	})
}

func TestSignerMultipleSecrets(t *testing.T) {
	first, second, third := sigTestSecret(32, 1), sigTestSecret(32, 2), sigTestSecret(32, 3)
	now := time.Unix(1_700_000_000, 0)
	body := []byte(`{"rotated":true}`)
	h := sigSignedHeaders(t, []string{first, second}, "msg_rot", now.Unix(), body)

	entries := strings.Split(h.Get(HeaderWebhookSignature), " ")
	if len(entries) != 2 {
		t.Fatalf("signature header %q has %d entries, want 2", h.Get(HeaderWebhookSignature), len(entries))
	}
	for i, secret := range []string{first, second} {
		want, err := Sign(secret, "msg_rot", now, body)
		if err != nil {
			t.Fatalf("Sign: %v", err)
		}
		if entries[i] != want {
			t.Errorf("entry %d = %q, want %q (key order)", i, entries[i], want)
		}
	}

	onlySecond := &Verifier{Secrets: []string{second}, Now: sigFixedNow(now)}
	if err := onlySecond.Verify(h, body); err != nil {
		t.Errorf("verifier with the second secret: %v, want nil", err)
	}
	rotated := &Verifier{Secrets: []string{third, second}, Now: sigFixedNow(now)}
	if err := rotated.Verify(h, body); err != nil {
		t.Errorf("verifier with [third, second]: %v, want nil", err)
	}
	neither := &Verifier{Secrets: []string{third}, Now: sigFixedNow(now)}
	if err := neither.Verify(h, body); !errors.Is(err, ErrNoMatchingSignature) {
		t.Errorf("verifier with neither secret: %v, want ErrNoMatchingSignature", err)
	}
}

func TestVerifierVerifyFailures(t *testing.T) {
	secret := sigTestSecret(32, 10)
	wrong := sigTestSecret(32, 11)
	now := time.Unix(1_700_000_000, 0)
	body := []byte(`{"event":"x"}`)
	const id = "msg_table"

	// sigAt is the v1 signature of body for id at unix, under secret.
	sigAt := func(t *testing.T, unix int64) string {
		t.Helper()
		sig, err := Sign(secret, id, time.Unix(unix, 0), body)
		if err != nil {
			t.Fatalf("Sign: %v", err)
		}
		return sig
	}
	// at returns headers signed at unix.
	at := func(t *testing.T, unix int64) http.Header {
		return sigSignedHeaders(t, []string{secret}, id, unix, body)
	}
	tol := int64(VerifyToleranceDefault / time.Second)

	tests := []struct {
		name      string
		headers   func(t *testing.T) http.Header
		body      []byte // nil means body
		secrets   []string
		tolerance time.Duration
		want      error // nil means accepted
	}{
		{name: "valid", headers: func(t *testing.T) http.Header { return at(t, now.Unix()) }},
		{name: "missing id", want: ErrMissingHeaders, headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			h.Del(HeaderWebhookID)
			return h
		}},
		{name: "missing timestamp", want: ErrMissingHeaders, headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			h.Del(HeaderWebhookTimestamp)
			return h
		}},
		{name: "missing signature", want: ErrMissingHeaders, headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			h.Del(HeaderWebhookSignature)
			return h
		}},
		{name: "empty signature", want: ErrMissingHeaders, headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			h.Set(HeaderWebhookSignature, "")
			return h
		}},
		{name: "no headers", want: ErrMissingHeaders, headers: func(t *testing.T) http.Header { return http.Header{} }},
		{name: "nil headers", want: ErrMissingHeaders, headers: func(t *testing.T) http.Header { return nil }},
		{name: "non-numeric timestamp", want: ErrInvalidTimestamp, headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			h.Set(HeaderWebhookTimestamp, "yesterday")
			return h
		}},
		{name: "fractional timestamp", want: ErrInvalidTimestamp, headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			h.Set(HeaderWebhookTimestamp, strconv.FormatInt(now.Unix(), 10)+".5")
			return h
		}},
		{name: "signed timestamp", want: ErrInvalidTimestamp, headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			h.Set(HeaderWebhookTimestamp, "+"+strconv.FormatInt(now.Unix(), 10))
			return h
		}},
		{name: "RFC 3339 timestamp", want: ErrInvalidTimestamp, headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			h.Set(HeaderWebhookTimestamp, now.UTC().Format(time.RFC3339))
			return h
		}},
		{name: "overflowing timestamp", want: ErrInvalidTimestamp, headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			h.Set(HeaderWebhookTimestamp, "99999999999999999999999")
			return h
		}},
		{name: "exactly tolerance old", headers: func(t *testing.T) http.Header { return at(t, now.Unix()-tol) }},
		{name: "just too old", want: ErrTimestampTooOld, headers: func(t *testing.T) http.Header { return at(t, now.Unix()-tol-1) }},
		{name: "far too old", want: ErrTimestampTooOld, headers: func(t *testing.T) http.Header { return at(t, 0) }},
		{name: "exactly tolerance new", headers: func(t *testing.T) http.Header { return at(t, now.Unix()+tol) }},
		{name: "just too new", want: ErrTimestampTooNew, headers: func(t *testing.T) http.Header { return at(t, now.Unix()+tol+1) }},
		{name: "custom tolerance accepted", tolerance: 10 * time.Second, headers: func(t *testing.T) http.Header { return at(t, now.Unix()-10) }},
		{name: "custom tolerance too old", tolerance: 10 * time.Second, want: ErrTimestampTooOld, headers: func(t *testing.T) http.Header { return at(t, now.Unix()-11) }},
		{name: "custom tolerance too new", tolerance: 10 * time.Second, want: ErrTimestampTooNew, headers: func(t *testing.T) http.Header { return at(t, now.Unix()+11) }},
		{name: "tampered body", body: []byte(`{"event":"y"}`), want: ErrNoMatchingSignature, headers: func(t *testing.T) http.Header { return at(t, now.Unix()) }},
		{name: "empty body", body: []byte{}, want: ErrNoMatchingSignature, headers: func(t *testing.T) http.Header { return at(t, now.Unix()) }},
		{name: "tampered id", want: ErrNoMatchingSignature, headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			h.Set(HeaderWebhookID, id+"x")
			return h
		}},
		{name: "tampered timestamp within tolerance", want: ErrNoMatchingSignature, headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			h.Set(HeaderWebhookTimestamp, strconv.FormatInt(now.Unix()-1, 10))
			return h
		}},
		{name: "wrong secret", secrets: []string{wrong}, want: ErrNoMatchingSignature, headers: func(t *testing.T) http.Header { return at(t, now.Unix()) }},
		{name: "garbage signature entries", want: ErrNoMatchingSignature, headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			h.Set(HeaderWebhookSignature, "garbage v1 v1, , ,,, v1,!!!not-base64!!! v1,AAAA v1,"+strings.Repeat("A", 44))
			return h
		}},
		{name: "v1a entry ignored", want: ErrNoMatchingSignature, headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			_, sig, _ := strings.Cut(sigAt(t, now.Unix()), ",")
			h.Set(HeaderWebhookSignature, "v1a,"+sig+" v2,"+sig+" V1,"+sig)
			return h
		}},
		{name: "v1 entry among others accepted", headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			_, sig, _ := strings.Cut(sigAt(t, now.Unix()), ",")
			h.Set(HeaderWebhookSignature, "v1a,"+sig+"  garbage v1,AAAA "+sigAt(t, now.Unix())+" v2,xyz")
			return h
		}},
		{name: "signature in a second header line", headers: func(t *testing.T) http.Header {
			h := at(t, now.Unix())
			h.Set(HeaderWebhookSignature, "v1,AAAA")
			h.Add(HeaderWebhookSignature, sigAt(t, now.Unix()))
			return h
		}},
		{name: "lower-case map keys", headers: func(t *testing.T) http.Header {
			return http.Header{
				HeaderWebhookID:        {id},
				HeaderWebhookTimestamp: {strconv.FormatInt(now.Unix(), 10)},
				HeaderWebhookSignature: {sigAt(t, now.Unix())},
			}
		}},
		{name: "no secrets", secrets: []string{}, want: ErrInvalidSecret, headers: func(t *testing.T) http.Header { return at(t, now.Unix()) }},
		{name: "invalid secret", secrets: []string{"whsec_short"}, want: ErrInvalidSecret, headers: func(t *testing.T) http.Header { return at(t, now.Unix()) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			secrets := tt.secrets
			if secrets == nil {
				secrets = []string{secret}
			}
			b := tt.body
			if b == nil {
				b = body
			}
			v := &Verifier{Secrets: secrets, Tolerance: tt.tolerance, Now: sigFixedNow(now)}
			err := v.Verify(tt.headers(t), b)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("Verify = %v, want nil", err)
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("Verify = %v, want %v", err, tt.want)
			}
			for _, s := range append(secrets, secret, wrong) {
				if s != "" && strings.Contains(err.Error(), strings.TrimPrefix(s, SecretPrefix)) {
					t.Errorf("error %q contains a secret", err)
				}
			}
		})
	}
}

func TestVerifierToleranceAndNowDefaults(t *testing.T) {
	secret := sigTestSecret(32, 20)
	body := []byte("{}")
	// Now nil means time.Now: a message signed now is accepted, one signed
	// an hour ago is not.
	v := &Verifier{Secrets: []string{secret}}
	if err := v.Verify(sigSignedHeaders(t, []string{secret}, "msg_now", time.Now().Unix(), body), body); err != nil {
		t.Errorf("Verify(now) = %v", err)
	}
	if err := v.Verify(sigSignedHeaders(t, []string{secret}, "msg_old", time.Now().Add(-time.Hour).Unix(), body), body); !errors.Is(err, ErrTimestampTooOld) {
		t.Errorf("Verify(an hour ago) = %v, want ErrTimestampTooOld", err)
	}
	// A negative tolerance means the default, not "no check".
	now := time.Unix(1_700_000_000, 0)
	neg := &Verifier{Secrets: []string{secret}, Tolerance: -time.Second, Now: sigFixedNow(now)}
	if err := neg.Verify(sigSignedHeaders(t, []string{secret}, "m", now.Unix()-60, body), body); err != nil {
		t.Errorf("negative tolerance, 60s old: %v, want nil", err)
	}
	// Now with sub-second precision: tolerance is measured from the instant.
	frac := &Verifier{Secrets: []string{secret}, Now: sigFixedNow(now.Add(500 * time.Millisecond))}
	if err := frac.Verify(sigSignedHeaders(t, []string{secret}, "m", now.Unix()-int64(VerifyToleranceDefault/time.Second), body), body); !errors.Is(err, ErrTimestampTooOld) {
		t.Errorf("tolerance+0.5s old: %v, want ErrTimestampTooOld", err)
	}
}

func TestVerifierConcurrentLazyInit(t *testing.T) {
	secret := sigTestSecret(48, 30)
	now := time.Unix(1_700_000_000, 0)
	body := []byte(`{"concurrent":true}`)
	h := sigSignedHeaders(t, []string{secret}, "msg_conc", now.Unix(), body)
	bad := h.Clone()
	bad.Set(HeaderWebhookID, "msg_other")

	v := &Verifier{Secrets: []string{secret}, Now: sigFixedNow(now)} // literal: lazy parse
	var wg sync.WaitGroup
	var failures atomic.Int32
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				if err := v.Verify(h, body); err != nil {
					failures.Add(1)
				}
				if err := v.Verify(bad, body); !errors.Is(err, ErrNoMatchingSignature) {
					failures.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if n := failures.Load(); n != 0 {
		t.Errorf("%d unexpected results from concurrent Verify", n)
	}
}

func TestSignerConcurrent(t *testing.T) {
	s, err := newSigner([]string{swVectorSecret, sigTestSecret(32, 40)})
	if err != nil {
		t.Fatalf("newSigner: %v", err)
	}
	want := s.header(swVectorID, swVectorUnix, []byte(swVectorBody))
	if !strings.HasPrefix(want, swVectorSignature+" v1,") {
		t.Fatalf("header = %q, want the vector signature first", want)
	}
	var wg sync.WaitGroup
	var mismatches atomic.Int32
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 100; i++ {
				// Interleave other messages to catch state leaking between uses.
				_ = s.header(fmt.Sprintf("msg_%d_%d", g, i), int64(i), bytes.Repeat([]byte{'x'}, i))
				if s.header(swVectorID, swVectorUnix, []byte(swVectorBody)) != want {
					mismatches.Add(1)
				}
			}
		}(g)
	}
	wg.Wait()
	if n := mismatches.Load(); n != 0 {
		t.Errorf("%d mismatched headers under concurrency", n)
	}
}

func TestNewSignerErrors(t *testing.T) {
	if _, err := newSigner(nil); !errors.Is(err, ErrInvalidSecret) {
		t.Errorf("newSigner(nil) = %v, want ErrInvalidSecret", err)
	}
	bad := "whsec_" + base64.StdEncoding.EncodeToString(make([]byte, 10))
	_, err := newSigner([]string{swVectorSecret, bad})
	if !errors.Is(err, ErrInvalidSecret) {
		t.Fatalf("newSigner(good, bad) = %v, want ErrInvalidSecret", err)
	}
	if !strings.Contains(err.Error(), "secret 2 of 2") {
		t.Errorf("error %q does not say which secret is bad", err)
	}
	if strings.Contains(err.Error(), bad) || strings.Contains(err.Error(), swVectorSecret) {
		t.Errorf("error %q contains a secret", err)
	}
	if _, err := NewVerifier(); !errors.Is(err, ErrInvalidSecret) {
		t.Errorf("NewVerifier() = %v, want ErrInvalidSecret", err)
	}
	if _, err := NewVerifier(swVectorSecret, bad); !errors.Is(err, ErrInvalidSecret) {
		t.Errorf("NewVerifier(good, bad) = %v, want ErrInvalidSecret", err)
	}
	if _, err := Sign(bad, "id", time.Now(), nil); !errors.Is(err, ErrInvalidSecret) {
		t.Errorf("Sign(bad) = %v, want ErrInvalidSecret", err)
	}
	if err := Verify(bad, http.Header{}, nil); !errors.Is(err, ErrInvalidSecret) {
		t.Errorf("Verify(bad) = %v, want ErrInvalidSecret", err)
	}
}

func TestNewVerifierCopiesSecrets(t *testing.T) {
	secrets := []string{swVectorSecret}
	v, err := NewVerifier(secrets...)
	if err != nil {
		t.Fatalf("NewVerifier: %v", err)
	}
	secrets[0] = "mutated"
	if v.Secrets[0] != swVectorSecret {
		t.Errorf("Verifier.Secrets aliases the caller's slice")
	}
}

func TestParseSecret(t *testing.T) {
	keyOf := func(n int) []byte {
		k := make([]byte, n)
		for i := range k {
			k[i] = byte(i*13 + 5)
		}
		return k
	}
	std := func(n int) string { return SecretPrefix + base64.StdEncoding.EncodeToString(keyOf(n)) }
	raw := func(n int) string { return SecretPrefix + base64.RawStdEncoding.EncodeToString(keyOf(n)) }

	tests := []struct {
		name    string
		secret  string
		wantLen int    // for valid secrets
		wantMsg string // for invalid secrets: a substring of the error
	}{
		{name: "valid 24 bytes", secret: std(24), wantLen: 24},
		{name: "valid 32 bytes", secret: std(32), wantLen: 32},
		{name: "valid 64 bytes", secret: std(64), wantLen: 64},
		{name: "valid unpadded 32 bytes", secret: raw(32), wantLen: 32},
		{name: "valid unpadded 25 bytes", secret: raw(25), wantLen: 25},
		{name: "official vector", secret: swVectorSecret, wantLen: 24},
		{name: "too short 16 bytes", secret: std(16), wantMsg: "decodes to 16 bytes; want 24 to 64"},
		{name: "too short 23 bytes", secret: std(23), wantMsg: "decodes to 23 bytes; want 24 to 64"},
		{name: "too long 65 bytes", secret: std(65), wantMsg: "decodes to 65 bytes; want 24 to 64"},
		{name: "empty key", secret: SecretPrefix, wantMsg: "decodes to 0 bytes"},
		{name: "not base64", secret: SecretPrefix + "this is not base64 at all!!", wantMsg: "not base64"},
		{name: "url-safe alphabet", secret: SecretPrefix + strings.Repeat("-_", 16), wantMsg: "not base64"},
		{name: "bad padding", secret: std(32)[:len(std(32))-1] + "==", wantMsg: "not base64"},
		{name: "missing prefix", secret: strings.TrimPrefix(std(32), SecretPrefix), wantMsg: "must start with"},
		{name: "wrong prefix", secret: "whsk_" + strings.TrimPrefix(std(32), SecretPrefix), wantMsg: "must start with"},
		{name: "upper-case prefix", secret: "WHSEC_" + strings.TrimPrefix(std(32), SecretPrefix), wantMsg: "must start with"},
		{name: "empty", secret: "", wantMsg: "must start with"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key, err := ParseSecret(tt.secret)
			if tt.wantMsg == "" {
				if err != nil {
					t.Fatalf("ParseSecret = %v, want nil", err)
				}
				if len(key) != tt.wantLen {
					t.Fatalf("key is %d bytes, want %d", len(key), tt.wantLen)
				}
				if tt.wantLen != 24 || tt.secret != swVectorSecret {
					if !bytes.Equal(key, keyOf(tt.wantLen)) {
						t.Errorf("key = %x, want %x", key, keyOf(tt.wantLen))
					}
				}
				return
			}
			if !errors.Is(err, ErrInvalidSecret) {
				t.Fatalf("ParseSecret = %v, want ErrInvalidSecret", err)
			}
			if key != nil {
				t.Errorf("ParseSecret returned a key with an error")
			}
			msg := err.Error()
			if !strings.Contains(msg, tt.wantMsg) {
				t.Errorf("error %q does not contain %q", msg, tt.wantMsg)
			}
			if encoded := strings.TrimPrefix(tt.secret, SecretPrefix); len(encoded) >= 8 && strings.Contains(msg, encoded) {
				t.Errorf("error %q contains the secret", msg)
			}
			if tt.secret != "" && tt.secret != SecretPrefix && strings.Contains(msg, tt.secret) {
				t.Errorf("error %q contains the secret", msg)
			}
		})
	}
}

func TestNewSecret(t *testing.T) {
	a, err := NewSecret()
	if err != nil {
		t.Fatalf("NewSecret: %v", err)
	}
	b := sigMustNewSecret(t)
	for _, s := range []string{a, b} {
		if !strings.HasPrefix(s, SecretPrefix) {
			t.Errorf("secret %q lacks prefix %q", s, SecretPrefix)
		}
		key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(s, SecretPrefix))
		if err != nil {
			t.Fatalf("secret is not standard base64: %v", err)
		}
		if len(key) != 32 {
			t.Errorf("secret decodes to %d bytes, want 32", len(key))
		}
		if _, err := ParseSecret(s); err != nil {
			t.Errorf("ParseSecret(NewSecret()) = %v", err)
		}
	}
	if a == b {
		t.Errorf("two NewSecret calls returned the same secret")
	}
}

// sigMiddlewareServer starts a real HTTP server whose handler is
// v.Middleware around a handler that echoes the body it reads and counts
// its calls.
func sigMiddlewareServer(t *testing.T, v *Verifier) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	var calls atomic.Int32
	next := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		b, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, "next: "+err.Error(), http.StatusInternalServerError)
			return
		}
		if r.ContentLength != int64(len(b)) {
			http.Error(w, fmt.Sprintf("next: ContentLength %d, read %d", r.ContentLength, len(b)), http.StatusInternalServerError)
			return
		}
		w.Header().Set("X-Webhook-ID", r.Header.Get(HeaderWebhookID))
		w.Write(b)
	})
	srv := httptest.NewServer(v.Middleware(next))
	t.Cleanup(srv.Close)
	return srv, &calls
}

// sigPost sends body with headers h to srv and returns the status and reply.
// A body of a type whose length net/http cannot tell is sent chunked.
func sigPost(t *testing.T, srv *httptest.Server, h http.Header, body io.Reader) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, srv.URL, body)
	if err != nil {
		t.Fatalf("NewRequest: %v", err)
	}
	for k, vs := range h {
		req.Header[k] = vs
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatalf("POST: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading response: %v", err)
	}
	return resp.StatusCode, string(b)
}

func TestVerifierMiddleware(t *testing.T) {
	secret := sigMustNewSecret(t)
	now := time.Unix(1_700_000_000, 0)
	v, err := NewVerifier(secret)
	if err != nil {
		t.Fatalf("NewVerifier: %v", err)
	}
	v.Now = sigFixedNow(now)
	v.MaxBodyBytes = 256
	srv, calls := sigMiddlewareServer(t, v)

	body := []byte(`{"type":"order.created","data":{"id":"ord_1"}}`)
	signed := sigSignedHeaders(t, []string{secret}, "msg_mw", now.Unix(), body)

	t.Run("valid reaches next with full body", func(t *testing.T) {
		before := calls.Load()
		code, got := sigPost(t, srv, signed, bytes.NewReader(body))
		if code != http.StatusOK || got != string(body) {
			t.Fatalf("got %d %q, want 200 %q", code, got, body)
		}
		if calls.Load() != before+1 {
			t.Errorf("next called %d times, want 1", calls.Load()-before)
		}
	})

	t.Run("valid chunked body", func(t *testing.T) {
		code, got := sigPost(t, srv, signed, io.MultiReader(bytes.NewReader(body)))
		if code != http.StatusOK || got != string(body) {
			t.Fatalf("got %d %q, want 200 %q", code, got, body)
		}
	})

	t.Run("body at the limit", func(t *testing.T) {
		big := bytes.Repeat([]byte("a"), 256)
		h := sigSignedHeaders(t, []string{secret}, "msg_big", now.Unix(), big)
		code, got := sigPost(t, srv, h, bytes.NewReader(big))
		if code != http.StatusOK || got != string(big) {
			t.Fatalf("got %d (%d bytes), want 200 with the body", code, len(got))
		}
	})

	rejects := []struct {
		name     string
		headers  http.Header
		body     func() io.Reader
		wantCode int
		wantMsg  string
	}{
		{name: "tampered body", headers: signed, body: func() io.Reader { return strings.NewReader(`{"type":"order.deleted"}`) },
			wantCode: http.StatusUnauthorized, wantMsg: "invalid webhook signature"},
		{name: "unsigned", headers: http.Header{}, body: func() io.Reader { return bytes.NewReader(body) },
			wantCode: http.StatusUnauthorized, wantMsg: "missing webhook headers"},
		{name: "stale", headers: sigSignedHeaders(t, []string{secret}, "msg_old", now.Unix()-3600, body), body: func() io.Reader { return bytes.NewReader(body) },
			wantCode: http.StatusUnauthorized, wantMsg: "webhook timestamp outside tolerance"},
		{name: "bad timestamp", headers: func() http.Header {
			h := signed.Clone()
			h.Set(HeaderWebhookTimestamp, "soon")
			return h
		}(), body: func() io.Reader { return bytes.NewReader(body) },
			wantCode: http.StatusUnauthorized, wantMsg: "invalid webhook timestamp"},
		{name: "oversized with length", headers: signed, body: func() io.Reader { return bytes.NewReader(bytes.Repeat([]byte("a"), 257)) },
			wantCode: http.StatusRequestEntityTooLarge, wantMsg: "too large"},
		{name: "oversized chunked", headers: signed, body: func() io.Reader { return io.MultiReader(bytes.NewReader(bytes.Repeat([]byte("a"), 257))) },
			wantCode: http.StatusRequestEntityTooLarge, wantMsg: "too large"},
	}
	for _, tt := range rejects {
		t.Run(tt.name, func(t *testing.T) {
			before := calls.Load()
			code, got := sigPost(t, srv, tt.headers, tt.body())
			if code != tt.wantCode {
				t.Errorf("status = %d, want %d (body %q)", code, tt.wantCode, got)
			}
			if !strings.Contains(got, tt.wantMsg) {
				t.Errorf("body %q does not contain %q", got, tt.wantMsg)
			}
			if strings.Contains(got, strings.TrimPrefix(secret, SecretPrefix)) {
				t.Errorf("response %q leaks the secret", got)
			}
			if n := calls.Load() - before; n != 0 {
				t.Errorf("next called %d times, want 0", n)
			}
		})
	}
}

func TestVerifierMiddlewareDefaultLimitAndMisconfiguration(t *testing.T) {
	secret := sigTestSecret(32, 50)
	now := time.Unix(1_700_000_000, 0)
	v := &Verifier{Secrets: []string{secret}, Now: sigFixedNow(now)} // literal, MaxBodyBytes 0
	var calls atomic.Int32
	h := v.Middleware(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprint(w, n)
	}))

	serve := func(body []byte, hdr http.Header) *httptest.ResponseRecorder {
		req := httptest.NewRequest(http.MethodPost, "/hook", bytes.NewReader(body))
		for k, vs := range hdr {
			req.Header[k] = vs
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec
	}

	atLimit := bytes.Repeat([]byte("z"), 1<<20)
	rec := serve(atLimit, sigSignedHeaders(t, []string{secret}, "m1", now.Unix(), atLimit))
	if rec.Code != http.StatusOK || rec.Body.String() != strconv.Itoa(1<<20) {
		t.Errorf("1 MiB body: %d %q, want 200 %d", rec.Code, rec.Body.String(), 1<<20)
	}
	over := append(atLimit, 'z')
	rec = serve(over, sigSignedHeaders(t, []string{secret}, "m2", now.Unix(), over))
	if rec.Code != http.StatusRequestEntityTooLarge {
		t.Errorf("1 MiB + 1 body: %d, want 413", rec.Code)
	}
	if calls.Load() != 1 {
		t.Errorf("next called %d times, want 1", calls.Load())
	}

	broken := &Verifier{Secrets: []string{"whsec_tooshort"}}
	var brokenCalls atomic.Int32
	bh := broken.Middleware(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { brokenCalls.Add(1) }))
	req := httptest.NewRequest(http.MethodPost, "/hook", strings.NewReader("{}"))
	rec = httptest.NewRecorder()
	bh.ServeHTTP(rec, req)
	if rec.Code != http.StatusInternalServerError || strings.Contains(rec.Body.String(), "tooshort") {
		t.Errorf("misconfigured verifier: %d %q, want 500 without the secret", rec.Code, rec.Body.String())
	}
	if brokenCalls.Load() != 0 {
		t.Errorf("misconfigured verifier called next")
	}
}

func BenchmarkSignerHeader(b *testing.B) {
	s, err := newSigner([]string{swVectorSecret, sigTestSecret(32, 60)})
	if err != nil {
		b.Fatal(err)
	}
	body := bytes.Repeat([]byte(`{"k":"v"}`), 100)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		_ = s.header(swVectorID, swVectorUnix, body)
	}
}

func BenchmarkVerifierVerify(b *testing.B) {
	now := time.Unix(swVectorUnix, 0)
	v := &Verifier{Secrets: []string{swVectorSecret}, Now: sigFixedNow(now)}
	h := http.Header{}
	h.Set(HeaderWebhookID, swVectorID)
	h.Set(HeaderWebhookTimestamp, strconv.Itoa(swVectorUnix))
	h.Set(HeaderWebhookSignature, swVectorSignature)
	body := []byte(swVectorBody)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := v.Verify(h, body); err != nil {
			b.Fatal(err)
		}
	}
}
