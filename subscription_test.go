package webhooks

import (
	"context"
	"database/sql"
	"encoding/base64"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestSubscriptionCRUD(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		ctx := context.Background()

		sub, err := subs.Create(ctx, Subscription{
			Tenant: "acme", URL: "https://example.com/hook", EventTypes: []string{"order.*", "payment.failed"},
			Description: "orders", Metadata: map[string]string{"team": "ops"},
		})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(sub.ID, "sub_") || sub.Disabled || sub.CreatedAt.IsZero() || !sub.CreatedAt.Equal(sub.UpdatedAt) {
			t.Fatalf("created %+v", sub)
		}
		key, err := ParseSecret(sub.Secret)
		if err != nil || len(key) != 32 {
			t.Fatalf("generated secret: %d bytes, %v", len(key), err)
		}

		got, err := subs.Get(ctx, "acme", sub.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.URL != sub.URL || got.Secret != sub.Secret || got.Description != "orders" || got.Metadata["team"] != "ops" ||
			strings.Join(got.EventTypes, ",") != "order.*,payment.failed" || !got.CreatedAt.Equal(sub.CreatedAt) {
			t.Fatalf("got %+v, want %+v", got, sub)
		}
		if _, err := subs.Get(ctx, "globex", sub.ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("other tenant's Get: %v", err)
		}

		clock.Advance(time.Minute)
		newURL, desc, off := "https://example.com/v2", "new", true
		up, err := subs.Update(ctx, "acme", sub.ID, SubscriptionUpdate{URL: &newURL, Description: &desc, Disabled: &off, EventTypes: []string{"*"}})
		if err != nil {
			t.Fatal(err)
		}
		if up.URL != newURL || up.Description != desc || !up.Disabled || up.DisabledReason == "" || up.EventTypes[0] != "*" ||
			!up.UpdatedAt.After(up.CreatedAt) || up.Metadata["team"] != "ops" || up.Secret != sub.Secret {
			t.Fatalf("updated %+v", up)
		}
		on := false
		up, err = subs.Update(ctx, "acme", sub.ID, SubscriptionUpdate{Disabled: &on})
		if err != nil || up.Disabled || up.DisabledReason != "" {
			t.Fatalf("re-enabled %+v %v", up, err)
		}
		bad := "ftp://x"
		if _, err := subs.Update(ctx, "acme", sub.ID, SubscriptionUpdate{URL: &bad}); !errors.Is(err, ErrInvalidSubscription) {
			t.Fatalf("invalid update: %v", err)
		}
		if got, _ := subs.Get(ctx, "acme", sub.ID); got.URL != newURL {
			t.Fatalf("invalid update changed the URL to %q", got.URL)
		}
		if _, err := subs.Update(ctx, "globex", sub.ID, SubscriptionUpdate{URL: &bad}); !errors.Is(err, ErrNotFound) {
			t.Fatalf("other tenant's Update: %v", err)
		}

		if err := subs.Delete(ctx, "acme", sub.ID); err != nil {
			t.Fatal(err)
		}
		if _, err := subs.Get(ctx, "acme", sub.ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get after Delete: %v", err)
		}
		if err := subs.Delete(ctx, "acme", sub.ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("second Delete: %v", err)
		}
	})
}

func TestSubscriptionListPaginates(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		ctx := context.Background()
		var want []string
		for i := 0; i < 7; i++ {
			s, err := subs.Create(ctx, Subscription{Tenant: "acme", URL: fmt.Sprintf("https://e.com/%d", i), EventTypes: []string{"*"}})
			if err != nil {
				t.Fatal(err)
			}
			want = append(want, s.ID)
		}
		if _, err := subs.Create(ctx, Subscription{Tenant: "globex", URL: "https://g.com", EventTypes: []string{"*"}}); err != nil {
			t.Fatal(err)
		}
		var got []string
		cursor := ""
		pages := 0
		for {
			page, err := subs.List(ctx, "acme", ListOptions{Limit: 3, Cursor: cursor})
			if err != nil {
				t.Fatal(err)
			}
			pages++
			for _, s := range page.Subscriptions {
				got = append(got, s.ID)
			}
			if page.NextCursor == "" {
				break
			}
			cursor = page.NextCursor
		}
		if pages != 3 || strings.Join(got, ",") != strings.Join(want, ",") {
			t.Fatalf("%d pages: %v, want %v", pages, got, want)
		}
		if n, err := subs.Count(ctx, "acme"); err != nil || n != 7 {
			t.Fatalf("Count: %d %v", n, err)
		}
		for _, limit := range []int{-1, ListLimitMax + 1} {
			if _, err := subs.List(ctx, "acme", ListOptions{Limit: limit}); !errors.Is(err, ErrInvalidSubscription) {
				t.Fatalf("limit %d: %v", limit, err)
			}
		}
	})
}

func TestSubscriptionValidation(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		ctx := context.Background()
		key := func(n int) string { return SecretPrefix + base64.StdEncoding.EncodeToString(make([]byte, n)) }
		ok := Subscription{URL: "https://example.com/h", EventTypes: []string{"a.b"}}
		with := func(f func(*Subscription)) Subscription { s := ok; f(&s); return s }
		cases := map[string]Subscription{
			"no URL":            with(func(s *Subscription) { s.URL = "" }),
			"relative URL":      with(func(s *Subscription) { s.URL = "/hook" }),
			"ftp URL":           with(func(s *Subscription) { s.URL = "ftp://example.com" }),
			"userinfo":          with(func(s *Subscription) { s.URL = "https://u:p@example.com" }),
			"no host":           with(func(s *Subscription) { s.URL = "https:///x" }),
			"long URL":          with(func(s *Subscription) { s.URL = "https://e.com/" + strings.Repeat("a", MaxURLLength) }),
			"no event types":    with(func(s *Subscription) { s.EventTypes = nil }),
			"bad pattern":       with(func(s *Subscription) { s.EventTypes = []string{"order.*.x"} }),
			"bad pattern 2":     with(func(s *Subscription) { s.EventTypes = []string{"order*"} }),
			"empty pattern":     with(func(s *Subscription) { s.EventTypes = []string{""} }),
			"short secret":      with(func(s *Subscription) { s.Secret = key(16) }),
			"long secret":       with(func(s *Subscription) { s.Secret = key(65) }),
			"unprefixed secret": with(func(s *Subscription) { s.Secret = base64.StdEncoding.EncodeToString(make([]byte, 32)) }),
			"long description":  with(func(s *Subscription) { s.Description = strings.Repeat("d", MaxDescriptionLength+1) }),
			"empty metadata key": with(func(s *Subscription) {
				s.Metadata = map[string]string{"": "v"}
			}),
			"big metadata value": with(func(s *Subscription) {
				s.Metadata = map[string]string{"k": strings.Repeat("v", MaxMetadataValueBytes+1)}
			}),
			"bad tenant": with(func(s *Subscription) { s.Tenant = "a\x00b" }),
		}
		for name, s := range cases {
			t.Run(name, func(t *testing.T) {
				_, err := subs.Create(ctx, s)
				if !errors.Is(err, ErrInvalidSubscription) {
					t.Fatalf("err = %v, want ErrInvalidSubscription", err)
				}
				if s.Secret != "" && strings.Contains(err.Error(), s.Secret) {
					t.Fatal("the error message contains the secret")
				}
			})
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_subscriptions`); n != 0 {
			t.Fatalf("%d subscriptions written by invalid creates", n)
		}
		for _, n := range []int{24, 64} {
			if _, err := subs.Create(ctx, with(func(s *Subscription) { s.Secret = key(n) })); err != nil {
				t.Fatalf("%d-byte secret: %v", n, err)
			}
		}
	})
}

func TestMatchPattern(t *testing.T) {
	cases := []struct {
		pattern, typ string
		want         bool
	}{
		{"*", "order.shipped", true},
		{"order.*", "order.shipped", true},
		{"order.*", "order.item.added", true},
		{"order.*", "order", false},
		{"order.*", "orders.shipped", false},
		{"order.shipped", "order.shipped", true},
		{"order.shipped", "order.shipped.late", false},
		{"order.shipped", "order.Shipped", false},
	}
	for _, c := range cases {
		if got := matchPattern(c.pattern, c.typ); got != c.want {
			t.Errorf("matchPattern(%q, %q) = %v, want %v", c.pattern, c.typ, got, c.want)
		}
	}
}

func TestRotateSecretValidation(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)
		ctx := context.Background()
		sub, err := subs.Create(ctx, Subscription{URL: "https://e.com", EventTypes: []string{"*"}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := subs.RotateSecret(ctx, "", sub.ID, "whsec_short", time.Hour); !errors.Is(err, ErrInvalidSubscription) {
			t.Fatalf("bad secret: %v", err)
		}
		if _, err := subs.RotateSecret(ctx, "", sub.ID, "", -time.Hour); !errors.Is(err, ErrInvalidSubscription) {
			t.Fatalf("negative grace: %v", err)
		}
		if _, err := subs.RotateSecret(ctx, "other", sub.ID, "", time.Hour); !errors.Is(err, ErrNotFound) {
			t.Fatalf("other tenant: %v", err)
		}
		if got, _ := subs.Get(ctx, "", sub.ID); got.Secret != sub.Secret {
			t.Fatal("a refused rotation changed the secret")
		}
	})
}

// subscriptionRowSnapshot renders the stored row of a subscription, the
// operations columns included.
func subscriptionRowSnapshot(t testing.TB, db *sql.DB, id string) string {
	t.Helper()
	var url, headers, reason string
	var rate float64
	var failures int
	var failingSince, lastSuccess sql.NullInt64
	var enabled bool
	var updated int64
	err := db.QueryRow(`SELECT url, headers, rate_limit, consecutive_failures, failing_since, last_success_at,
		enabled, disabled_reason, updated_at FROM webhook_subscriptions WHERE id = $1`, id).
		Scan(&url, &headers, &rate, &failures, &failingSince, &lastSuccess, &enabled, &reason, &updated)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("url=%s headers=%s rate=%v failures=%d failing=%v success=%v enabled=%v reason=%q updated=%d",
		url, headers, rate, failures, failingSince, lastSuccess, enabled, reason, updated)
}

func TestSubscriptionHeadersAndRateLimitValidation(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		ctx := context.Background()
		many := map[string]string{}
		for i := 0; i <= MaxHeaders; i++ {
			many[fmt.Sprintf("X-H%d", i)] = "v"
		}
		big := map[string]string{}
		for i := 0; i < 9; i++ {
			big[fmt.Sprintf("X-H%d", i)] = strings.Repeat("v", 1000)
		}
		badHeaders := map[string]map[string]string{
			"too many":          many,
			"too big":           big,
			"empty name":        {"": "v"},
			"space in name":     {"X Token": "v"},
			"colon in name":     {"X-Token:": "v"},
			"non-ASCII name":    {"X-Tökén": "v"},
			"long name":         {"X-" + strings.Repeat("a", MaxHeaderNameBytes): "v"},
			"CR in value":       {"X-Token": "a\rb"},
			"LF in value":       {"X-Token": "a\nInjected: yes"},
			"NUL in value":      {"X-Token": "a\x00b"},
			"control in value":  {"X-Token": "a\x01b"},
			"DEL in value":      {"X-Token": "a\x7fb"},
			"invalid UTF-8":     {"X-Token": "a\xffb"},
			"leading space":     {"X-Token": " v"},
			"trailing tab":      {"X-Token": "v\t"},
			"webhook-id":        {"webhook-id": "evt_x"},
			"Webhook-Signature": {"Webhook-Signature": "v1,x"},
			"WEBHOOK-anything":  {"WEBHOOK-Custom": "x"},
			"content-type":      {"content-type": "text/plain"},
			"Content-Length":    {"Content-Length": "1"},
			"Content-Encoding":  {"Content-Encoding": "gzip"},
			"host":              {"host": "evil.example"},
			"User-Agent":        {"User-Agent": "x"},
			"Transfer-Encoding": {"Transfer-Encoding": "chunked"},
			"Connection":        {"Connection": "close"},
			"Keep-Alive":        {"Keep-Alive": "1"},
			"TE":                {"TE": "trailers"},
			"Upgrade":           {"Upgrade": "h2c"},
			"Proxy-Authorization": {
				"Proxy-Authorization": "Basic x"},
			"same name twice": {"x-token": "a", "X-Token": "b"},
		}
		badRates := map[string]float64{"negative": -1, "NaN": math.NaN(), "+Inf": math.Inf(1), "-Inf": math.Inf(-1)}
		ok := Subscription{Tenant: "acme", URL: "https://example.com/h", EventTypes: []string{"*"}}

		for name, h := range badHeaders {
			t.Run("create headers "+name, func(t *testing.T) {
				s := ok
				s.Headers = h
				if _, err := subs.Create(ctx, s); !errors.Is(err, ErrInvalidSubscription) {
					t.Fatalf("err = %v, want ErrInvalidSubscription", err)
				}
			})
		}
		for name, r := range badRates {
			t.Run("create rate "+name, func(t *testing.T) {
				s := ok
				s.RateLimit = r
				if _, err := subs.Create(ctx, s); !errors.Is(err, ErrInvalidSubscription) {
					t.Fatalf("err = %v, want ErrInvalidSubscription", err)
				}
			})
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_subscriptions`); n != 0 {
			t.Fatalf("%d subscriptions written by invalid creates", n)
		}

		// Valid headers are stored with canonical names; the caller's map
		// is left as it was.
		in := map[string]string{"authorization": "Bearer tok", "x-api-key": "k\tv", "X-Empty": ""}
		s := ok
		s.Headers, s.RateLimit = in, 2.5
		sub, err := subs.Create(ctx, s)
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]string{"Authorization": "Bearer tok", "X-Api-Key": "k\tv", "X-Empty": ""}
		if fmt.Sprint(sub.Headers) != fmt.Sprint(want) || sub.RateLimit != 2.5 {
			t.Fatalf("created headers %v rate %v", sub.Headers, sub.RateLimit)
		}
		if _, changed := in["Authorization"]; changed {
			t.Fatal("Create changed the caller's map")
		}
		got, err := subs.Get(ctx, "acme", sub.ID)
		if err != nil || fmt.Sprint(got.Headers) != fmt.Sprint(want) || got.RateLimit != 2.5 {
			t.Fatalf("Get: %v %v %v", got.Headers, got.RateLimit, err)
		}
		page, err := subs.List(ctx, "acme", ListOptions{})
		if err != nil || len(page.Subscriptions) != 1 || fmt.Sprint(page.Subscriptions[0].Headers) != fmt.Sprint(want) {
			t.Fatalf("List: %+v %v", page, err)
		}
		var stored string
		if err := db.QueryRow(`SELECT headers FROM webhook_subscriptions WHERE id = $1`, sub.ID).Scan(&stored); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(stored, `"Authorization":"Bearer tok"`) || strings.Contains(stored, "authorization") {
			t.Fatalf("stored headers %s", stored)
		}

		// Invalid updates change nothing.
		before := subscriptionRowSnapshot(t, db, sub.ID)
		clock.Advance(time.Minute)
		for name, h := range badHeaders {
			if _, err := subs.Update(ctx, "acme", sub.ID, SubscriptionUpdate{Headers: h}); !errors.Is(err, ErrInvalidSubscription) {
				t.Errorf("update headers %s: %v", name, err)
			}
		}
		for name, r := range badRates {
			if _, err := subs.Update(ctx, "acme", sub.ID, SubscriptionUpdate{RateLimit: &r}); !errors.Is(err, ErrInvalidSubscription) {
				t.Errorf("update rate %s: %v", name, err)
			}
		}
		if after := subscriptionRowSnapshot(t, db, sub.ID); after != before {
			t.Fatalf("invalid updates changed the row:\n%s\n%s", before, after)
		}

		// Nil leaves headers and rate as they are; an empty map clears the
		// headers; zero removes the rate limit.
		desc := "x"
		up, err := subs.Update(ctx, "acme", sub.ID, SubscriptionUpdate{Description: &desc})
		if err != nil || fmt.Sprint(up.Headers) != fmt.Sprint(want) || up.RateLimit != 2.5 {
			t.Fatalf("unrelated update: %v %v %v", up.Headers, up.RateLimit, err)
		}
		zero := 0.0
		up, err = subs.Update(ctx, "acme", sub.ID, SubscriptionUpdate{Headers: map[string]string{}, RateLimit: &zero})
		if err != nil || len(up.Headers) != 0 || up.RateLimit != 0 {
			t.Fatalf("clearing update: %v %v %v", up.Headers, up.RateLimit, err)
		}
		if got, _ := subs.Get(ctx, "acme", sub.ID); len(got.Headers) != 0 || got.RateLimit != 0 {
			t.Fatalf("after clearing: %v %v", got.Headers, got.RateLimit)
		}
		if _, err := subs.Update(ctx, "globex", sub.ID, SubscriptionUpdate{RateLimit: &zero}); !errors.Is(err, ErrNotFound) {
			t.Fatalf("other tenant's update: %v", err)
		}
	})
}

func TestSubscriptionHealthIsReadOnlyAndResetOnEnable(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)
		ctx := context.Background()

		// Create ignores the health fields.
		sub, err := subs.Create(ctx, Subscription{Tenant: "acme", URL: "https://example.com/h", EventTypes: []string{"*"},
			ConsecutiveFailures: 7, FailingSince: clock.Now(), LastSuccessAt: clock.Now()})
		if err != nil {
			t.Fatal(err)
		}
		if sub.ConsecutiveFailures != 0 || !sub.FailingSince.IsZero() || !sub.LastSuccessAt.IsZero() {
			t.Fatalf("created with health %+v", sub)
		}
		if s := subscriptionRowSnapshot(t, db, sub.ID); !strings.Contains(s, "failures=0 failing={0 false} success={0 false}") {
			t.Fatalf("stored health: %s", s)
		}

		// The dispatcher's health check recorded failures and disabled it.
		failing := clock.Now().Add(-time.Hour).UTC().Truncate(time.Millisecond)
		success := clock.Now().Add(-2 * time.Hour).UTC().Truncate(time.Millisecond)
		setHealth := func(enabled bool) {
			t.Helper()
			if _, err := db.Exec(`UPDATE webhook_subscriptions SET consecutive_failures = 5, failing_since = $1,
				last_success_at = $2, enabled = $3, disabled_reason = $4 WHERE id = $5`,
				failing.UnixMilli(), success.UnixMilli(), enabled, map[bool]string{false: "endpoint failing", true: ""}[enabled], sub.ID); err != nil {
				t.Fatal(err)
			}
		}
		setHealth(false)
		for _, get := range []func() (Subscription, error){
			func() (Subscription, error) { return subs.Get(ctx, "acme", sub.ID) },
			func() (Subscription, error) {
				p, err := subs.List(ctx, "acme", ListOptions{})
				if err != nil || len(p.Subscriptions) != 1 {
					return Subscription{}, fmt.Errorf("list: %v %v", p, err)
				}
				return p.Subscriptions[0], nil
			},
		} {
			got, err := get()
			if err != nil {
				t.Fatal(err)
			}
			if got.ConsecutiveFailures != 5 || !got.FailingSince.Equal(failing) || !got.LastSuccessAt.Equal(success) || !got.Disabled {
				t.Fatalf("health read back as %+v", got)
			}
		}

		// Updates that do not enable it leave the health alone.
		desc, off := "d", true
		for _, u := range []SubscriptionUpdate{{Description: &desc}, {Disabled: &off}} {
			up, err := subs.Update(ctx, "acme", sub.ID, u)
			if err != nil || up.ConsecutiveFailures != 5 || !up.FailingSince.Equal(failing) {
				t.Fatalf("update %+v: %+v %v", u, up, err)
			}
		}

		// Enabling resets failures and failing-since, keeps the last success.
		on := false
		up, err := subs.Update(ctx, "acme", sub.ID, SubscriptionUpdate{Disabled: &on})
		if err != nil {
			t.Fatal(err)
		}
		if up.Disabled || up.DisabledReason != "" || up.ConsecutiveFailures != 0 || !up.FailingSince.IsZero() || !up.LastSuccessAt.Equal(success) {
			t.Fatalf("re-enabled: %+v", up)
		}
		got, _ := subs.Get(ctx, "acme", sub.ID)
		if got.ConsecutiveFailures != 0 || !got.FailingSince.IsZero() || !got.LastSuccessAt.Equal(success) || got.Disabled {
			t.Fatalf("stored after re-enabling: %+v", got)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_subscriptions WHERE failing_since IS NULL AND consecutive_failures = 0`); n != 1 {
			t.Fatal("health columns not reset")
		}

		// Setting enabled on a subscription that is enabled already is not
		// a way around the health check.
		setHealth(true)
		up, err = subs.Update(ctx, "acme", sub.ID, SubscriptionUpdate{Disabled: &on})
		if err != nil || up.ConsecutiveFailures != 5 || !up.FailingSince.Equal(failing) {
			t.Fatalf("enabled again while enabled: %+v %v", up, err)
		}
		if got, _ := subs.Get(ctx, "acme", sub.ID); got.ConsecutiveFailures != 5 {
			t.Fatalf("stored: %+v", got)
		}
	})
}

func TestHandlerHeadersRateLimitAndHealth(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		api := newTestAPIOn(t, db, HandlerConfig{})
		base := `"eventTypes":["*"],"callbackUrl":"https://public.example/"`
		for _, c := range []struct {
			body, field string
		}{
			{`{` + base + `,"headers":{"Host":"x"}}`, "headers"},
			{`{` + base + `,"headers":{"webhook-id":"x"}}`, "headers"},
			{`{` + base + `,"headers":{"X-A":"a\r\nB: b"}}`, "headers"},
			{`{` + base + `,"headers":{"X A":"a"}}`, "headers"},
			{`{` + base + `,"headers":{"X-A":1}}`, "headers"},
			{`{` + base + `,"headers":["X-A"]}`, "headers"},
			{`{` + base + `,"headers":null}`, "headers"},
			{`{` + base + `,"rateLimit":-1}`, "rateLimit"},
			{`{` + base + `,"rateLimit":"10"}`, "rateLimit"},
			{`{` + base + `,"rateLimit":1e999}`, "rateLimit"},
		} {
			p := wantProblem(t, api.do(acmeJSONReq("POST", tmplSubs, "", c.body)), 422, "validation")
			if f := fieldErrorsOf(p); len(f) == 0 || f[0] != c.field {
				t.Errorf("%s: errors on %v, want %s", c.body, f, c.field)
			}
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_subscriptions`); n != 0 {
			t.Fatalf("%d subscriptions written by refused creates", n)
		}

		created := api.create("tok-acme", `{`+base+`,"headers":{"authorization":"Bearer t","x-trace":"1"},"rateLimit":2.5}`)
		id := created["subscriptionId"].(string)
		hs, _ := created["headers"].(map[string]any)
		if fmt.Sprint(hs) != "map[Authorization:Bearer t X-Trace:1]" || created["rateLimit"] != 2.5 || created["consecutiveFailures"] != float64(0) {
			t.Fatalf("created %v", created)
		}
		if _, ok := created["failingSince"]; ok {
			t.Fatalf("a healthy subscription has failingSince: %v", created)
		}
		path := "/webhook-subscriptions/" + id
		before := storedSnapshot(t, db) + subscriptionRowSnapshot(t, db, id)
		wantProblem(t, api.do(acmeJSONReq("PATCH", path, tmplSub, `{"headers":{"Content-Length":"1"}}`)), 422, "validation")
		wantProblem(t, api.do(acmeJSONReq("PATCH", path, tmplSub, `{"rateLimit":-0.5}`)), 422, "validation")
		wantProblem(t, api.do(apiReq{method: "PATCH", path: path, template: tmplSub, token: "tok-globex", ctype: "application/json",
			body: `{"headers":{}}`}), 404, "not-found")
		if after := storedSnapshot(t, db) + subscriptionRowSnapshot(t, db, id); after != before {
			t.Fatal("refused updates changed the subscription")
		}

		// The dispatcher disabled the failing endpoint.
		failing := time.Now().Add(-time.Hour).UnixMilli()
		if _, err := db.Exec(`UPDATE webhook_subscriptions SET consecutive_failures = 9, failing_since = $1, last_success_at = $2,
			enabled = FALSE, disabled_reason = 'failing' WHERE id = $3`, failing, failing-1000, id); err != nil {
			t.Fatal(err)
		}
		got := api.do(apiReq{method: "GET", path: path, template: tmplSub, token: "tok-acme"}).json(t)
		if got["consecutiveFailures"] != float64(9) || got["failingSince"] != fromMilli(failing).Format(time.RFC3339Nano) ||
			got["lastSuccessAt"] != fromMilli(failing-1000).Format(time.RFC3339Nano) || got["enabled"] != false {
			t.Fatalf("health read back as %v", got)
		}
		ex := api.do(acmeJSONReq("PATCH", path, tmplSub, `{"enabled":true,"headers":{},"rateLimit":0}`))
		if ex.Status != http.StatusOK {
			t.Fatalf("PATCH: %d %s", ex.Status, ex.Body)
		}
		up := ex.json(t)
		if _, failingNow := up["failingSince"]; failingNow || up["consecutiveFailures"] != float64(0) || up["enabled"] != true ||
			up["rateLimit"] != float64(0) || fmt.Sprint(up["headers"]) != "map[]" || up["lastSuccessAt"] == nil {
			t.Fatalf("re-enabled %v", up)
		}
		list := api.do(apiReq{method: "GET", path: tmplSubs, token: "tok-acme"}).json(t)["data"].([]any)
		if l := list[0].(map[string]any); l["consecutiveFailures"] != float64(0) || l["headers"] == nil {
			t.Fatalf("listed %v", l)
		}
	})
}
