// Package webhookstest helps test code that sends webhooks with package
// webhooks, in the spirit of net/http/httptest.
//
// A [Receiver] is a real HTTP endpoint (an httptest.Server) that verifies the
// Standard Webhooks signature of every request with webhooks.Verifier,
// records it, and answers 200, unless told to fail ([Receiver.FailNext]) or
// to hang ([Receiver.HangNext]) for a while. A test waits for requests with
// [Receiver.WaitFor], which blocks on a channel rather than sleeping.
//
// A [Harness] runs a real Dispatcher against a migrated SQLite database in
// the test's temporary directory, so a test can subscribe receivers, publish
// events and look at the deliveries the dispatcher recorded:
//
//	func TestOrderPlacedIsDelivered(t *testing.T) {
//		h := webhookstest.NewHarness(t, webhooks.Config{
//			RetryPolicy: webhookstest.ImmediateRetries(3),
//		})
//		rc := webhookstest.NewReceiver(t) // Subscribe gives it the secret
//		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
//		defer cancel()
//		sub, err := h.Subscribe(ctx, rc, "acme", "order.*")
//		if err != nil {
//			t.Fatal(err)
//		}
//		rc.FailNext(1, http.StatusServiceUnavailable) // the first attempt fails
//
//		if _, err := h.Publish(ctx, webhooks.Event{Type: "order.placed", Tenant: "acme"}); err != nil {
//			t.Fatal(err)
//		}
//		got, err := rc.WaitForUnique(ctx, 1) // the retry succeeds
//		if err != nil {
//			t.Fatal(err)
//		}
//		if got[0].Type != "order.placed" {
//			t.Errorf("type %q", got[0].Type)
//		}
//		if err := h.Stop(ctx); err != nil { // records every attempt in flight
//			t.Fatal(err)
//		}
//		deliveries, err := h.Deliveries(ctx, sub)
//		if err != nil {
//			t.Fatal(err)
//		}
//		if d := deliveries[0]; d.State != webhooks.DeliverySucceeded || d.Attempts != 2 {
//			t.Errorf("delivery %s after %d attempts", d.State, d.Attempts)
//		}
//	}
//
// Delivery is at least once, so a receiver may see one webhook-id several
// times (retries, replays, a dispatcher that crashed mid-request).
// [Receiver.Requests] shows every request; [Receiver.Unique] shows one
// accepted request per webhook-id.
//
// The kit uses only the public API of package webhooks.
package webhookstest
