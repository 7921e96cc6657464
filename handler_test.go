package webhooks

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outboxhook/webhooks/internal/ssrf"
)

// fixedResolver answers DNS questions from a table, so tests never query
// real DNS. Unknown names do not exist.
type fixedResolver map[string][]string

func (f fixedResolver) LookupNetIP(_ context.Context, network, host string) ([]netip.Addr, error) {
	addrs, ok := f[host]
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		out = append(out, netip.MustParseAddr(a))
	}
	return out, nil
}

// handlerTestResolver: *.example names resolve to public addresses, which no
// test ever connects to, except those meant to resolve to private ones.
var handlerTestResolver = fixedResolver{
	"public.example":   {"93.184.216.34"},
	"hooks.example":    {"93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"},
	"rebind.example":   {"93.184.216.34", "10.0.0.1"},
	"metadata.example": {"169.254.169.254"},
	"v6local.example":  {"::1"},
	// rebinding.example is public when the subscription is created; the
	// dial-time test then makes it resolve to 127.0.0.1.
	"rebinding.example": {"93.184.216.34"},
}

var handlerTestTokens = map[string]string{"tok-acme": "acme", "tok-globex": "globex"}

// handlerTestAuthenticate accepts "Authorization: Bearer tok-<tenant>".
func handlerTestAuthenticate(r *http.Request) (string, error) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return "", errors.New("no bearer token")
	}
	tenant, ok := handlerTestTokens[tok]
	if !ok {
		return "", errors.New("unknown token " + tok)
	}
	return tenant, nil
}

// testAPI is a handler mounted under /api on a real HTTP server over a real
// SQLite database.
type testAPI struct {
	t    testing.TB
	db   *sql.DB
	subs *Subscriptions
	srv  *httptest.Server
	base string
	// record, when set, is called with every exchange (for the OpenAPI
	// conformance test).
	record func(ex apiExchange)
}

// apiExchange is one request and its response, with the operation it was
// meant for ("" op for a request that matches no operation).
type apiExchange struct {
	Method, Template string
	Status           int
	Header           http.Header
	Body             []byte
}

func (ex apiExchange) json(t testing.TB) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(ex.Body, &m); err != nil {
		t.Fatalf("%s %s: body %q is not a JSON object: %v", ex.Method, ex.Template, ex.Body, err)
	}
	return m
}

func newTestAPI(t testing.TB, cfg HandlerConfig) *testAPI {
	t.Helper()
	db := openTestDB(t)
	return newTestAPIOn(t, db, cfg)
}

func newTestAPIOn(t testing.TB, db *sql.DB, cfg HandlerConfig) *testAPI {
	t.Helper()
	subs := newTestSubscriptions(t, db, nil)
	if cfg.Authenticate == nil && !cfg.UnsafeNoAuthSingleTenant {
		cfg.Authenticate = handlerTestAuthenticate
	}
	if cfg.Resolver == nil {
		cfg.Resolver = handlerTestResolver
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	h, err := NewHandler(subs, cfg)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/api/", http.StripPrefix("/api", h))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return &testAPI{t: t, db: db, subs: subs, srv: srv, base: srv.URL + "/api"}
}

// req describes one request to the API.
type apiReq struct {
	method, path string // path below the mount point
	template     string // the operation's path template; "" means path
	token        string // bearer token; "" sends none
	ctype        string // Content-Type; "" sends none
	body         string
	bodyReader   io.Reader // instead of body: streamed without length
	header       map[string]string
}

func (a *testAPI) do(r apiReq) apiExchange {
	a.t.Helper()
	var body io.Reader
	switch {
	case r.bodyReader != nil:
		body = r.bodyReader
	case r.body != "":
		body = strings.NewReader(r.body)
	}
	hr, err := http.NewRequest(r.method, a.base+r.path, body)
	if err != nil {
		a.t.Fatal(err)
	}
	if r.token != "" {
		hr.Header.Set("Authorization", "Bearer "+r.token)
	}
	if r.ctype != "" {
		hr.Header.Set("Content-Type", r.ctype)
	}
	for k, v := range r.header {
		hr.Header.Set(k, v)
	}
	resp, err := a.srv.Client().Do(hr)
	if err != nil {
		a.t.Fatalf("%s %s: %v", r.method, r.path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		a.t.Fatal(err)
	}
	tmpl := r.template
	if tmpl == "" {
		tmpl = r.path
	}
	ex := apiExchange{Method: r.method, Template: tmpl, Status: resp.StatusCode, Header: resp.Header, Body: b}
	if a.record != nil {
		a.record(ex)
	}
	return ex
}

// acmeJSONReq is a request with a JSON body from acme.
func acmeJSONReq(method, path, template, body string) apiReq {
	return apiReq{method: method, path: path, template: template, token: "tok-acme", ctype: "application/json", body: body}
}

const (
	tmplSubs       = "/webhook-subscriptions"
	tmplSub        = "/webhook-subscriptions/{subscriptionId}"
	tmplRotate     = "/webhook-subscriptions/{subscriptionId}/rotate-secret"
	tmplDeliveries = "/webhook-subscriptions/{subscriptionId}/deliveries"
	tmplRetry      = "/webhook-subscriptions/{subscriptionId}/deliveries/{deliveryId}/retry"
	tmplTest       = "/webhook-subscriptions/{subscriptionId}/test"
	tmplReplay     = "/webhook-subscriptions/{subscriptionId}/replay"
	tmplEventTypes = "/event-types"
)

// create creates a subscription as the token's tenant and returns its JSON.
func (a *testAPI) create(token, body string) map[string]any {
	a.t.Helper()
	ex := a.do(apiReq{method: "POST", path: tmplSubs, token: token, ctype: "application/json", body: body})
	if ex.Status != http.StatusCreated {
		a.t.Fatalf("create: %d %s", ex.Status, ex.Body)
	}
	return ex.json(a.t)
}

// wantProblem checks that ex is a problem document of the given status and
// type suffix.
func wantProblem(t testing.TB, ex apiExchange, status int, typ string) map[string]any {
	t.Helper()
	if ex.Status != status {
		t.Fatalf("%s %s: status %d, want %d; body %s", ex.Method, ex.Template, ex.Status, status, ex.Body)
	}
	if ct := ex.Header.Get("Content-Type"); ct != "application/problem+json" {
		t.Fatalf("%s %s: Content-Type %q, want application/problem+json", ex.Method, ex.Template, ct)
	}
	p := ex.json(t)
	if p["type"] != problemTypeBase+typ {
		t.Fatalf("%s %s: problem type %v, want %s; body %s", ex.Method, ex.Template, p["type"], problemTypeBase+typ, ex.Body)
	}
	if p["status"] != float64(status) || p["title"] == "" || p["detail"] == "" || p["title"] == nil || p["detail"] == nil {
		t.Fatalf("%s %s: incomplete problem %s", ex.Method, ex.Template, ex.Body)
	}
	if status == http.StatusUnprocessableEntity {
		errs, _ := p["errors"].([]any)
		if len(errs) == 0 {
			t.Fatalf("%s %s: validation problem without errors: %s", ex.Method, ex.Template, ex.Body)
		}
		for _, e := range errs {
			m, _ := e.(map[string]any)
			if m["detail"] == "" || m["detail"] == nil {
				t.Fatalf("field error without detail: %s", ex.Body)
			}
		}
	}
	return p
}

// fieldErrorsOf returns the "field" of each error of a validation problem.
func fieldErrorsOf(p map[string]any) []string {
	var out []string
	errs, _ := p["errors"].([]any)
	for _, e := range errs {
		m, _ := e.(map[string]any)
		f, _ := m["field"].(string)
		out = append(out, f)
	}
	return out
}

func TestHandlerSubscriptionLifecycle(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		api := newTestAPIOn(t, openTestDB(t), HandlerConfig{})

		// Create (seed 002's single eventType form, with a chosen secret).
		secret := SecretPrefix + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
		ex := api.do(acmeJSONReq("POST", tmplSubs, "", `{"eventType":"order.shipped","callbackUrl":"https://hooks.example/orders","secret":"`+secret+`"}`))
		if ex.Status != http.StatusCreated {
			t.Fatalf("create: %d %s", ex.Status, ex.Body)
		}
		if ct := ex.Header.Get("Content-Type"); ct != "application/json" {
			t.Fatalf("Content-Type %q", ct)
		}
		if cc := ex.Header.Get("Cache-Control"); cc != "no-store" {
			t.Fatalf("Cache-Control %q", cc)
		}
		created := ex.json(t)
		id, _ := created["subscriptionId"].(string)
		if !strings.HasPrefix(id, "sub_") || created["secret"] != secret || created["eventType"] != "order.shipped" ||
			created["callbackUrl"] != "https://hooks.example/orders" || created["enabled"] != true {
			t.Fatalf("created %s", ex.Body)
		}
		if loc := ex.Header.Get("Location"); loc != "/api/webhook-subscriptions/"+id {
			t.Fatalf("Location %q", loc)
		}

		// Create with everything, and a generated secret.
		full := api.create("tok-acme", `{"eventTypes":["order.*","payment.failed"],"callbackUrl":"https://public.example/h?x=1",
			"description":"ops hook","metadata":{"team":"ops"},"enabled":false}`)
		fullID := full["subscriptionId"].(string)
		if s, _ := full["secret"].(string); !strings.HasPrefix(s, SecretPrefix) {
			t.Fatalf("generated secret %v", full["secret"])
		}
		if full["enabled"] != false || full["disabledReason"] == nil || full["description"] != "ops hook" ||
			full["metadata"].(map[string]any)["team"] != "ops" || full["eventType"] != nil {
			t.Fatalf("created %v", full)
		}

		// Get never shows the secret.
		ex = api.do(apiReq{method: "GET", path: "/webhook-subscriptions/" + id, token: "tok-acme"})
		got := ex.json(t)
		if ex.Status != http.StatusOK || got["subscriptionId"] != id || got["secret"] != nil || strings.Contains(string(ex.Body), secret) {
			t.Fatalf("get: %d %s", ex.Status, ex.Body)
		}
		if got["createdAt"] != created["createdAt"] || got["updatedAt"] == nil {
			t.Fatalf("get %v", got)
		}

		// List, paginated, without secrets.
		var ids []string
		cursor := ""
		for pages := 0; ; pages++ {
			path := "/webhook-subscriptions?limit=1"
			if cursor != "" {
				path += "&cursor=" + cursor
			}
			ex = api.do(apiReq{method: "GET", path: path, template: tmplSubs, token: "tok-acme"})
			if ex.Status != http.StatusOK || bytes.Contains(ex.Body, []byte(`"secret"`)) {
				t.Fatalf("list: %d %s", ex.Status, ex.Body)
			}
			page := ex.json(t)
			for _, s := range page["data"].([]any) {
				ids = append(ids, s.(map[string]any)["subscriptionId"].(string))
			}
			next, _ := page["nextCursor"].(string)
			if next == "" {
				break
			}
			if pages > 3 {
				t.Fatal("pagination does not end")
			}
			cursor = next
		}
		if strings.Join(ids, ",") != id+","+fullID {
			t.Fatalf("listed %v", ids)
		}

		// Patch.
		ex = api.do(acmeJSONReq("PATCH", "/webhook-subscriptions/"+fullID, tmplSub,
			`{"callbackUrl":"https://hooks.example/v2","eventTypes":["*"],"description":"","metadata":{},"enabled":true}`))
		if ex.Status != http.StatusOK {
			t.Fatalf("patch: %d %s", ex.Status, ex.Body)
		}
		up := ex.json(t)
		if up["callbackUrl"] != "https://hooks.example/v2" || up["eventType"] != "*" || up["enabled"] != true ||
			up["disabledReason"] != nil || up["description"] != "" || len(up["metadata"].(map[string]any)) != 0 || up["secret"] != nil {
			t.Fatalf("patched %s", ex.Body)
		}
		// merge-patch content type, a partial change, and an empty patch.
		ex = api.do(apiReq{method: "PATCH", path: "/webhook-subscriptions/" + fullID, template: tmplSub, token: "tok-acme",
			ctype: "application/merge-patch+json", body: `{"enabled":false}`})
		if ex.Status != http.StatusOK || ex.json(t)["enabled"] != false || ex.json(t)["callbackUrl"] != "https://hooks.example/v2" {
			t.Fatalf("merge patch: %d %s", ex.Status, ex.Body)
		}
		before := storedSnapshot(t, api.db)
		ex = api.do(acmeJSONReq("PATCH", "/webhook-subscriptions/"+fullID, tmplSub, `{}`))
		if ex.Status != http.StatusOK || storedSnapshot(t, api.db) != before {
			t.Fatalf("empty patch: %d %s", ex.Status, ex.Body)
		}

		// Delete.
		ex = api.do(apiReq{method: "DELETE", path: "/webhook-subscriptions/" + fullID, template: tmplSub, token: "tok-acme"})
		if ex.Status != http.StatusNoContent || len(ex.Body) != 0 {
			t.Fatalf("delete: %d %s", ex.Status, ex.Body)
		}
		wantProblem(t, api.do(apiReq{method: "GET", path: "/webhook-subscriptions/" + fullID, template: tmplSub, token: "tok-acme"}), 404, "not-found")
		wantProblem(t, api.do(apiReq{method: "DELETE", path: "/webhook-subscriptions/" + fullID, template: tmplSub, token: "tok-acme"}), 404, "not-found")
	})
}

func TestHandlerRotateSecret(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		clock := newFakeClock()
		db := openTestDB(t)
		api := newTestAPIOn(t, db, HandlerConfig{})
		api.subs.clock = clock // drive the grace period without sleeping
		sub := api.create("tok-acme", `{"eventTypes":["*"],"callbackUrl":"https://public.example/h"}`)
		id, old := sub["subscriptionId"].(string), sub["secret"].(string)

		ex := api.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + id + "/rotate-secret", template: tmplRotate, token: "tok-acme"})
		if ex.Status != http.StatusOK {
			t.Fatalf("rotate: %d %s", ex.Status, ex.Body)
		}
		rot := ex.json(t)
		fresh, _ := rot["secret"].(string)
		if _, err := ParseSecret(fresh); err != nil || fresh == old {
			t.Fatalf("rotated secret %q (old %q): %v", fresh, old, err)
		}
		exp, err := time.Parse(time.RFC3339Nano, rot["previousSecretExpiresAt"].(string))
		if err != nil || exp.Sub(clock.Now()) < SecretGracePeriodDefault-time.Second || exp.Sub(clock.Now()) > SecretGracePeriodDefault+time.Second {
			t.Fatalf("previousSecretExpiresAt %v (now %v): %v", rot["previousSecretExpiresAt"], clock.Now(), err)
		}
		// Both secrets sign during the grace period; only the new one after.
		var column string
		if err := db.QueryRow(`SELECT secrets FROM webhook_subscriptions WHERE id = $1`, id).Scan(&column); err != nil {
			t.Fatal(err)
		}
		if active, _ := activeSecrets(column, clock.Now()); len(active) != 2 || active[0] != fresh || active[1] != old {
			t.Fatalf("active secrets during the grace period: %d", len(active))
		}
		if active, _ := activeSecrets(column, clock.Now().Add(SecretGracePeriodDefault+time.Minute)); len(active) != 1 || active[0] != fresh {
			t.Fatalf("active secrets after the grace period: %d", len(active))
		}
		// An empty JSON object is accepted as "no body"; fields are not.
		ex = api.do(acmeJSONReq("POST", "/webhook-subscriptions/"+id+"/rotate-secret", tmplRotate, `{}`))
		if ex.Status != http.StatusOK {
			t.Fatalf("rotate with {}: %d %s", ex.Status, ex.Body)
		}
		wantProblem(t, api.do(acmeJSONReq("POST", "/webhook-subscriptions/"+id+"/rotate-secret", tmplRotate, `{"secret":"`+old+`"}`)), 422, "validation")
		wantProblem(t, api.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + id + "/rotate-secret", template: tmplRotate,
			token: "tok-acme", ctype: "text/plain", body: "x"}), 415, "unsupported-media-type")
		wantProblem(t, api.do(apiReq{method: "POST", path: "/webhook-subscriptions/sub_nope/rotate-secret", template: tmplRotate, token: "tok-acme"}), 404, "not-found")

		// A negative grace period stops the old secret at once.
		api2 := newTestAPIOn(t, openTestDB(t), HandlerConfig{SecretGracePeriod: -1})
		id2 := api2.create("tok-acme", `{"eventTypes":["*"],"callbackUrl":"https://public.example/h"}`)["subscriptionId"].(string)
		rot = api2.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + id2 + "/rotate-secret", template: tmplRotate, token: "tok-acme"}).json(t)
		if rot["previousSecretExpiresAt"] != nil {
			t.Fatalf("no grace period, yet %v", rot["previousSecretExpiresAt"])
		}
		if err := api2.db.QueryRow(`SELECT secrets FROM webhook_subscriptions WHERE id = $1`, id2).Scan(&column); err != nil {
			t.Fatal(err)
		}
		if active, _ := activeSecrets(column, time.Now()); len(active) != 1 {
			t.Fatalf("%d active secrets without grace period", len(active))
		}
	})
}

// ssrfLoopbackClient is an HTTP client that enforces the SSRF policy at dial
// time with 127.0.0.0/8 allowed, as a dispatcher of the handler's tests
// should.
func ssrfLoopbackClient() *http.Client {
	d := &net.Dialer{Control: ssrf.Policy{Allowed: loopbackNetworks}.Control}
	return &http.Client{Transport: &http.Transport{DialContext: d.DialContext, Proxy: nil}}
}

func TestHandlerTestAndDeliveries(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		var notified atomic.Int32
		api := newTestAPIOn(t, db, HandlerConfig{AllowHTTP: true, AllowedNetworks: loopbackNetworks, Notify: func() { notified.Add(1) }})
		rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) int {
			if n == 1 {
				w.WriteHeader(http.StatusServiceUnavailable)
				io.WriteString(w, "busy")
				return 0
			}
			return http.StatusOK
		})
		sub := api.create("tok-acme", `{"eventTypes":["order.*"],"callbackUrl":"`+rc.URL()+`"}`)
		id := sub["subscriptionId"].(string)
		rc.setSecrets(sub["secret"].(string))
		other := api.create("tok-acme", `{"eventTypes":["order.*"],"callbackUrl":"`+rc.URL()+`"}`)["subscriptionId"].(string)

		// POST /test queues a webhook.test delivery.
		ex := api.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + id + "/test", template: tmplTest, token: "tok-acme"})
		if ex.Status != http.StatusAccepted {
			t.Fatalf("test: %d %s", ex.Status, ex.Body)
		}
		dl := ex.json(t)
		dlvID, _ := dl["deliveryId"].(string)
		if dl["status"] != "pending" || dl["subscriptionId"] != id || dl["nextAttemptAt"] == nil || len(dl["attempts"].([]any)) != 0 || notified.Load() != 1 {
			t.Fatalf("queued %s (notified %d)", ex.Body, notified.Load())
		}

		// The dispatcher sends it through the normal pipeline; the receiver
		// answers 503 and the policy gives up after one attempt.
		_, stop := startDispatcher(t, db, Config{HTTPClient: ssrfLoopbackClient(), RetryPolicy: immediateRetry{max: 1}})
		got := rc.wait(1)[0]
		var payload struct {
			ID, Type, Timestamp string
			Data                map[string]string
		}
		if err := json.Unmarshal(got.Body, &payload); err != nil || payload.Type != TestEventType || payload.Data["subscriptionId"] != id || payload.ID != got.ID {
			t.Fatalf("test payload %s: %v", got.Body, err)
		}
		stop()

		ex = api.do(apiReq{method: "GET", path: "/webhook-subscriptions/" + id + "/deliveries", template: tmplDeliveries, token: "tok-acme"})
		list := ex.json(t)
		data := list["data"].([]any)
		if ex.Status != http.StatusOK || len(data) != 1 {
			t.Fatalf("deliveries: %d %s", ex.Status, ex.Body)
		}
		d := data[0].(map[string]any)
		attempts := d["attempts"].([]any)
		if d["deliveryId"] != dlvID || d["status"] != "dead" || d["attemptCount"] != float64(1) || d["lastStatusCode"] != float64(503) || len(attempts) != 1 {
			t.Fatalf("delivery %v", d)
		}
		a := attempts[0].(map[string]any)
		if a["attempt"] != float64(1) || a["statusCode"] != float64(503) || a["response"] != "busy" || a["error"] != "HTTP 503" ||
			a["startedAt"] == nil || a["durationMs"] == nil {
			t.Fatalf("attempt %v", a)
		}
		// Status filter.
		for status, n := range map[string]int{"dead": 1, "succeeded": 0, "pending": 0} {
			ex = api.do(apiReq{method: "GET", path: "/webhook-subscriptions/" + id + "/deliveries?status=" + status, template: tmplDeliveries, token: "tok-acme"})
			if l := len(ex.json(t)["data"].([]any)); ex.Status != 200 || l != n {
				t.Fatalf("status=%s: %d deliveries, want %d", status, l, n)
			}
		}
		// Retry: through another subscription's path or another tenant it
		// does not exist.
		wantProblem(t, api.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + other + "/deliveries/" + dlvID + "/retry", template: tmplRetry, token: "tok-acme"}), 404, "not-found")
		wantProblem(t, api.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + id + "/deliveries/" + dlvID + "/retry", template: tmplRetry, token: "tok-globex"}), 404, "not-found")
		wantProblem(t, api.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + id + "/deliveries/dlv_nope/retry", template: tmplRetry, token: "tok-acme"}), 404, "not-found")
		ex = api.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + id + "/deliveries/" + dlvID + "/retry", template: tmplRetry, token: "tok-acme"})
		if ex.Status != http.StatusAccepted || ex.json(t)["status"] != "pending" || notified.Load() != 2 {
			t.Fatalf("retry: %d %s", ex.Status, ex.Body)
		}
		// A pending delivery cannot be retried.
		wantProblem(t, api.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + id + "/deliveries/" + dlvID + "/retry", template: tmplRetry, token: "tok-acme"}), 409, "delivery-not-retryable")

		// Delivered this time: the same webhook-id (a replay).
		_, stop = startDispatcher(t, db, Config{HTTPClient: ssrfLoopbackClient(), RetryPolicy: immediateRetry{max: 1}})
		again := rc.wait(1)[0]
		stop()
		if again.ID != got.ID {
			t.Fatalf("replay webhook-id %q, want %q", again.ID, got.ID)
		}
		d = api.do(apiReq{method: "GET", path: "/webhook-subscriptions/" + id + "/deliveries?status=succeeded", template: tmplDeliveries, token: "tok-acme"}).json(t)["data"].([]any)[0].(map[string]any)
		if d["status"] != "succeeded" || len(d["attempts"].([]any)) != 2 || d["deliveredAt"] == nil || d["nextAttemptAt"] != nil {
			t.Fatalf("after retry %v", d)
		}

		// Pagination of deliveries.
		api.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + id + "/test", template: tmplTest, token: "tok-acme"})
		page := api.do(apiReq{method: "GET", path: "/webhook-subscriptions/" + id + "/deliveries?limit=1", template: tmplDeliveries, token: "tok-acme"}).json(t)
		next, _ := page["nextCursor"].(string)
		if len(page["data"].([]any)) != 1 || next == "" {
			t.Fatalf("first page %v", page)
		}
		page = api.do(apiReq{method: "GET", path: "/webhook-subscriptions/" + id + "/deliveries?limit=1&cursor=" + next, template: tmplDeliveries, token: "tok-acme"}).json(t)
		if len(page["data"].([]any)) != 1 || page["nextCursor"] != nil {
			t.Fatalf("second page %v", page)
		}

		// Other tenants see nothing of it.
		wantProblem(t, api.do(apiReq{method: "GET", path: "/webhook-subscriptions/" + id + "/deliveries", template: tmplDeliveries, token: "tok-globex"}), 404, "not-found")
		wantProblem(t, api.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + id + "/test", template: tmplTest, token: "tok-globex"}), 404, "not-found")
		// After deletion, the subscription's deliveries are gone from the API.
		api.do(apiReq{method: "DELETE", path: "/webhook-subscriptions/" + id, template: tmplSub, token: "tok-acme"})
		wantProblem(t, api.do(apiReq{method: "GET", path: "/webhook-subscriptions/" + id + "/deliveries", template: tmplDeliveries, token: "tok-acme"}), 404, "not-found")
	})
}

func TestHandlerEventTypeCatalog(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		catalog := []EventTypeInfo{
			{Name: "order.shipped", Description: "An order left the warehouse."},
			{Name: "order.delivered", Description: "An order arrived."},
			{Name: "payment.failed", Description: "A payment was declined."},
		}
		api := newTestAPIOn(t, openTestDB(t), HandlerConfig{EventTypes: catalog})
		ex := api.do(apiReq{method: "GET", path: "/event-types", token: "tok-acme"})
		var list struct{ Data []eventTypeJSON }
		if err := json.Unmarshal(ex.Body, &list); err != nil || ex.Status != 200 || len(list.Data) != 3 ||
			list.Data[0] != (eventTypeJSON{"order.shipped", "An order left the warehouse."}) {
			t.Fatalf("event types: %d %s", ex.Status, ex.Body)
		}
		for _, ok := range []string{`["order.shipped"]`, `["order.*"]`, `["*"]`, `["payment.failed","order.delivered"]`} {
			api.create("tok-acme", `{"eventTypes":`+ok+`,"callbackUrl":"https://public.example/h"}`)
		}
		for body, field := range map[string]string{
			`{"eventTypes":["invoice.paid"],"callbackUrl":"https://public.example/h"}`:                   "eventTypes[0]",
			`{"eventTypes":["order.*","invoice.*"],"callbackUrl":"https://public.example/h"}`:            "eventTypes[1]",
			`{"eventType":"order.shipped.late","callbackUrl":"https://public.example/h"}`:                "eventType",
			`{"eventTypes":["order"],"callbackUrl":"https://public.example/h"}`:                          "eventTypes[0]",
			`{"eventTypes":["order.shipped.*"],"callbackUrl":"https://public.example/h"}`:                "eventTypes[0]",
			`{"eventTypes":["order.shipped"],"callbackUrl":"https://public.example/h","x":1}`:            "x",
			`{"eventTypes":["payment.failed"],"eventType":"x","callbackUrl":"https://public.example/h"}`: "eventTypes",
		} {
			p := wantProblem(t, api.do(acmeJSONReq("POST", tmplSubs, "", body)), 422, "validation")
			if f := fieldErrorsOf(p); len(f) != 1 || f[0] != field {
				t.Errorf("%s: fields %v, want [%s]", body, f, field)
			}
		}
		id := api.create("tok-acme", `{"eventTypes":["order.shipped"],"callbackUrl":"https://public.example/h"}`)["subscriptionId"].(string)
		wantProblem(t, api.do(acmeJSONReq("PATCH", "/webhook-subscriptions/"+id, tmplSub, `{"eventTypes":["refund.*"]}`)), 422, "validation")

		// Without a catalog, the list is empty and any valid type is accepted.
		api = newTestAPIOn(t, openTestDB(t), HandlerConfig{})
		ex = api.do(apiReq{method: "GET", path: "/event-types", token: "tok-acme"})
		if ex.Status != 200 || strings.TrimSpace(string(ex.Body)) != `{"data":[]}` {
			t.Fatalf("empty catalog: %d %s", ex.Status, ex.Body)
		}
		api.create("tok-acme", `{"eventTypes":["invoice.paid"],"callbackUrl":"https://public.example/h"}`)
	})
}

func TestHandlerAuthentication(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		if _, err := NewHandler(subs, HandlerConfig{}); !errors.Is(err, ErrInvalidConfig) {
			t.Fatalf("NewHandler without Authenticate: %v", err)
		}
		if _, err := NewHandler(nil, HandlerConfig{UnsafeNoAuthSingleTenant: true}); !errors.Is(err, ErrInvalidConfig) {
			t.Fatalf("NewHandler without subscriptions: %v", err)
		}
		for name, cfg := range map[string]HandlerConfig{
			"negative max":    {Authenticate: handlerTestAuthenticate, MaxSubscriptionsPerTenant: -1},
			"bad catalog":     {Authenticate: handlerTestAuthenticate, EventTypes: []EventTypeInfo{{Name: "order..x"}}},
			"dup catalog":     {Authenticate: handlerTestAuthenticate, EventTypes: []EventTypeInfo{{Name: "a"}, {Name: "a"}}},
			"invalid network": {Authenticate: handlerTestAuthenticate, AllowedNetworks: []netip.Prefix{{}}},
		} {
			if _, err := NewHandler(subs, cfg); !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("%s: %v", name, err)
			}
		}

		api := newTestAPIOn(t, db, HandlerConfig{WWWAuthenticate: `Bearer realm="webhooks"`})
		for _, tok := range []string{"", "tok-nobody"} {
			for _, r := range []apiReq{
				{method: "GET", path: tmplSubs},
				{method: "POST", path: tmplSubs, ctype: "application/json", body: `{"eventTypes":["*"],"callbackUrl":"https://public.example/"}`},
				{method: "GET", path: "/event-types"},
				{method: "PUT", path: "/nowhere"},
			} {
				r.token = tok
				ex := api.do(r)
				wantProblem(t, ex, 401, "unauthorized")
				if ex.Header.Get("WWW-Authenticate") != `Bearer realm="webhooks"` {
					t.Fatalf("WWW-Authenticate %q", ex.Header.Get("WWW-Authenticate"))
				}
				if strings.Contains(string(ex.Body), "tok-nobody") {
					t.Fatal("the 401 body repeats the token")
				}
			}
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_subscriptions`); n != 0 {
			t.Fatalf("%d subscriptions created without authentication", n)
		}

		// An Authenticate that returns an unusable tenant is a server error.
		bad := newTestAPIOn(t, db, HandlerConfig{Authenticate: func(*http.Request) (string, error) { return "a\x00b", nil }})
		wantProblem(t, bad.do(apiReq{method: "GET", path: tmplSubs}), 500, "internal")

		// The explicit single-tenant opt-out serves everyone as tenant "".
		open := newTestAPIOn(t, db, HandlerConfig{UnsafeNoAuthSingleTenant: true})
		sub := open.create("", `{"eventTypes":["*"],"callbackUrl":"https://public.example/"}`)
		if s, err := open.subs.Get(context.Background(), "", sub["subscriptionId"].(string)); err != nil || s.Tenant != "" {
			t.Fatalf("single-tenant subscription: %+v %v", s, err)
		}
	})
}

func TestHandlerTenantIsolation(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		api := newTestAPIOn(t, openTestDB(t), HandlerConfig{})
		acme := api.create("tok-acme", `{"eventTypes":["*"],"callbackUrl":"https://public.example/a"}`)["subscriptionId"].(string)
		globex := api.create("tok-globex", `{"eventTypes":["*"],"callbackUrl":"https://public.example/g"}`)["subscriptionId"].(string)
		dl, err := api.subs.SendTest(context.Background(), "acme", acme)
		if err != nil {
			t.Fatal(err)
		}
		before := storedSnapshot(t, api.db)
		for _, r := range []apiReq{
			{method: "GET", path: "/webhook-subscriptions/" + acme, template: tmplSub},
			{method: "PATCH", path: "/webhook-subscriptions/" + acme, template: tmplSub, ctype: "application/json", body: `{"enabled":false}`},
			{method: "DELETE", path: "/webhook-subscriptions/" + acme, template: tmplSub},
			{method: "POST", path: "/webhook-subscriptions/" + acme + "/rotate-secret", template: tmplRotate},
			{method: "POST", path: "/webhook-subscriptions/" + acme + "/test", template: tmplTest},
			{method: "GET", path: "/webhook-subscriptions/" + acme + "/deliveries", template: tmplDeliveries},
			{method: "POST", path: "/webhook-subscriptions/" + acme + "/deliveries/" + dl.ID + "/retry", template: tmplRetry},
			{method: "POST", path: "/webhook-subscriptions/" + globex + "/deliveries/" + dl.ID + "/retry", template: tmplRetry},
		} {
			r.token = "tok-globex"
			p := wantProblem(t, api.do(r), 404, "not-found")
			if strings.Contains(fmt.Sprint(p), acme) {
				t.Fatalf("the 404 names the other tenant's subscription: %v", p)
			}
		}
		if after := storedSnapshot(t, api.db); after != before {
			t.Fatalf("another tenant's requests changed stored data:\n%s\n%s", before, after)
		}
		list := api.do(apiReq{method: "GET", path: tmplSubs, token: "tok-globex"}).json(t)["data"].([]any)
		if len(list) != 1 || list[0].(map[string]any)["subscriptionId"] != globex {
			t.Fatalf("globex lists %v", list)
		}
	})
}

// TestHandlerRefusalHidesResolvedAddress: refusing a name does not tell the
// caller what it resolves to (which would map internal DNS), but logs it.
func TestHandlerRefusalHidesResolvedAddress(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		var logs bytes.Buffer
		var mu sync.Mutex
		api := newTestAPIOn(t, openTestDB(t), HandlerConfig{Logger: slog.New(slog.NewTextHandler(lockedLogWriter{&mu, &logs}, nil))})
		for _, host := range []string{"rebind.example", "metadata.example", "v6local.example"} {
			ex := api.do(acmeJSONReq("POST", tmplSubs, "", `{"eventTypes":["*"],"callbackUrl":"https://`+host+`/"}`))
			p := wantProblem(t, ex, 422, "validation")
			for _, addr := range handlerTestResolver[host] {
				if strings.Contains(string(ex.Body), addr) && addr != "93.184.216.34" {
					t.Fatalf("the answer reveals that %s resolves to %s: %v", host, addr, p)
				}
			}
		}
		mu.Lock()
		defer mu.Unlock()
		if !strings.Contains(logs.String(), "169.254.169.254") {
			t.Fatalf("the refusal was not logged with its address:\n%s", logs.String())
		}
	})
}

func TestHandlerMaxSubscriptionsPerTenant(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		api := newTestAPIOn(t, openTestDB(t), HandlerConfig{MaxSubscriptionsPerTenant: 3})
		const body = `{"eventTypes":["*"],"callbackUrl":"https://public.example/"}`
		var wg sync.WaitGroup
		statuses := make(chan int, 8)
		for i := 0; i < 8; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				hr, _ := http.NewRequest("POST", api.base+tmplSubs, strings.NewReader(body))
				hr.Header.Set("Authorization", "Bearer tok-acme")
				hr.Header.Set("Content-Type", "application/json")
				resp, err := api.srv.Client().Do(hr)
				if err != nil {
					t.Error(err)
					return
				}
				resp.Body.Close()
				statuses <- resp.StatusCode
			}()
		}
		wg.Wait()
		close(statuses)
		count := map[int]int{}
		for s := range statuses {
			count[s]++
		}
		if count[201] != 3 || count[409] != 5 {
			t.Fatalf("statuses %v, want 3 created and 5 refused", count)
		}
		p := wantProblem(t, api.do(acmeJSONReq("POST", tmplSubs, "", body)), 409, "subscription-limit")
		if !strings.Contains(p["detail"].(string), "3") {
			t.Fatalf("detail %v", p["detail"])
		}
		// Another tenant has its own allowance; deleting one frees a slot.
		api.create("tok-globex", body)
		id := api.do(apiReq{method: "GET", path: tmplSubs, token: "tok-acme"}).json(t)["data"].([]any)[0].(map[string]any)["subscriptionId"].(string)
		api.do(apiReq{method: "DELETE", path: "/webhook-subscriptions/" + id, template: tmplSub, token: "tok-acme"})
		api.create("tok-acme", body)
	})
}

func TestHandlerRoutingProblems(t *testing.T) {
	api := newTestAPI(t, HandlerConfig{})
	id := api.create("tok-acme", `{"eventTypes":["*"],"callbackUrl":"https://public.example/"}`)["subscriptionId"].(string)
	for _, c := range []struct {
		method, path, allow string
	}{
		{"PUT", "/webhook-subscriptions", "GET, HEAD, POST"},
		{"DELETE", "/webhook-subscriptions", "GET, HEAD, POST"},
		{"PUT", "/webhook-subscriptions/" + id, "DELETE, GET, HEAD, PATCH"},
		{"POST", "/webhook-subscriptions/" + id, "DELETE, GET, HEAD, PATCH"},
		{"GET", "/webhook-subscriptions/" + id + "/rotate-secret", "POST"},
		{"GET", "/webhook-subscriptions/" + id + "/test", "POST"},
		{"POST", "/webhook-subscriptions/" + id + "/deliveries", "GET, HEAD"},
		{"GET", "/webhook-subscriptions/" + id + "/deliveries/dlv_x/retry", "POST"},
		{"POST", "/event-types", "GET, HEAD"},
		{"OPTIONS", "/event-types", "GET, HEAD"},
	} {
		ex := api.do(apiReq{method: c.method, path: c.path, token: "tok-acme"})
		wantProblem(t, ex, 405, "method-not-allowed")
		if got := ex.Header.Get("Allow"); got != c.allow {
			t.Errorf("%s %s: Allow %q, want %q", c.method, c.path, got, c.allow)
		}
	}
	for _, p := range []string{"/", "/nope", "/webhook-subscriptions/", "/webhook-subscriptions/" + id + "/",
		"/webhook-subscriptions/" + id + "/deliveries/x", "/event-types/x"} {
		wantProblem(t, api.do(apiReq{method: "GET", path: p, token: "tok-acme"}), 404, "not-found")
	}
	// HEAD works where GET does, without a body.
	ex := api.do(apiReq{method: "HEAD", path: "/webhook-subscriptions/" + id, token: "tok-acme"})
	if ex.Status != 200 || len(ex.Body) != 0 {
		t.Fatalf("HEAD: %d %q", ex.Status, ex.Body)
	}
}

// TestHandlerMountedAtRoot checks that the handler also works unprefixed.
func TestHandlerMountedAtRoot(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		h, err := NewHandler(newTestSubscriptions(t, db, nil), HandlerConfig{Authenticate: handlerTestAuthenticate, Resolver: handlerTestResolver,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewServer(h)
		defer srv.Close()
		api := &testAPI{t: t, db: db, srv: srv, base: srv.URL}
		ex := api.do(acmeJSONReq("POST", tmplSubs, "", `{"eventTypes":["*"],"callbackUrl":"https://public.example/"}`))
		if ex.Status != 201 || ex.Header.Get("Location") != "/webhook-subscriptions/"+ex.json(t)["subscriptionId"].(string) {
			t.Fatalf("root mount: %d %s %q", ex.Status, ex.Body, ex.Header.Get("Location"))
		}
		// Unclean paths are not redirected (the redirect would lose a mount
		// prefix) but refused.
		for _, p := range []string{"//webhook-subscriptions", "/event-types/", "/x/../event-types", "/./event-types"} {
			hr, _ := http.NewRequest("GET", srv.URL, nil)
			hr.URL.Path = p
			hr.Header.Set("Authorization", "Bearer tok-acme")
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, hr)
			if rec.Code != 404 || rec.Header().Get("Content-Type") != "application/problem+json" {
				t.Errorf("GET %s: %d %s", p, rec.Code, rec.Body)
			}
		}
	})
}

// TestHandlerSecretsNeverLeak creates, rotates and misuses secrets and checks
// that no secret appears in any log line or error answer, and in no answer
// other than create and rotate-secret.
func TestHandlerSecretsNeverLeak(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		var logs bytes.Buffer
		var logMu sync.Mutex
		logger := slog.New(slog.NewJSONHandler(lockedLogWriter{&logMu, &logs}, &slog.HandlerOptions{Level: slog.LevelDebug}))
		api := newTestAPIOn(t, openTestDB(t), HandlerConfig{Logger: logger})
		chosen := SecretPrefix + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA=="
		short := SecretPrefix + "c2hvcnQtc2VjcmV0LXZhbHVl" // 18 bytes
		garbage := SecretPrefix + "!!!not-base64-at-all-but-secret!!!"
		var secrets []string
		var bodies []apiExchange

		ex := api.do(acmeJSONReq("POST", tmplSubs, "", `{"eventTypes":["*"],"callbackUrl":"https://public.example/","secret":"`+chosen+`"}`))
		id := ex.json(t)["subscriptionId"].(string)
		secrets = append(secrets, chosen, short, garbage)
		for _, s := range []string{short, garbage, "nope-" + chosen} {
			ex := api.do(acmeJSONReq("POST", tmplSubs, "", `{"eventTypes":["*"],"callbackUrl":"https://public.example/","secret":"`+s+`"}`))
			wantProblem(t, ex, 422, "validation")
			bodies = append(bodies, ex)
		}
		// The secret beside other errors, and as an unknown field's value.
		bodies = append(bodies,
			api.do(acmeJSONReq("POST", tmplSubs, "", `{"eventTypes":["*"],"callbackUrl":"https://10.0.0.1/","secret":"`+chosen+`"}`)),
			api.do(acmeJSONReq("POST", tmplSubs, "", `{"eventTypes":["*"],"callbackUrl":"https://public.example/","secret":"`+chosen+`","secrett":"`+chosen+`"}`)),
			api.do(acmeJSONReq("POST", tmplSubs, "", `{"eventTypes":["*"],"callbackUrl":"https://public.example/","secret":"`+chosen+`"`)),
			api.do(acmeJSONReq("PATCH", "/webhook-subscriptions/"+id, tmplSub, `{"secret":"`+chosen+`"}`)),
			api.do(acmeJSONReq("POST", "/webhook-subscriptions/"+id+"/rotate-secret", tmplRotate, `{"secret":"`+chosen+`"}`)),
		)
		rot := api.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + id + "/rotate-secret", template: tmplRotate, token: "tok-acme"})
		secrets = append(secrets, rot.json(t)["secret"].(string))
		bodies = append(bodies,
			api.do(apiReq{method: "GET", path: "/webhook-subscriptions/" + id, template: tmplSub, token: "tok-acme"}),
			api.do(apiReq{method: "GET", path: tmplSubs, token: "tok-acme"}),
			api.do(acmeJSONReq("PATCH", "/webhook-subscriptions/"+id, tmplSub, `{"description":"x"}`)),
			api.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + id + "/test", template: tmplTest, token: "tok-acme"}),
			api.do(apiReq{method: "GET", path: "/webhook-subscriptions/" + id + "/deliveries", template: tmplDeliveries, token: "tok-acme"}),
		)
		logMu.Lock()
		logText := logs.String()
		logMu.Unlock()
		if !strings.Contains(logText, id) {
			t.Fatalf("expected the handler to log about %s; logs:\n%s", id, logText)
		}
		for _, s := range secrets {
			key := strings.TrimPrefix(s, SecretPrefix)
			if strings.Contains(logText, key) {
				t.Fatalf("a secret appears in the logs:\n%s", logText)
			}
			for _, ex := range bodies {
				if bytes.Contains(ex.Body, []byte(key)) {
					t.Fatalf("%s %s answered %d with a secret: %s", ex.Method, ex.Template, ex.Status, ex.Body)
				}
			}
		}
	})
}

type lockedLogWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedLogWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// TestHandlerRebindingRefusedAtDialTime registers a name that resolves to a
// public address, then lets it resolve to 127.0.0.1 when the dispatcher
// dials: the dial-time check refuses the connection, and the attempt is
// recorded as failed without the receiver ever being contacted.
func TestHandlerRebindingRefusedAtDialTime(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		api := newTestAPIOn(t, db, HandlerConfig{AllowHTTP: true})
		rc := newReceiver(t, nil)
		_, port, _ := net.SplitHostPort(strings.TrimPrefix(rc.srv.URL, "http://"))

		sub := api.create("tok-acme", `{"eventTypes":["*"],"callbackUrl":"http://rebinding.example:`+port+`/hook"}`)
		id := sub["subscriptionId"].(string)

		// The "DNS" now answers 127.0.0.1 for rebinding.example; the dialer
		// enforces the default policy (nothing private allowed).
		dialed := make(chan error, 10)
		dialer := &net.Dialer{Control: ssrf.Policy{}.Control}
		tr := &http.Transport{Proxy: nil, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			host, p, _ := net.SplitHostPort(addr)
			if host == "rebinding.example" {
				addr = net.JoinHostPort("127.0.0.1", p)
			}
			c, err := dialer.DialContext(ctx, network, addr)
			dialed <- err
			return c, err
		}}
		_, stop := startDispatcher(t, db, Config{HTTPClient: &http.Client{Transport: tr}, RetryPolicy: immediateRetry{max: 1}})
		if _, err := api.subs.SendTest(context.Background(), "acme", id); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-dialed:
			if !errors.Is(err, ssrf.ErrForbidden) {
				t.Fatalf("dial error %v, want ssrf.ErrForbidden", err)
			}
		case <-time.After(60 * time.Second): // hang guard only
			t.Fatal("the dispatcher never dialed")
		}
		stop()
		if n := rc.count(); n != 0 {
			t.Fatalf("the receiver got %d requests", n)
		}
		d := api.do(apiReq{method: "GET", path: "/webhook-subscriptions/" + id + "/deliveries", template: tmplDeliveries, token: "tok-acme"}).json(t)["data"].([]any)[0].(map[string]any)
		a := d["attempts"].([]any)
		if d["status"] != "dead" || len(a) != 1 || !strings.Contains(a[0].(map[string]any)["error"].(string), "127.0.0.1 is a loopback address") {
			t.Fatalf("delivery %v", d)
		}
	})
}

// snapshot renders every stored row the API can change.
func storedSnapshot(t testing.TB, db *sql.DB) string {
	t.Helper()
	var b strings.Builder
	for _, q := range []string{
		`SELECT id, tenant, url, event_types, secrets, description, metadata, enabled, disabled_reason, created_at, updated_at
		 FROM webhook_subscriptions ORDER BY id`,
		`SELECT id, event_id, subscription_id, tenant, state, attempts, next_at, last_status, last_error, created_at, updated_at
		 FROM webhook_deliveries ORDER BY id`,
		`SELECT id, type, tenant, payload FROM webhook_outbox ORDER BY seq`,
		`SELECT delivery_id, attempt, status_code FROM ` + allAttempts + ` ORDER BY delivery_id, seq`,
	} {
		rows, err := db.Query(q)
		if err != nil {
			t.Fatal(err)
		}
		cols, _ := rows.Columns()
		for rows.Next() {
			vals := make([]any, len(cols))
			ptrs := make([]any, len(cols))
			for i := range vals {
				ptrs[i] = &vals[i]
			}
			if err := rows.Scan(ptrs...); err != nil {
				t.Fatal(err)
			}
			fmt.Fprintln(&b, vals...)
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		rows.Close()
		b.WriteString("--\n")
	}
	return b.String()
}

// endlessJSONString streams n bytes of a JSON string without a Content-Length.
type endlessJSONString struct{ n, off int }

func (r *endlessJSONString) Read(p []byte) (int, error) {
	if r.off >= r.n {
		return 0, io.EOF
	}
	k := 0
	for k < len(p) && r.off < r.n {
		switch {
		case r.off == 0:
			p[k] = '"'
		default:
			p[k] = 'a'
		}
		k++
		r.off++
	}
	return k, nil
}

func TestHandlerHostileRequests(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		api := newTestAPIOn(t, openTestDB(t), HandlerConfig{EventTypes: []EventTypeInfo{{Name: "order.shipped"}, {Name: "order.paid"}}})
		own := api.create("tok-acme", `{"eventTypes":["order.*"],"callbackUrl":"https://public.example/h","description":"mine","metadata":{"k":"v"}}`)["subscriptionId"].(string)
		foreign := api.create("tok-globex", `{"eventTypes":["order.*"],"callbackUrl":"https://public.example/g"}`)["subscriptionId"].(string)
		foreignDlv, err := api.subs.SendTest(context.Background(), "globex", foreign)
		if err != nil {
			t.Fatal(err)
		}
		ownDlv, err := api.subs.SendTest(context.Background(), "acme", own)
		if err != nil {
			t.Fatal(err)
		}
		sub := "/webhook-subscriptions/" + own
		withURL := func(u string) string {
			b, _ := json.Marshal(map[string]any{"eventTypes": []string{"order.*"}, "callbackUrl": u})
			return string(b)
		}
		huge := `{"eventTypes":["order.*"],"callbackUrl":"https://public.example/","description":"` + strings.Repeat("x", HandlerMaxBodyBytes) + `"}`
		manyTypes := `{"eventTypes":[` + strings.TrimSuffix(strings.Repeat(`"order.*",`, MaxEventTypePatterns+1), ",") + `],"callbackUrl":"https://public.example/"}`
		var manyKeys strings.Builder
		for i := 0; i <= MaxMetadataKeys; i++ {
			fmt.Fprintf(&manyKeys, `"k%d":"v",`, i)
		}
		post := func(body string) apiReq { return acmeJSONReq("POST", tmplSubs, "", body) }
		patch := func(body string) apiReq { return acmeJSONReq("PATCH", sub, tmplSub, body) }

		type hostile struct {
			name   string
			r      apiReq
			status int
			typ    string
			field  string // for 422: a field that must be among the errors
		}
		cases := []hostile{
			// Size.
			{"oversized body", post(huge), 413, "payload-too-large", ""},
			{"oversized body without length", apiReq{method: "POST", path: tmplSubs, token: "tok-acme", ctype: "application/json",
				bodyReader: &endlessJSONString{n: HandlerMaxBodyBytes + 10}}, 413, "payload-too-large", ""},
			{"oversized patch", patch(huge), 413, "payload-too-large", ""},
			// Malformed JSON.
			{"empty body", post(""), 400, "malformed-request", ""},
			{"truncated JSON", post(`{"callbackUrl":`), 400, "malformed-request", ""},
			{"not an object", post(`["order.*"]`), 400, "malformed-request", ""},
			{"a string", post(`"https://public.example/"`), 400, "malformed-request", ""},
			{"null", post(`null`), 400, "malformed-request", ""},
			{"trailing data", post(`{"eventTypes":["order.*"],"callbackUrl":"https://public.example/"} {"x":1}`), 400, "malformed-request", ""},
			{"trailing garbage", post(`{"eventTypes":["order.*"],"callbackUrl":"https://public.example/"}x`), 400, "malformed-request", ""},
			{"duplicate key", post(`{"eventTypes":["order.*"],"callbackUrl":"https://public.example/","callbackUrl":"https://10.0.0.1/"}`), 400, "malformed-request", ""},
			{"invalid UTF-8", post("{\"eventTypes\":[\"order.*\"],\"callbackUrl\":\"https://public.example/\",\"description\":\"\xff\xfe\"}"), 400, "malformed-request", ""},
			{"raw control character in a string", post("{\"eventTypes\":[\"order.*\"],\"callbackUrl\":\"https://public.example/\",\"description\":\"a\x01b\"}"), 400, "malformed-request", ""},
			{"single quotes", post(`{'eventTypes':['order.*']}`), 400, "malformed-request", ""},
			{"comment", post(`{"eventTypes":["order.*"] /* x */}`), 400, "malformed-request", ""},
			// Fields and types.
			{"unknown field", post(`{"eventTypes":["order.*"],"callbackUrl":"https://public.example/","url":"https://public.example/"}`), 422, "validation", "url"},
			{"unknown field in patch", patch(`{"tenant":"globex"}`), 422, "validation", "tenant"},
			{"id in patch", patch(`{"subscriptionId":"sub_x"}`), 422, "validation", "subscriptionId"},
			{"eventTypes a string", post(`{"eventTypes":"order.*","callbackUrl":"https://public.example/"}`), 422, "validation", "eventTypes"},
			{"eventTypes of numbers", post(`{"eventTypes":[1,2],"callbackUrl":"https://public.example/"}`), 422, "validation", "eventTypes"},
			{"callbackUrl a number", post(`{"eventTypes":["order.*"],"callbackUrl":123}`), 422, "validation", "callbackUrl"},
			{"callbackUrl null", post(`{"eventTypes":["order.*"],"callbackUrl":null}`), 422, "validation", "callbackUrl"},
			{"callbackUrl missing", post(`{"eventTypes":["order.*"]}`), 422, "validation", "callbackUrl"},
			{"event types missing", post(`{"callbackUrl":"https://public.example/"}`), 422, "validation", "eventTypes"},
			{"enabled a string", post(`{"eventTypes":["order.*"],"callbackUrl":"https://public.example/","enabled":"yes"}`), 422, "validation", "enabled"},
			{"metadata with a number", post(`{"eventTypes":["order.*"],"callbackUrl":"https://public.example/","metadata":{"a":1}}`), 422, "validation", "metadata"},
			{"metadata an array", patch(`{"metadata":["a"]}`), 422, "validation", "metadata"},
			{"deeply nested value", post(`{"eventTypes":["order.*"],"callbackUrl":"https://public.example/","description":` + strings.Repeat("[", 5000) + strings.Repeat("]", 5000) + `}`), 422, "validation", "description"},
			{"empty eventTypes", patch(`{"eventTypes":[]}`), 422, "validation", "eventTypes"},
			{"too many event types", post(manyTypes), 422, "validation", "eventTypes"},
			{"too many metadata keys", post(`{"eventTypes":["order.*"],"callbackUrl":"https://public.example/","metadata":{` + strings.TrimSuffix(manyKeys.String(), ",") + `}}`), 422, "validation", "metadata"},
			{"long description", patch(`{"description":"` + strings.Repeat("é", MaxDescriptionLength+1) + `"}`), 422, "validation", "description"},
			{"short secret", post(`{"eventTypes":["order.*"],"callbackUrl":"https://public.example/","secret":"whsec_c2hvcnQ="}`), 422, "validation", "secret"},
			// Control characters.
			{"NUL in description", patch(`{"description":"a\u0000b"}`), 422, "validation", "description"},
			{"bell in description", patch(`{"description":"ring\u0007"}`), 422, "validation", "description"},
			{"C1 control in metadata value", patch(`{"metadata":{"k":"a\u0085b"}}`), 422, "validation", "metadata"},
			{"control in metadata key", patch(`{"metadata":{"k\u001b[31m":"v"}}`), 422, "validation", "metadata"},
			{"NUL in URL", post(withURL("https://public.example/\u0000")), 422, "validation", "callbackUrl"},
			{"newline in URL", post(withURL("https://public.example/\r\nX-Injected: 1")), 422, "validation", "callbackUrl"},
			{"tab in host", post(withURL("https://public.ex\tample/")), 422, "validation", "callbackUrl"},
			// SQL-looking strings.
			{"SQL in event type", post(`{"eventTypes":["order'; DROP TABLE webhook_subscriptions;--"],"callbackUrl":"https://public.example/"}`), 422, "validation", "eventTypes[0]"},
			{"SQL in id", apiReq{method: "GET", path: "/webhook-subscriptions/x'%20OR%20'1'='1", template: tmplSub, token: "tok-acme"}, 404, "not-found", ""},
			{"SQL in id of delete", apiReq{method: "DELETE", path: "/webhook-subscriptions/x'%20OR%201=1--", template: tmplSub, token: "tok-acme"}, 404, "not-found", ""},
			{"SQL in cursor", apiReq{method: "GET", path: "/webhook-subscriptions?cursor=%27%20OR%201%3D1--", template: tmplSubs, token: "tok-acme"}, 422, "validation", "cursor"},
			{"SQL in status", apiReq{method: "GET", path: sub + "/deliveries?status=dead%27%20OR%20%271%27%3D%271", template: tmplDeliveries, token: "tok-acme"}, 422, "validation", "status"},
			{"SQL in URL host", post(withURL("https://x';DROP TABLE webhook_subscriptions;--/")), 422, "validation", "callbackUrl"},
			// Query parameters.
			{"limit zero", apiReq{method: "GET", path: "/webhook-subscriptions?limit=0", template: tmplSubs, token: "tok-acme"}, 422, "validation", "limit"},
			{"limit huge", apiReq{method: "GET", path: "/webhook-subscriptions?limit=99999999999999999999", template: tmplSubs, token: "tok-acme"}, 422, "validation", "limit"},
			{"limit twice", apiReq{method: "GET", path: sub + "/deliveries?limit=1&limit=2", template: tmplDeliveries, token: "tok-acme"}, 422, "validation", "limit"},
			{"malformed query", apiReq{method: "GET", path: "/webhook-subscriptions?limit=%zz", template: tmplSubs, token: "tok-acme"}, 400, "malformed-request", ""},
			// URLs that are not acceptable whatever their address.
			{"plain http", post(withURL("http://public.example/")), 422, "validation", "callbackUrl"},
			{"ftp", post(withURL("ftp://public.example/")), 422, "validation", "callbackUrl"},
			{"javascript", post(withURL("javascript:alert(1)")), 422, "validation", "callbackUrl"},
			{"relative", post(withURL("/hook")), 422, "validation", "callbackUrl"},
			{"scheme-relative", post(withURL("//public.example/hook")), 422, "validation", "callbackUrl"},
			{"no host", post(withURL("https:///hook")), 422, "validation", "callbackUrl"},
			{"userinfo", post(withURL("https://user:pass@public.example/")), 422, "validation", "callbackUrl"},
			{"userinfo hiding a host", post(withURL("https://public.example@127.0.0.1/")), 422, "validation", "callbackUrl"},
			{"backslash trick", post(withURL(`https://public.example\@127.0.0.1/`)), 422, "validation", "callbackUrl"},
			{"fragment", post(withURL("https://public.example/#x")), 422, "validation", "callbackUrl"},
			{"too long", post(withURL("https://public.example/" + strings.Repeat("a", MaxURLLength))), 422, "validation", "callbackUrl"},
			{"port zero", post(withURL("https://public.example:0/")), 422, "validation", "callbackUrl"},
			{"port too big", post(withURL("https://public.example:70000/")), 422, "validation", "callbackUrl"},
			{"unresolvable name", post(withURL("https://nxdomain.example/")), 422, "validation", "callbackUrl"},
			{"international name", post(withURL("https://exämple.com/")), 422, "validation", "callbackUrl"},
			// Private addresses in every spelling.
			{"loopback", post(withURL("https://127.0.0.1/")), 422, "validation", "callbackUrl"},
			{"loopback with port", post(withURL("https://127.0.0.1:8443/")), 422, "validation", "callbackUrl"},
			{"short loopback", post(withURL("https://127.1/")), 422, "validation", "callbackUrl"},
			{"three-part loopback", post(withURL("https://127.0.1/")), 422, "validation", "callbackUrl"},
			{"decimal loopback", post(withURL("https://2130706433/")), 422, "validation", "callbackUrl"},
			{"hex loopback", post(withURL("https://0x7f000001/")), 422, "validation", "callbackUrl"},
			{"dotted hex loopback", post(withURL("https://0x7f.0.0.1/")), 422, "validation", "callbackUrl"},
			{"octal loopback", post(withURL("https://0177.0.0.1/")), 422, "validation", "callbackUrl"},
			{"long octal loopback", post(withURL("https://017700000001/")), 422, "validation", "callbackUrl"},
			{"trailing dot loopback", post(withURL("https://127.0.0.1./")), 422, "validation", "callbackUrl"},
			{"percent-encoded host", post(withURL("https://%31%32%37.0.0.1/")), 422, "validation", "callbackUrl"},
			{"localhost", post(withURL("https://localhost/")), 422, "validation", "callbackUrl"},
			{"LOCALHOST trailing dot", post(withURL("https://LOCALHOST./")), 422, "validation", "callbackUrl"},
			{"sub.localhost", post(withURL("https://api.localhost/")), 422, "validation", "callbackUrl"},
			{"IPv6 loopback", post(withURL("https://[::1]/")), 422, "validation", "callbackUrl"},
			{"IPv4-mapped loopback", post(withURL("https://[::ffff:127.0.0.1]/")), 422, "validation", "callbackUrl"},
			{"IPv4-mapped hex", post(withURL("https://[::ffff:7f00:1]/")), 422, "validation", "callbackUrl"},
			{"IPv4-compatible", post(withURL("https://[::127.0.0.1]/")), 422, "validation", "callbackUrl"},
			{"NAT64 metadata", post(withURL("https://[64:ff9b::a9fe:a9fe]/")), 422, "validation", "callbackUrl"},
			{"IPv6 zone", post(withURL("https://[fe80::1%25eth0]/")), 422, "validation", "callbackUrl"},
			{"link-local IPv6", post(withURL("https://[fe80::1]/")), 422, "validation", "callbackUrl"},
			{"unique local IPv6", post(withURL("https://[fd00::1]/")), 422, "validation", "callbackUrl"},
			{"metadata service", post(withURL("http://169.254.169.254/latest/meta-data/")), 422, "validation", "callbackUrl"},
			{"metadata service https", post(withURL("https://169.254.169.254/latest/meta-data/")), 422, "validation", "callbackUrl"},
			{"metadata decimal", post(withURL("https://2852039166/")), 422, "validation", "callbackUrl"},
			{"RFC 1918 10/8", post(withURL("https://10.0.0.1/")), 422, "validation", "callbackUrl"},
			{"RFC 1918 octal", post(withURL("https://012.0.0.1/")), 422, "validation", "callbackUrl"},
			{"RFC 1918 172.16/12", post(withURL("https://172.16.5.4/")), 422, "validation", "callbackUrl"},
			{"RFC 1918 192.168/16 hex", post(withURL("https://0xc0a80001/")), 422, "validation", "callbackUrl"},
			{"CGNAT", post(withURL("https://100.64.0.1/")), 422, "validation", "callbackUrl"},
			{"unspecified", post(withURL("https://0.0.0.0/")), 422, "validation", "callbackUrl"},
			{"zero", post(withURL("https://0/")), 422, "validation", "callbackUrl"},
			{"broadcast", post(withURL("https://255.255.255.255/")), 422, "validation", "callbackUrl"},
			{"multicast", post(withURL("https://224.0.0.1/")), 422, "validation", "callbackUrl"},
			{"benchmarking", post(withURL("https://198.18.0.1/")), 422, "validation", "callbackUrl"},
			{"invalid dotted", post(withURL("https://1.2.3.4.5/")), 422, "validation", "callbackUrl"},
			{"name resolving to private", post(withURL("https://rebind.example/")), 422, "validation", "callbackUrl"},
			{"name resolving to metadata", post(withURL("https://metadata.example/")), 422, "validation", "callbackUrl"},
			{"name resolving to ::1", post(withURL("https://v6local.example/")), 422, "validation", "callbackUrl"},
			{"patch to loopback", patch(`{"callbackUrl":"https://127.1/"}`), 422, "validation", "callbackUrl"},
			// Other tenants' IDs.
			{"get foreign", apiReq{method: "GET", path: "/webhook-subscriptions/" + foreign, template: tmplSub, token: "tok-acme"}, 404, "not-found", ""},
			{"patch foreign", acmeJSONReq("PATCH", "/webhook-subscriptions/"+foreign, tmplSub, `{"callbackUrl":"https://public.example/stolen"}`), 404, "not-found", ""},
			{"delete foreign", apiReq{method: "DELETE", path: "/webhook-subscriptions/" + foreign, template: tmplSub, token: "tok-acme"}, 404, "not-found", ""},
			{"rotate foreign", apiReq{method: "POST", path: "/webhook-subscriptions/" + foreign + "/rotate-secret", template: tmplRotate, token: "tok-acme"}, 404, "not-found", ""},
			{"test foreign", apiReq{method: "POST", path: "/webhook-subscriptions/" + foreign + "/test", template: tmplTest, token: "tok-acme"}, 404, "not-found", ""},
			{"deliveries foreign", apiReq{method: "GET", path: "/webhook-subscriptions/" + foreign + "/deliveries", template: tmplDeliveries, token: "tok-acme"}, 404, "not-found", ""},
			{"retry foreign delivery via own subscription", apiReq{method: "POST", path: sub + "/deliveries/" + foreignDlv.ID + "/retry", template: tmplRetry, token: "tok-acme"}, 404, "not-found", ""},
			{"retry foreign", apiReq{method: "POST", path: "/webhook-subscriptions/" + foreign + "/deliveries/" + foreignDlv.ID + "/retry", template: tmplRetry, token: "tok-acme"}, 404, "not-found", ""},
			{"retry pending", apiReq{method: "POST", path: sub + "/deliveries/" + ownDlv.ID + "/retry", template: tmplRetry, token: "tok-acme"}, 409, "delivery-not-retryable", ""},
			// Methods.
			{"PUT subscription", acmeJSONReq("PUT", sub, "", `{"eventTypes":["order.*"],"callbackUrl":"https://public.example/"}`), 405, "method-not-allowed", ""},
			{"DELETE collection", apiReq{method: "DELETE", path: tmplSubs, token: "tok-acme"}, 405, "method-not-allowed", ""},
			{"POST event types", acmeJSONReq("POST", tmplEventTypes, "", `{"name":"x"}`), 405, "method-not-allowed", ""},
			{"TRACE", apiReq{method: "TRACE", path: sub, token: "tok-acme"}, 405, "method-not-allowed", ""},
			// Content types.
			{"no content type", apiReq{method: "POST", path: tmplSubs, token: "tok-acme", body: withURL("https://public.example/")}, 415, "unsupported-media-type", ""},
			{"text/plain", apiReq{method: "POST", path: tmplSubs, token: "tok-acme", ctype: "text/plain", body: withURL("https://public.example/")}, 415, "unsupported-media-type", ""},
			{"form", apiReq{method: "POST", path: tmplSubs, token: "tok-acme", ctype: "application/x-www-form-urlencoded", body: "callbackUrl=https://public.example/"}, 415, "unsupported-media-type", ""},
			{"latin-1 JSON", apiReq{method: "POST", path: tmplSubs, token: "tok-acme", ctype: "application/json; charset=iso-8859-1", body: withURL("https://public.example/")}, 415, "unsupported-media-type", ""},
			{"malformed content type", apiReq{method: "POST", path: tmplSubs, token: "tok-acme", ctype: "application/json; ===", body: withURL("https://public.example/")}, 415, "unsupported-media-type", ""},
			{"patch as text", apiReq{method: "PATCH", path: sub, template: tmplSub, token: "tok-acme", ctype: "text/plain", body: `{"enabled":false}`}, 415, "unsupported-media-type", ""},
			{"test with XML body", apiReq{method: "POST", path: sub + "/test", template: tmplTest, token: "tok-acme", ctype: "application/xml", body: `<x/>`}, 415, "unsupported-media-type", ""},
			// Authentication.
			{"no token", apiReq{method: "POST", path: tmplSubs, ctype: "application/json", body: withURL("https://public.example/")}, 401, "unauthorized", ""},
			{"forged token", apiReq{method: "DELETE", path: sub, template: tmplSub, token: "tok-acme' OR 1=1"}, 401, "unauthorized", ""},
		}
		if len(cases) < 30 {
			t.Fatalf("only %d hostile cases", len(cases))
		}
		before := storedSnapshot(t, api.db)
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				ex := api.do(c.r)
				p := wantProblem(t, ex, c.status, c.typ)
				if c.field != "" {
					found := false
					for _, f := range fieldErrorsOf(p) {
						found = found || f == c.field
					}
					if !found {
						t.Fatalf("errors %v do not name %q: %s", fieldErrorsOf(p), c.field, ex.Body)
					}
				}
				if len(ex.Body) > 8<<10 {
					t.Fatalf("problem document of %d bytes", len(ex.Body))
				}
				if c.status == 405 && ex.Header.Get("Allow") == "" {
					t.Fatal("405 without Allow")
				}
				if after := storedSnapshot(t, api.db); after != before {
					t.Fatalf("stored data changed:\nbefore:\n%s\nafter:\n%s", before, after)
				}
			})
		}
	})
}
