package webhookstest_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/outboxhook/webhooks"
	"github.com/outboxhook/webhooks/webhookstest"
)

// A Receiver verifies, records and answers webhooks. In a test, use
// NewReceiver(t, secret), which closes it when the test ends.
func ExampleReceiver() {
	secret, err := webhooks.NewSecret()
	if err != nil {
		log.Fatal(err)
	}
	rc, err := webhookstest.StartReceiver(secret)
	if err != nil {
		log.Fatal(err)
	}
	defer rc.Close()
	rc.FailNext(1, http.StatusServiceUnavailable)

	send := func(secret string) {
		body := []byte(`{"id":"evt_1","type":"order.placed","timestamp":"2025-01-02T03:04:05.123Z","data":{}}`)
		sig, err := webhooks.Sign(secret, "evt_1", time.Now(), body)
		if err != nil {
			log.Fatal(err)
		}
		req, err := http.NewRequest(http.MethodPost, rc.URL(), bytes.NewReader(body))
		if err != nil {
			log.Fatal(err)
		}
		req.Header.Set(webhooks.HeaderWebhookID, "evt_1")
		req.Header.Set(webhooks.HeaderWebhookTimestamp, fmt.Sprint(time.Now().Unix()))
		req.Header.Set(webhooks.HeaderWebhookSignature, sig)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			log.Fatal(err)
		}
		resp.Body.Close()
	}
	other, err := webhooks.NewSecret()
	if err != nil {
		log.Fatal(err)
	}
	send(other)  // wrong secret: 401
	send(secret) // FailNext: 503
	send(secret) // 200
	send(secret) // 200 again: a duplicate

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := rc.WaitFor(ctx, 4)
	if err != nil {
		log.Fatal(err)
	}
	for _, r := range got {
		fmt.Println(r.Seq, r.ID, r.Type, r.Status, errors.Is(r.VerifyErr, webhooks.ErrNoMatchingSignature))
	}
	fmt.Println("unique accepted:", len(rc.Unique()))
	// Output:
	// 1 evt_1 order.placed 401 true
	// 2 evt_1 order.placed 503 false
	// 3 evt_1 order.placed 200 false
	// 4 evt_1 order.placed 200 false
	// unique accepted: 1
}

// A Harness runs a dispatcher over a temporary SQLite database. In a test,
// use NewHarness(t, cfg), which keeps the database in t.TempDir() and stops
// everything when the test ends.
func ExampleHarness() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir, err := os.MkdirTemp("", "webhookstest-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	h, err := webhookstest.StartHarness(ctx, filepath.Join(dir, "app.db"), webhooks.Config{
		RetryPolicy: webhookstest.ImmediateRetries(2),
	})
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close(ctx)
	rc, err := webhookstest.StartReceiver()
	if err != nil {
		log.Fatal(err)
	}
	defer rc.Close()
	sub, err := h.Subscribe(ctx, rc, "acme", "order.*")
	if err != nil {
		log.Fatal(err)
	}
	rc.FailNext(1, http.StatusServiceUnavailable)

	if _, err := h.Publish(ctx, webhooks.Event{ID: "evt_1", Type: "order.placed", Tenant: "acme"}); err != nil {
		log.Fatal(err)
	}
	got, err := rc.WaitForUnique(ctx, 1)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("delivered", got[0].ID, got[0].Type)

	if err := h.Stop(ctx); err != nil { // records the attempts in flight
		log.Fatal(err)
	}
	deliveries, err := h.Deliveries(ctx, sub)
	if err != nil {
		log.Fatal(err)
	}
	for _, d := range deliveries {
		fmt.Println(d.State, "after", d.Attempts, "attempts")
		for _, a := range d.AttemptLog {
			fmt.Println(" attempt", a.Attempt, "answered", a.StatusCode)
		}
	}
	// Output:
	// delivered evt_1 order.placed
	// succeeded after 2 attempts
	//  attempt 1 answered 503
	//  attempt 2 answered 200
}
