package webhooks

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"reflect"
	"strings"
	"testing"

	"github.com/outboxhook/webhooks/internal/ssrf"
)

// These fuzz targets run their seed corpora as ordinary tests under
// `go test`; `go test -fuzz FuzzDecodeSubscription` (and the others) explore
// further.

// fuzzHandler is a handler whose decoding and validation the fuzz targets
// call directly (no database access happens there).
func fuzzHandler(t testing.TB) *handler {
	t.Helper()
	subs := newTestSubscriptions(t, openTestDB(t), nil)
	h, err := NewHandler(subs, HandlerConfig{
		UnsafeNoAuthSingleTenant: true, Resolver: handlerTestResolver,
		EventTypes: []EventTypeInfo{{Name: "order.shipped"}, {Name: "order.paid"}, {Name: "user.created"}},
		Logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	return h.(*handler)
}

// oracleForbidden is an independent judgement of addresses no callback may
// reach, built on netip's classification.
func oracleForbidden(a netip.Addr) bool {
	a = a.Unmap()
	if a.IsLoopback() || a.IsPrivate() || a.IsLinkLocalUnicast() || a.IsMulticast() || a.IsUnspecified() ||
		a.IsInterfaceLocalMulticast() || a.IsLinkLocalMulticast() || a.Zone() != "" {
		return true
	}
	for _, p := range []string{"0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15", "240.0.0.0/4", "::/96", "fec0::/10", "2001:db8::/32"} {
		if netip.MustParsePrefix(p).Contains(a) {
			return true
		}
	}
	if netip.MustParsePrefix("64:ff9b::/96").Contains(a) {
		b := a.As16()
		return oracleForbidden(netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]}))
	}
	return false
}

// checkAcceptedHost fails if a host the policy accepted could be read, by
// any parser or by the test resolver, as a forbidden address.
func checkAcceptedHost(t *testing.T, host string) {
	t.Helper()
	h := strings.ToLower(strings.TrimSuffix(strings.TrimSuffix(strings.TrimPrefix(host, "["), "]"), "."))
	if h == "localhost" || strings.HasSuffix(h, ".localhost") {
		t.Fatalf("accepted the loopback name %q", host)
	}
	if a, err := netip.ParseAddr(h); err == nil && oracleForbidden(a) {
		t.Fatalf("accepted %q, which netip reads as %s", host, a)
	}
	if ip := net.ParseIP(h); ip != nil {
		if a, ok := netip.AddrFromSlice(ip); ok && oracleForbidden(a) {
			t.Fatalf("accepted %q, which net reads as %s", host, a)
		}
	}
	if a, ok := ssrf.ParseIPv4(h); ok && oracleForbidden(a) {
		t.Fatalf("accepted %q, which inet_aton reads as %s", host, a)
	}
	if addrs, err := handlerTestResolver.LookupNetIP(context.Background(), "ip", h); err == nil {
		for _, a := range addrs {
			if oracleForbidden(a) {
				t.Fatalf("accepted %q, which resolves to %s", host, a)
			}
		}
	}
}

var hostSeeds = []string{
	"public.example", "hooks.example", "rebind.example", "metadata.example", "v6local.example", "nxdomain.example",
	"8.8.8.8", "1.1", "127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "0177.0.0.1",
	"017700000001", "127.0.0.1.", "localhost", "LOCALHOST.", "a.localhost", "[::1]", "::1", "[::ffff:127.0.0.1]",
	"[::ffff:7f00:1]", "[::127.0.0.1]", "[64:ff9b::a9fe:a9fe]", "[64:ff9b::808:808]", "[fe80::1%eth0]", "[fd00::1]",
	"169.254.169.254", "2852039166", "10.0.0.1", "012.0.0.1", "0xc0a80001", "100.64.0.1", "0.0.0.0", "0", "0x",
	"255.255.255.255", "224.0.0.1", "1.2.3.4.5", "256.1", "08", "example.123", "exa mple", "éxample.com", "",
}

func FuzzCheckHost(f *testing.F) {
	for _, s := range hostSeeds {
		f.Add(s)
	}
	var policy ssrf.Policy
	f.Fuzz(func(t *testing.T, host string) {
		if err := policy.CheckHost(context.Background(), handlerTestResolver, host); err == nil {
			checkAcceptedHost(t, host)
		}
	})
}

func FuzzCallbackURL(f *testing.F) {
	for _, s := range hostSeeds {
		f.Add("https://" + s + "/hook")
		f.Add("https://" + s + ":8443/")
	}
	for _, s := range []string{
		"https://public.example/h?x=1", "http://public.example/", "https://user:pw@public.example/", "https://public.example@127.0.0.1/",
		`https://public.example\@127.0.0.1/`, "https://%31%32%37.0.0.1/", "https://public.example/#f", "https:///x", "//public.example/",
		"javascript:alert(1)", "https:public.example", "HTTPS://PUBLIC.EXAMPLE/", "https://public.example:0/", "https://[::1]:443/",
		"https://public.example:/", "https://public.example:99999/",
	} {
		f.Add(s)
	}
	h := fuzzHandler(f)
	f.Fuzz(func(t *testing.T, raw string) {
		if d := h.checkCallbackURL(context.Background(), raw); d != "" {
			return
		}
		// Accepted: the library, net/url and net/http agree it is an
		// absolute https URL without user information, whose host is no
		// forbidden address in any reading.
		if err := validateURL(raw); err != nil {
			t.Fatalf("accepted %q, which the library refuses: %v", raw, err)
		}
		u, err := url.Parse(raw)
		if err != nil || u.Scheme != "https" || u.User != nil || u.Fragment != "" || u.Hostname() == "" {
			t.Fatalf("accepted %q: %+v %v", raw, u, err)
		}
		if _, err := http.NewRequest(http.MethodPost, raw, nil); err != nil {
			t.Fatalf("accepted %q, which net/http refuses: %v", raw, err)
		}
		checkAcceptedHost(t, u.Hostname())
	})
}

func FuzzDecodeSubscription(f *testing.F) {
	for _, s := range []string{
		`{"eventType":"order.shipped","callbackUrl":"https://public.example/h"}`,
		`{"eventTypes":["order.*","user.created"],"callbackUrl":"https://hooks.example/h","description":"d","metadata":{"k":"v"},"enabled":false}`,
		`{"eventTypes":["*"],"callbackUrl":"https://public.example/","secret":"whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}`,
		`{"eventTypes":["invoice.paid"],"callbackUrl":"https://public.example/"}`,
		`{"eventTypes":["order.*"],"callbackUrl":"https://127.1/"}`,
		`{"eventTypes":["order.*"],"callbackUrl":"https://public.example/","x":1}`,
		`{"eventTypes":["order.*"],"callbackUrl":"https://public.example/","description":"a\u0000"}`,
		`{"eventTypes":["order.*"],"callbackUrl":"https://public.example/"} {}`,
		`{"eventTypes":"order.*"}`, `[]`, `null`, `{`, `{"a":1,"a":2}`, "{\"description\":\"\xff\"}", ``,
		`{"eventTypes":[],"callbackUrl":null,"metadata":{"":"x"},"enabled":"no"}`,
		`{"eventTypes":["order.*"],"callbackUrl":"https://public.example/","headers":{"x-token":"t"},"rateLimit":2.5}`,
		`{"eventTypes":["order.*"],"callbackUrl":"https://public.example/","headers":{"Webhook-Id":"x"},"rateLimit":-1}`,
	} {
		f.Add([]byte(s))
	}
	h := fuzzHandler(f)
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, body []byte) {
		if len(body) > HandlerMaxBodyBytes {
			return
		}
		sub, p := h.decodeCreate(ctx, body)
		if _, _, pu := h.decodeUpdate(ctx, body); pu != nil {
			checkFuzzProblem(t, pu)
		}
		if p != nil {
			checkFuzzProblem(t, p)
			return
		}
		// Accepted: the library accepts it too...
		stored := sub
		stored.Tenant = "t"
		if stored.Secret == "" {
			stored.Secret = SecretPrefix + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
		}
		if err := validateSubscription(&stored); err != nil {
			t.Fatalf("handler accepted %q, library refuses: %v", body, err)
		}
		u, err := url.Parse(sub.URL)
		if err != nil {
			t.Fatal(err)
		}
		checkAcceptedHost(t, u.Hostname())
		// ...and it round-trips through its canonical JSON form.
		canon := map[string]any{"eventTypes": sub.EventTypes, "callbackUrl": sub.URL, "description": sub.Description, "enabled": !sub.Disabled}
		if sub.Secret != "" {
			canon["secret"] = sub.Secret
		}
		if sub.Metadata != nil {
			canon["metadata"] = sub.Metadata
		}
		if sub.Headers != nil {
			canon["headers"] = sub.Headers
		}
		if sub.RateLimit != 0 {
			canon["rateLimit"] = sub.RateLimit
		}
		b, err := json.Marshal(canon)
		if err != nil {
			t.Fatal(err)
		}
		again, p := h.decodeCreate(ctx, b)
		if p != nil {
			t.Fatalf("accepted %q but not its canonical form %s: %+v", body, b, p)
		}
		if !reflect.DeepEqual(again, sub) {
			t.Fatalf("round trip of %q:\n%+v\n%+v", body, sub, again)
		}
	})
}

func checkFuzzProblem(t *testing.T, p *problem) {
	t.Helper()
	if (p.Status != 400 && p.Status != 422) || !strings.HasPrefix(p.Type, problemTypeBase) || p.Detail == "" {
		t.Fatalf("problem %+v", p)
	}
	if _, err := json.Marshal(p); err != nil {
		t.Fatal(err)
	}
}
