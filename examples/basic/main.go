// Command basic is a small shop service with reliable outbound webhooks on an
// embedded SQLite database.
//
// It opens a database with store/sqlite.Open, creates its own orders table
// next to the outboxhook tables, starts the dispatcher, and starts three
// local receivers that verify every signature:
//
//   - fulfilment (tenant acme, "order.*"): always answers 200;
//   - accounting (tenant acme, "order.placed"): answers 503 to its first 3
//     requests, then recovers, so the dispatcher retries;
//   - globex (tenant globex, "*"): must receive globex's events and never
//     acme's.
//
// Each order is inserted and its event published in one transaction, then
// the dispatcher is notified. One transaction rolls back, so its event is
// never delivered. The program waits until every expected delivery has
// succeeded, prints a summary read back from the database, and exits 0 (or
// 1 on failure or after a timeout).
//
//	go run ./examples/basic            # database in a temporary directory
//	go run ./examples/basic -db shop.db  # keep the database (must not exist)
package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/outboxhook/webhooks"
	"github.com/outboxhook/webhooks/store/sqlite"
)

// timeout bounds the whole run; the example normally needs about a second.
const timeout = 30 * time.Second

// accountingOutage is how many requests the accounting receiver fails.
const accountingOutage = 3

func main() {
	dbPath := flag.String("db", "", "SQLite database file to create (default: a temporary directory, removed on exit)")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Stdout, *dbPath); err != nil {
		fmt.Fprintln(os.Stderr, "FAILED:", err)
		stop()
		os.Exit(1)
	}
}

// run is the whole example. dbPath names the database file to create; empty
// means a file in a temporary directory, removed when run returns.
func run(ctx context.Context, out io.Writer, dbPath string) (err error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	p := &printer{out: out, start: time.Now()}

	// --- The application's database: one handle for business data and webhooks.
	if dbPath == "" {
		dir, err := os.MkdirTemp("", "outboxhook-basic-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		dbPath = filepath.Join(dir, "shop.db")
	} else if _, err := os.Stat(dbPath); err == nil {
		return fmt.Errorf("%s exists; the example needs a fresh database file", dbPath)
	}
	db, err := sqlite.Open(ctx, dbPath)
	if err != nil {
		return err
	}
	defer db.Close()
	if _, err := db.ExecContext(ctx, `CREATE TABLE orders (
    id          INTEGER PRIMARY KEY,
    tenant      TEXT    NOT NULL,
    customer    TEXT    NOT NULL,
    total_cents INTEGER NOT NULL,
    status      TEXT    NOT NULL
)`); err != nil {
		return fmt.Errorf("create orders table: %w", err)
	}
	if err := webhooks.Migrate(ctx, db); err != nil {
		return err
	}
	p.printf("database   %s (orders table + outboxhook schema)", dbPath)

	// --- Receivers: three local HTTP servers that verify every signature.
	tr := newTracker()
	fulfilment, err := newReceiver("fulfilment", p, tr, nil)
	if err != nil {
		return err
	}
	defer fulfilment.srv.Close()
	var accountingRequests int
	var accountingMu sync.Mutex
	accounting, err := newReceiver("accounting", p, tr, func() (int, string) {
		accountingMu.Lock()
		defer accountingMu.Unlock()
		if accountingRequests++; accountingRequests <= accountingOutage {
			return http.StatusServiceUnavailable, fmt.Sprintf("503, simulated outage %d/%d", accountingRequests, accountingOutage)
		}
		return http.StatusOK, ""
	})
	if err != nil {
		return err
	}
	defer accounting.srv.Close()
	globex, err := newReceiver("globex", p, tr, nil)
	if err != nil {
		return err
	}
	defer globex.srv.Close()

	// A forged request never reaches a receiver's handler.
	if code, err := postForged(ctx, fulfilment.srv.URL); err != nil {
		return err
	} else if code != http.StatusUnauthorized {
		return fmt.Errorf("forged request answered %d, want 401", code)
	}
	p.printf("forged     POST with a bad signature to fulfilment → 401, rejected by Verifier.Middleware")

	// --- Subscriptions, scoped by tenant.
	subs, err := webhooks.NewSubscriptions(db, webhooks.SubscriptionsConfig{})
	if err != nil {
		return err
	}
	for _, s := range []struct {
		r      *receiver
		tenant string
		types  []string
	}{
		{fulfilment, "acme", []string{"order.*"}},
		{accounting, "acme", []string{"order.placed"}},
		{globex, "globex", []string{"*"}},
	} {
		sub, err := subs.Create(ctx, webhooks.Subscription{
			Tenant:      s.tenant,
			URL:         s.r.srv.URL + "/webhooks",
			EventTypes:  s.types,
			Secret:      s.r.secret, // the receiver's verifier holds the same secret
			Description: s.r.name,
		})
		if err != nil {
			return err
		}
		s.r.sub = sub
		p.printf("subscribed %-10s tenant %-6s %-12s → %s  (%s)", s.r.name, s.tenant, strings.Join(s.types, ","), sub.URL, sub.ID)
	}

	// --- The dispatcher, embedded in the service.
	disp, err := webhooks.NewDispatcher(db, webhooks.Config{
		// Short delays so the example finishes in seconds; the default
		// schedule retries over about a day.
		RetryPolicy: webhooks.ExponentialBackoff{
			Schedule: []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond},
			Jitter:   -1,
		},
		Logger: slog.New(slog.NewTextHandler(p, &slog.HandlerOptions{Level: slog.LevelWarn})),
		// The receivers here are local. By default loopback and private
		// addresses are refused when connecting, so that a tenant's
		// callback URL cannot reach into the service's own network.
		AllowedNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
	})
	if err != nil {
		return err
	}
	runErr := make(chan error, 1)
	go func() { runErr <- disp.Run(ctx) }()
	shutdown := func() error {
		sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer scancel()
		if err := disp.Shutdown(sctx); err != nil {
			return fmt.Errorf("dispatcher shutdown: %w", err)
		}
		if err := <-runErr; !errors.Is(err, webhooks.ErrDispatcherClosed) {
			return fmt.Errorf("dispatcher: %w", err)
		}
		return nil
	}
	shut := false
	defer func() {
		if !shut {
			if serr := shutdown(); err == nil {
				err = serr
			}
		}
	}()

	// --- Business transactions that publish events.
	shop := &shop{db: db, disp: disp, p: p, tr: tr}
	var acmeOrders []int64
	for i, o := range []struct {
		customer string
		cents    int
	}{{"Ada", 1999}, {"Grace", 4500}, {"Linus", 1250}, {"Barbara", 9900}, {"Ken", 300}} {
		id, err := shop.placeOrder(ctx, "acme", o.customer, o.cents, true)
		if err != nil {
			return err
		}
		acmeOrders = append(acmeOrders, id)
		if i == 2 {
			// A transaction that fails after publishing: it rolls back,
			// and the event goes with it.
			if _, err := shop.placeOrder(ctx, "acme", "Mallory", 100, false); err != nil {
				return err
			}
		}
	}
	if err := shop.shipOrder(ctx, "acme", acmeOrders[0]); err != nil {
		return err
	}
	if _, err := shop.placeOrder(ctx, "globex", "Hank", 7700, true); err != nil {
		return err
	}

	// What each receiver must get: its tenant's events matching its types.
	expect := map[*receiver][]string{
		fulfilment: tr.events("acme", ""),
		accounting: tr.events("acme", "order.placed"),
		globex:     tr.events("globex", ""),
	}
	total := 0
	for r, ids := range expect {
		tr.expect(r.name, ids)
		total += len(ids)
	}
	p.printf("waiting    for %d deliveries (fulfilment %d, accounting %d, globex %d)",
		total, len(expect[fulfilment]), len(expect[accounting]), len(expect[globex]))

	// --- Wait until every receiver has processed every expected event.
	for !tr.complete() {
		select {
		case <-tr.changed:
		case err := <-runErr:
			runErr <- err // for shutdown
			return fmt.Errorf("dispatcher stopped early: %v", err)
		case <-ctx.Done():
			return fmt.Errorf("timed out after %v waiting for deliveries:\n%s", timeout, tr.missing())
		}
	}
	p.printf("received   every expected event; shutting the dispatcher down")
	shut = true
	if err := shutdown(); err != nil {
		return err
	}

	// --- Summary, read back from the database.
	if err := tr.check(); err != nil {
		return err
	}
	p.printf("")
	p.printf("summary (Subscriptions.ListDeliveries)")
	allOK, failed := true, 0
	for _, r := range []*receiver{fulfilment, accounting, globex} {
		page, err := subs.ListDeliveries(ctx, r.sub.Tenant, r.sub.ID, webhooks.DeliveryListOptions{})
		if err != nil {
			return err
		}
		p.printf("  %s/%s (%s): %s", r.sub.Tenant, r.name, strings.Join(r.sub.EventTypes, ","), plural(len(page.Deliveries), "delivery", "deliveries"))
		got := map[string]bool{}
		for _, d := range page.Deliveries {
			got[d.EventID] = true
			var statuses []string
			for _, a := range d.AttemptLog {
				if a.StatusCode != 0 {
					statuses = append(statuses, strconv.Itoa(a.StatusCode))
				} else {
					statuses = append(statuses, "error")
				}
			}
			p.printf("    %s  %-10s attempts=%d %-9s %s", d.EventID, d.State, d.Attempts, "["+strings.Join(statuses, " ")+"]", tr.describe(d.EventID))
			if d.State != webhooks.DeliverySucceeded {
				allOK = false
			}
			failed += len(d.AttemptLog) - 1
		}
		if len(got) != len(expect[r]) {
			allOK = false
		}
		for _, id := range expect[r] {
			allOK = allOK && got[id]
		}
	}
	if !allOK {
		return errors.New("the database does not show every expected delivery as succeeded")
	}

	var orders int
	if err := db.QueryRowContext(ctx, `SELECT COUNT(*) FROM orders WHERE customer = 'Mallory'`).Scan(&orders); err != nil {
		return err
	}
	if orders != 0 {
		return errors.New("the rolled-back order is in the orders table")
	}
	own, foreign := tr.received("globex", "globex"), tr.received("globex", "acme")
	p.printf("")
	p.printf("OK  %d deliveries succeeded, %d of them after a retry (failed attempts: %d).", total, tr.retried(), failed)
	p.printf("    rollback:  no order row, nothing delivered.")
	p.printf("    isolation: globex received %s of its own and %d of acme's %d.",
		plural(own, "event", "events"), foreign, len(expect[fulfilment]))
	return nil
}

// shop is the application's business logic.
type shop struct {
	db   *sql.DB
	disp *webhooks.Dispatcher
	p    *printer
	tr   *tracker
}

// placeOrder inserts an order and publishes order.placed in the same
// transaction; with commit false the transaction rolls back instead.
func (s *shop) placeOrder(ctx context.Context, tenant, customer string, cents int, commit bool) (int64, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback() //nolint:errcheck // no-op after Commit

	res, err := tx.ExecContext(ctx, `INSERT INTO orders (tenant, customer, total_cents, status) VALUES (?, ?, ?, 'placed')`,
		tenant, customer, cents)
	if err != nil {
		return 0, err
	}
	orderID, err := res.LastInsertId()
	if err != nil {
		return 0, err
	}
	eventID, err := webhooks.Publish(ctx, tx, webhooks.Event{
		Type:   "order.placed",
		Tenant: tenant,
		Data:   map[string]any{"order_id": orderID, "customer": customer, "total_cents": cents},
	})
	if err != nil {
		return 0, err
	}
	if !commit {
		if err := tx.Rollback(); err != nil {
			return 0, err
		}
		s.tr.rolledBack(eventID)
		s.p.printf("rollback   %s  %-6s order placed by %s: transaction rolled back, nothing to deliver", eventID, tenant, customer)
		return 0, nil
	}
	what := fmt.Sprintf("order #%d placed by %s", orderID, customer)
	s.tr.published(eventID, tenant, "order.placed", what)
	if err := tx.Commit(); err != nil {
		return 0, err
	}
	s.disp.Notify() // deliver now rather than at the next poll
	s.p.printf("published  %s  %-6s %s", eventID, tenant, what)
	return orderID, nil
}

// shipOrder marks an order shipped and publishes order.shipped.
func (s *shop) shipOrder(ctx context.Context, tenant string, orderID int64) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() //nolint:errcheck // no-op after Commit

	if _, err := tx.ExecContext(ctx, `UPDATE orders SET status = 'shipped' WHERE id = ? AND tenant = ?`, orderID, tenant); err != nil {
		return err
	}
	eventID, err := webhooks.Publish(ctx, tx, webhooks.Event{
		Type:   "order.shipped",
		Tenant: tenant,
		Data:   map[string]any{"order_id": orderID},
	})
	if err != nil {
		return err
	}
	what := fmt.Sprintf("order #%d shipped", orderID)
	s.tr.published(eventID, tenant, "order.shipped", what)
	if err := tx.Commit(); err != nil {
		return err
	}
	s.disp.Notify()
	s.p.printf("published  %s  %-6s %s", eventID, tenant, what)
	return nil
}

// receiver is a webhook endpoint of another service.
type receiver struct {
	name   string
	secret string
	srv    *httptest.Server
	sub    webhooks.Subscription
}

// newReceiver starts a receiver that verifies signatures with
// Verifier.Middleware, deduplicates on webhook-id, and answers what fail
// says (nil: always 200).
func newReceiver(name string, p *printer, tr *tracker, fail func() (int, string)) (*receiver, error) {
	secret, err := webhooks.NewSecret()
	if err != nil {
		return nil, err
	}
	verifier, err := webhooks.NewVerifier(secret)
	if err != nil {
		return nil, err
	}
	r := &receiver{name: name, secret: secret}
	handle := func(w http.ResponseWriter, req *http.Request) {
		// Only verified requests get here.
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
		arrival := tr.arrived(name, id)
		if fail != nil {
			if code, why := fail(); code != http.StatusOK {
				p.printf("%-10s ← %s  %-13s verified, attempt %d → %s", name, id, msg.Type, arrival, why)
				http.Error(w, "temporarily unavailable", code)
				return
			}
		}
		if !tr.process(name, id) {
			// At least once: a repeat of a processed event is acknowledged
			// and ignored.
			p.printf("%-10s ← %s  %-13s verified, duplicate, ignored", name, id, msg.Type)
			w.WriteHeader(http.StatusOK)
			return
		}
		note := ""
		if arrival > 1 {
			note = fmt.Sprintf(" (succeeded on attempt %d)", arrival)
		}
		p.printf("%-10s ← %s  %-13s verified, attempt %d → 200 %s%s", name, id, msg.Type, arrival, msg.Data, note)
		w.WriteHeader(http.StatusOK)
	}
	r.srv = httptest.NewServer(verifier.Middleware(http.HandlerFunc(handle)))
	return r, nil
}

// postForged sends a webhook signed with a secret the receiver does not know.
func postForged(ctx context.Context, url string) (int, error) {
	other, err := webhooks.NewSecret()
	if err != nil {
		return 0, err
	}
	body := []byte(`{"id":"evt_forged","type":"order.placed","timestamp":"2024-01-01T00:00:00Z","data":{}}`)
	now := time.Now()
	sig, err := webhooks.Sign(other, "evt_forged", now, body)
	if err != nil {
		return 0, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set(webhooks.HeaderWebhookID, "evt_forged")
	req.Header.Set(webhooks.HeaderWebhookTimestamp, strconv.FormatInt(now.Unix(), 10))
	req.Header.Set(webhooks.HeaderWebhookSignature, sig)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// tracker records what was published and what each receiver processed.
type tracker struct {
	changed chan struct{} // signaled whenever a receiver processes an event

	mu        sync.Mutex
	order     []string                   // published event IDs in order
	info      map[string]eventInfo       // by event ID
	rollback  map[string]bool            // event IDs of rolled-back transactions
	arrivals  map[string]int             // receiver/eventID → requests seen
	processed map[string]map[string]bool // receiver → event IDs
	expected  map[string][]string        // receiver → event IDs
}

type eventInfo struct{ tenant, typ, what string }

func newTracker() *tracker {
	return &tracker{
		changed: make(chan struct{}, 1),
		info:    map[string]eventInfo{}, rollback: map[string]bool{}, arrivals: map[string]int{},
		processed: map[string]map[string]bool{}, expected: map[string][]string{},
	}
}

func (t *tracker) published(id, tenant, typ, what string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.order = append(t.order, id)
	t.info[id] = eventInfo{tenant, typ, what}
}

func (t *tracker) rolledBack(id string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.rollback[id] = true
}

// events returns the published events of tenant, of type typ ("" for any).
func (t *tracker) events(tenant, typ string) []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var ids []string
	for _, id := range t.order {
		if e := t.info[id]; e.tenant == tenant && (typ == "" || e.typ == typ) {
			ids = append(ids, id)
		}
	}
	return ids
}

// received counts the events of tenant that receiver processed.
func (t *tracker) received(receiver, tenant string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for id := range t.processed[receiver] {
		if t.info[id].tenant == tenant {
			n++
		}
	}
	return n
}

// retried counts the (receiver, event) pairs that needed more than one request.
func (t *tracker) retried() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, c := range t.arrivals {
		if c > 1 {
			n++
		}
	}
	return n
}

func (t *tracker) describe(id string) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.info[id]
	return e.tenant + ": " + e.what
}

func (t *tracker) expect(receiver string, ids []string) {
	t.mu.Lock()
	t.expected[receiver] = ids
	t.mu.Unlock()
	t.signal()
}

// arrived counts a verified request for the event and returns its number.
func (t *tracker) arrived(receiver, id string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.arrivals[receiver+"/"+id]++
	return t.arrivals[receiver+"/"+id]
}

// process records that receiver processed event id; false if it had already.
func (t *tracker) process(receiver, id string) bool {
	t.mu.Lock()
	seen := t.processed[receiver]
	if seen == nil {
		seen = map[string]bool{}
		t.processed[receiver] = seen
	}
	first := !seen[id]
	seen[id] = true
	t.mu.Unlock()
	t.signal()
	return first
}

func (t *tracker) signal() {
	select {
	case t.changed <- struct{}{}:
	default:
	}
}

// complete reports whether every receiver processed every expected event.
func (t *tracker) complete() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.expected) == 0 {
		return false
	}
	for r, ids := range t.expected {
		for _, id := range ids {
			if !t.processed[r][id] {
				return false
			}
		}
	}
	return true
}

func (t *tracker) missing() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var lines []string
	for r, ids := range t.expected {
		for _, id := range ids {
			if !t.processed[r][id] {
				lines = append(lines, fmt.Sprintf("  %s has not processed %s (%d requests seen)", r, id, t.arrivals[r+"/"+id]))
			}
		}
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// check verifies that no receiver processed anything it should not have:
// another tenant's event, an event of a type it did not subscribe to, or the
// event of a rolled-back transaction.
func (t *tracker) check() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	for r, seen := range t.processed {
		want := map[string]bool{}
		for _, id := range t.expected[r] {
			want[id] = true
		}
		for id := range seen {
			switch {
			case t.rollback[id]:
				return fmt.Errorf("%s received %s, the event of a rolled-back transaction", r, id)
			case !want[id]:
				return fmt.Errorf("%s received %s (%s %s), which it must not get", r, id, t.info[id].tenant, t.info[id].typ)
			}
		}
	}
	return nil
}

// printer writes timestamped lines, one goroutine at a time.
type printer struct {
	mu    sync.Mutex
	out   io.Writer
	start time.Time
}

func (p *printer) printf(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	line := fmt.Sprintf(format, args...)
	if line == "" {
		fmt.Fprintln(p.out)
		return
	}
	fmt.Fprintf(p.out, "%5.2fs  %s\n", time.Since(p.start).Seconds(), line)
}

// Write lets the dispatcher's logger share the output.
func (p *printer) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.Write(b)
}

func plural(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return strconv.Itoa(n) + " " + many
}
