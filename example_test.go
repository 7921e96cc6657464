package webhooks_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/outboxhook/webhooks"
	"github.com/outboxhook/webhooks/store/sqlite"
)

// Publish an event in the same transaction as the business change: it is
// delivered if and only if the transaction commits.
func ExamplePublish() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "outboxhook-example")
	defer os.RemoveAll(dir)
	db, err := sqlite.Open(ctx, filepath.Join(dir, "app.db"))
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	if err := webhooks.Migrate(ctx, db); err != nil {
		log.Fatal(err)
	}
	if _, err := db.Exec(`CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT)`); err != nil {
		log.Fatal(err)
	}

	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `UPDATE orders SET status = 'shipped' WHERE id = $1`, "or_1"); err != nil {
		log.Fatal(err)
	}
	_, err = webhooks.Publish(ctx, tx, webhooks.Event{
		ID:     "or_1.shipped", // optional: makes publishing idempotent
		Type:   "order.shipped",
		Tenant: "acme",
		Data:   map[string]string{"orderId": "or_1", "trackingNumber": "1Z999"},
	})
	if err != nil {
		log.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		log.Fatal(err)
	}
	fmt.Println("published")
	// Output: published
}

// Run the dispatcher next to the application and stop it gracefully.
func ExampleDispatcher() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "outboxhook-example")
	defer os.RemoveAll(dir)
	db, err := sqlite.Open(ctx, filepath.Join(dir, "app.db"))
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	if err := webhooks.Migrate(ctx, db); err != nil {
		log.Fatal(err)
	}

	received := make(chan string, 1)
	receiver := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		received <- r.Header.Get("webhook-id")
	}))
	defer receiver.Close()

	subs, err := webhooks.NewSubscriptions(db, webhooks.SubscriptionsConfig{})
	if err != nil {
		log.Fatal(err)
	}
	if _, err := subs.Create(ctx, webhooks.Subscription{
		Tenant: "acme", URL: receiver.URL, EventTypes: []string{"order.*"},
	}); err != nil {
		log.Fatal(err)
	}

	d, err := webhooks.NewDispatcher(db, webhooks.Config{
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		// The receiver here is local; by default loopback and private
		// addresses are refused at dial time.
		AllowedNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
	})
	if err != nil {
		log.Fatal(err)
	}
	go d.Run(ctx) //nolint:errcheck // returns ErrDispatcherClosed after Shutdown

	if _, err := webhooks.Publish(ctx, db, webhooks.Event{ID: "evt_1", Type: "order.placed", Tenant: "acme"}); err != nil {
		log.Fatal(err)
	}
	d.Notify() // deliver now instead of at the next poll
	fmt.Println("received", <-received)

	if err := d.Shutdown(ctx); err != nil {
		log.Fatal(err)
	}
	// Output: received evt_1
}

// Subscriptions are scoped by tenant: another tenant's IDs are not found.
func ExampleSubscriptions() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "outboxhook-example")
	defer os.RemoveAll(dir)
	db, err := sqlite.Open(ctx, filepath.Join(dir, "app.db"))
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	if err := webhooks.Migrate(ctx, db); err != nil {
		log.Fatal(err)
	}
	subs, err := webhooks.NewSubscriptions(db, webhooks.SubscriptionsConfig{})
	if err != nil {
		log.Fatal(err)
	}
	sub, err := subs.Create(ctx, webhooks.Subscription{
		Tenant:     "acme",
		URL:        "https://client.example.com/webhooks",
		EventTypes: []string{"order.*", "payment.failed"},
	})
	if err != nil {
		log.Fatal(err)
	}
	_, err = subs.Get(ctx, "globex", sub.ID)
	fmt.Println(errors.Is(err, webhooks.ErrNotFound))
	// Output: true
}
