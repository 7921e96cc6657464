// Command basic is a small shop service with reliable outbound webhooks on an
// embedded SQLite database.
//
// The service keeps its orders and the webhook tables in one database, runs
// the dispatcher in-process, and serves the subscription API
// (webhooks.NewHandler) under /api/, where a bearer token stands for a
// tenant. Three customer endpoints (receivers.go) subscribe through that API
// over HTTP and verify every webhook with the secret the server generated:
//
//   - fulfilment (tenant acme, "order.*"): always answers 200;
//   - accounting (tenant acme, "order.placed"): answers 503 to its first 3
//     requests, so the dispatcher retries;
//   - globex (tenant globex, "*"): must never see acme's events.
//
// Each order is inserted and its event published in one transaction; one
// transaction rolls back, so its event is never delivered. The program waits
// for every expected delivery, prints a summary read back from the database,
// and exits 0 (or 1 on failure or after a timeout).
//
//	go run ./examples/basic              # database in a temporary directory
//	go run ./examples/basic -db shop.db  # keep the database (must not exist)
package main

import (
	"context"
	"database/sql"
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
	"strings"
	"sync"
	"time"

	"github.com/outboxhook/webhooks"
	"github.com/outboxhook/webhooks/store/sqlite"
)

// timeout bounds the whole run; it normally takes well under a second.
const timeout = 30 * time.Second

// tokens maps the API's bearer tokens to the tenants they act for.
var tokens = map[string]string{"tok-acme": "acme", "tok-globex": "globex"}

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
func run(ctx context.Context, out io.Writer, dbPath string) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	p := &printer{out: out, start: time.Now()}
	logger := slog.New(slog.NewTextHandler(p, &slog.HandlerOptions{Level: slog.LevelWarn}))

	// --- One database for the orders and the webhook tables.
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
	if _, err := db.ExecContext(ctx, `CREATE TABLE orders (id INTEGER PRIMARY KEY,
		tenant TEXT NOT NULL, customer TEXT NOT NULL, total_cents INTEGER NOT NULL, status TEXT NOT NULL)`); err != nil {
		return err
	}
	if err := webhooks.Migrate(ctx, db); err != nil {
		return err
	}
	p.printf("database   %s (orders table + outboxhook schema)", dbPath)

	// --- The dispatcher, embedded in the service.
	// By default callback URLs may not reach loopback or private addresses,
	// so that a tenant cannot make the service call into its own network.
	// The receivers here are local.
	local := []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	disp, err := webhooks.NewDispatcher(db, webhooks.Config{
		// Short delays so the example finishes quickly; the default
		// schedule retries over about a day.
		RetryPolicy: webhooks.ExponentialBackoff{Jitter: -1, Schedule: []time.Duration{
			100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond}},
		AllowedNetworks: local,
		Logger:          logger,
	})
	if err != nil {
		return err
	}
	runErr := make(chan error, 1)
	go func() { runErr <- disp.Run(ctx) }()
	shutdown := sync.OnceValue(func() error {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		return disp.Shutdown(sctx) // lets deliveries in flight finish
	})
	defer shutdown()

	// --- The subscription API, mounted under /api/.
	subs, err := webhooks.NewSubscriptions(db, webhooks.SubscriptionsConfig{})
	if err != nil {
		return err
	}
	api, err := webhooks.NewHandler(subs, webhooks.HandlerConfig{
		Authenticate: func(r *http.Request) (string, error) {
			token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if tenant, known := tokens[token]; ok && known {
				return tenant, nil
			}
			return "", errors.New("unknown bearer token")
		},
		AllowHTTP:       true, // the local receivers are plain http
		AllowedNetworks: local,
		Notify:          disp.Notify,
		Logger:          logger,
	})
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("/api/", http.StripPrefix("/api", api))
	apiSrv := httptest.NewServer(mux)
	defer apiSrv.Close()
	p.printf("api        %s/api/webhook-subscriptions", apiSrv.URL)

	// --- Customers start their endpoints and subscribe them over HTTP.
	changed := make(chan struct{}, 1) // a receiver processed an event
	fulfilment := newReceiver("fulfilment", "tok-acme", 0, p, changed)
	accounting := newReceiver("accounting", "tok-acme", 3, p, changed) // 3 × 503, then 200s
	globex := newReceiver("globex", "tok-globex", 0, p, changed)
	receivers := []*receiver{fulfilment, accounting, globex}
	for _, sub := range []struct {
		r     *receiver
		types string
	}{{fulfilment, "order.*"}, {accounting, "order.placed"}, {globex, "*"}} {
		defer sub.r.srv.Close()
		if err := sub.r.subscribe(ctx, apiSrv.URL+"/api", sub.types); err != nil {
			return err
		}
	}
	if err := postForged(ctx, p, fulfilment); err != nil {
		return err
	}

	// --- Business transactions that publish events.
	s := &shop{db: db, disp: disp, p: p, events: map[string]event{}}
	var first int64
	for _, o := range []struct {
		tenant, customer string
		cents            int
	}{
		{"acme", "Ada", 1999}, {"acme", "Grace", 4500}, {"acme", "Linus", 1250},
		{"acme", "Barbara", 9900}, {"acme", "Ken", 300}, {"globex", "Hank", 7700},
	} {
		id, err := s.placeOrder(ctx, o.tenant, o.customer, o.cents, true)
		if err != nil {
			return err
		}
		if first == 0 {
			first = id
		}
	}
	// A transaction that fails after publishing: the event goes with it.
	if _, err := s.placeOrder(ctx, "acme", "Mallory", 100, false); err != nil {
		return err
	}
	if err := s.shipOrder(ctx, "acme", first); err != nil {
		return err
	}

	// --- Wait until each receiver has processed what it must get.
	expect := map[*receiver][]string{
		fulfilment: s.eventIDs("acme", ""),
		accounting: s.eventIDs("acme", "order.placed"),
		globex:     s.eventIDs("globex", ""),
	}
	total := len(expect[fulfilment]) + len(expect[accounting]) + len(expect[globex])
	p.printf("waiting    for %d deliveries (fulfilment %d, accounting %d, globex %d)",
		total, len(expect[fulfilment]), len(expect[accounting]), len(expect[globex]))
	for !(fulfilment.has(expect[fulfilment]) && accounting.has(expect[accounting]) && globex.has(expect[globex])) {
		select {
		case <-changed:
		case err := <-runErr:
			return fmt.Errorf("dispatcher stopped early: %w", err)
		case <-ctx.Done():
			return fmt.Errorf("timed out after %v waiting for deliveries", timeout)
		}
	}
	p.printf("received   every expected event; shutting the dispatcher down")
	if err := shutdown(); err != nil {
		return fmt.Errorf("dispatcher shutdown: %w", err)
	}

	// --- Summary, read back from the database.
	p.printf("")
	p.printf("summary (Subscriptions.ListDeliveries)")
	retried, failed := 0, 0
	for _, r := range receivers {
		// r has every expected event; any more would be another tenant's,
		// another type, or the rolled-back one.
		if got := r.processed(); len(got) != len(expect[r]) {
			return fmt.Errorf("%s processed %d events, want %d", r.name, len(got), len(expect[r]))
		}
		tenant := tokens[r.token]
		page, err := subs.ListDeliveries(ctx, tenant, r.subID, webhooks.DeliveryListOptions{})
		if err != nil {
			return err
		}
		p.printf("  %s/%s (%s): %s", tenant, r.name, r.types, plural(len(page.Deliveries), "delivery", "deliveries"))
		if len(page.Deliveries) != len(expect[r]) {
			return fmt.Errorf("the database has %d deliveries to %s, want %d", len(page.Deliveries), r.name, len(expect[r]))
		}
		for _, d := range page.Deliveries {
			var codes []string
			for _, a := range d.AttemptLog {
				codes = append(codes, fmt.Sprint(a.StatusCode))
			}
			e := s.events[d.EventID]
			p.printf("    %s  %-9s %-9s  %s: %s", d.EventID, d.State, "["+strings.Join(codes, " ")+"]", e.tenant, e.what)
			if d.State != webhooks.DeliverySucceeded {
				return fmt.Errorf("delivery of %s to %s is %s", d.EventID, r.name, d.State)
			}
			if d.Attempts > 1 {
				retried++
			}
			failed += len(d.AttemptLog) - 1
		}
	}
	var mallory int
	if err := db.QueryRowContext(ctx, `SELECT COUNT(*) FROM orders WHERE customer = 'Mallory'`).Scan(&mallory); err != nil {
		return err
	}
	if mallory != 0 {
		return errors.New("the rolled-back order is in the orders table")
	}
	own, foreign := 0, 0
	for _, id := range globex.processed() {
		if s.events[id].tenant == "globex" {
			own++
		} else {
			foreign++
		}
	}
	p.printf("")
	p.printf("OK  %d deliveries succeeded, %d of them after a retry (failed attempts: %d).", total, retried, failed)
	p.printf("    rollback:  no order row, nothing delivered.")
	p.printf("    isolation: globex received %s of its own and %d of acme's %d.",
		plural(own, "event", "events"), foreign, len(expect[fulfilment]))
	return nil
}

// shop is the application's business logic.
type shop struct {
	db     *sql.DB
	disp   *webhooks.Dispatcher
	p      *printer
	events map[string]event // committed, by ID
}

type event struct{ tenant, typ, what string }

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
	id, err := res.LastInsertId()
	if err != nil {
		return 0, err
	}
	data := map[string]any{"order_id": id, "customer": customer, "total_cents": cents}
	if !commit {
		evt, err := webhooks.Publish(ctx, tx, webhooks.Event{Type: "order.placed", Tenant: tenant, Data: data})
		if err != nil {
			return 0, err
		}
		s.p.printf("rollback   %s  %-6s order placed by %s: rolled back, nothing to deliver", evt, tenant, customer)
		return 0, tx.Rollback()
	}
	return id, s.commit(ctx, tx, tenant, "order.placed", data, fmt.Sprintf("order #%d placed by %s", id, customer))
}

// shipOrder marks an order shipped and publishes order.shipped.
func (s *shop) shipOrder(ctx context.Context, tenant string, id int64) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() //nolint:errcheck // no-op after Commit

	if _, err := tx.ExecContext(ctx, `UPDATE orders SET status = 'shipped' WHERE id = ? AND tenant = ?`, id, tenant); err != nil {
		return err
	}
	return s.commit(ctx, tx, tenant, "order.shipped", map[string]any{"order_id": id}, fmt.Sprintf("order #%d shipped", id))
}

// commit publishes the event in tx, commits, and wakes the dispatcher.
func (s *shop) commit(ctx context.Context, tx *sql.Tx, tenant, typ string, data map[string]any, what string) error {
	id, err := webhooks.Publish(ctx, tx, webhooks.Event{Type: typ, Tenant: tenant, Data: data})
	if err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	s.disp.Notify() // deliver now rather than at the next poll
	s.events[id] = event{tenant, typ, what}
	s.p.printf("published  %s  %-6s %s", id, tenant, what)
	return nil
}

// eventIDs returns the committed events of tenant, of type typ ("" for any).
func (s *shop) eventIDs(tenant, typ string) []string {
	var ids []string
	for id, e := range s.events {
		if e.tenant == tenant && (typ == "" || e.typ == typ) {
			ids = append(ids, id)
		}
	}
	return ids
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
	if format == "" {
		fmt.Fprintln(p.out)
		return
	}
	fmt.Fprintf(p.out, "%5.2fs  %s\n", time.Since(p.start).Seconds(), fmt.Sprintf(format, args...))
}

// Write lets the logger share the output.
func (p *printer) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.Write(b)
}

func plural(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}
