package main

// The customers' side: webhook endpoints that subscribe through the API and
// verify what they receive.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/outboxhook/webhooks"
)

// receiver is a customer's webhook endpoint. It verifies every request with
// Verifier.Middleware, processes each event once (deduplicating on
// webhook-id), and answers 503 to its first failFirst requests.
type receiver struct {
	name, token string // token authenticates the customer to the API
	failFirst   int
	p           *printer
	changed     chan<- struct{}
	srv         *httptest.Server

	// verifier is set by subscribe, once the server has generated the
	// secret; until then every request is refused.
	verifier atomic.Pointer[webhooks.Verifier]

	subID, types string // the subscription, set by subscribe

	mu       sync.Mutex
	requests int             // verified requests
	attempts map[string]int  // verified requests per event ID
	done     map[string]bool // processed event IDs
}

func newReceiver(name, token string, failFirst int, p *printer, changed chan<- struct{}) *receiver {
	r := &receiver{name: name, token: token, failFirst: failFirst, p: p, changed: changed,
		attempts: map[string]int{}, done: map[string]bool{}}
	r.srv = httptest.NewServer(r)
	return r
}

// subscribe registers r's URL for eventTypes with POST
// /webhook-subscriptions, as a customer would, and verifies from then on
// with the secret in the answer.
func (r *receiver) subscribe(ctx context.Context, api, eventTypes string) error {
	body, err := json.Marshal(map[string]any{ // no "secret": the server generates one
		"callbackUrl": r.srv.URL + "/webhooks",
		"eventTypes":  []string{eventTypes},
	})
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, api+"/webhook-subscriptions", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+r.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		problem, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("subscribe %s: %s: %s", r.name, resp.Status, problem)
	}
	var created struct {
		ID     string `json:"subscriptionId"`
		Secret string `json:"secret"` // only in this answer
	}
	if err := json.NewDecoder(resp.Body).Decode(&created); err != nil {
		return err
	}
	v, err := webhooks.NewVerifier(created.Secret)
	if err != nil {
		return err
	}
	r.verifier.Store(v)
	r.subID, r.types = created.ID, eventTypes
	r.p.printf("subscribe  %-10s POST /api/webhook-subscriptions (Bearer %s) %s", r.name, r.token, body)
	r.p.printf("           → %s, Location: %s; secret kept by the receiver", resp.Status, resp.Header.Get("Location"))
	return nil
}

func (r *receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	v := r.verifier.Load()
	if v == nil {
		http.Error(w, "not subscribed yet", http.StatusServiceUnavailable)
		return
	}
	v.Middleware(http.HandlerFunc(r.handle)).ServeHTTP(w, req)
}

// handle serves verified requests only.
func (r *receiver) handle(w http.ResponseWriter, req *http.Request) {
	id := req.Header.Get(webhooks.HeaderWebhookID)
	var msg struct {
		ID   string          `json:"id"`
		Type string          `json:"type"`
		Data json.RawMessage `json:"data"`
	}
	if err := json.NewDecoder(req.Body).Decode(&msg); err != nil || msg.ID != id {
		http.Error(w, "bad payload", http.StatusBadRequest)
		return
	}

	r.mu.Lock()
	r.requests++
	r.attempts[id]++
	n, attempt, duplicate := r.requests, r.attempts[id], r.done[id]
	fail := n <= r.failFirst
	if !fail {
		r.done[id] = true
	}
	r.mu.Unlock()

	log := fmt.Sprintf("%-10s ← %s  %-13s verified, attempt %d →", r.name, id, msg.Type, attempt)
	switch {
	case fail:
		r.p.printf("%s 503, simulated outage %d/%d", log, n, r.failFirst)
		http.Error(w, "temporarily unavailable", http.StatusServiceUnavailable)
		return
	case duplicate: // at least once: acknowledge a repeat, do nothing
		r.p.printf("%s 200, duplicate ignored", log)
	case attempt > 1:
		r.p.printf("%s 200 %s (succeeded on attempt %d)", log, msg.Data, attempt)
	default:
		r.p.printf("%s 200 %s", log, msg.Data)
	}
	w.WriteHeader(http.StatusOK)
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

// has reports whether r processed every one of ids.
func (r *receiver) has(ids []string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, id := range ids {
		if !r.done[id] {
			return false
		}
	}
	return true
}

// processed returns the IDs of the events r processed.
func (r *receiver) processed() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	ids := make([]string, 0, len(r.done))
	for id := range r.done {
		ids = append(ids, id)
	}
	return ids
}

// postForged sends r a webhook signed with a secret it does not know, which
// its Verifier must refuse.
func postForged(ctx context.Context, p *printer, r *receiver) error {
	secret, err := webhooks.NewSecret()
	if err != nil {
		return err
	}
	body := []byte(`{"id":"evt_forged","type":"order.placed","timestamp":"2024-01-01T00:00:00Z","data":{}}`)
	now := time.Now()
	sig, err := webhooks.Sign(secret, "evt_forged", now, body)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.srv.URL+"/webhooks", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set(webhooks.HeaderWebhookID, "evt_forged")
	req.Header.Set(webhooks.HeaderWebhookTimestamp, strconv.FormatInt(now.Unix(), 10))
	req.Header.Set(webhooks.HeaderWebhookSignature, sig)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		return fmt.Errorf("forged webhook answered %s, want 401", resp.Status)
	}
	p.printf("forged     POST to %s signed with a wrong secret → %s, refused by Verifier.Middleware", r.name, resp.Status)
	return nil
}
