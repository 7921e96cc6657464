package webhooks

import (
	"context"
	"database/sql"
	"encoding/base64"
	"errors"
	"fmt"
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
