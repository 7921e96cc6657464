// Command postgres runs several webhook dispatcher processes against one
// PostgreSQL database, as the replicas of a scaled-out service would, and
// checks that every event reaches every subscription exactly once.
//
// The process you start is the coordinator. It:
//
//  1. connects to the database given by -dsn or $DATABASE_URL, creates a
//     schema of its own (dropped at exit unless -keep, so any database will
//     do) and runs webhooks.Migrate in it, next to an orders table;
//  2. starts three local receivers that verify every signature with
//     webhooks.Verifier, and subscribes them: fulfilment ("order.*"),
//     accounting ("order.placed") and analytics ("*");
//  3. starts -workers dispatcher processes: itself again with -worker, each
//     running a webhooks.Dispatcher on the same database (the DSN travels
//     in $DATABASE_URL, not on the command line);
//  4. places -events orders, each inserted together with its order.placed
//     event (webhooks.Publish) in the same transaction;
//  5. waits until every receiver has every event, stops the workers
//     gracefully, checks that no receiver got an event twice and that the
//     database shows every delivery succeeded at its first attempt, and
//     prints how many deliveries each worker made.
//
// The workers share the work through the database alone: each claims due
// deliveries with FOR UPDATE SKIP LOCKED under a lease, and LISTEN/NOTIFY
// wakes them when events commit.
//
//	go run ./examples/postgres -dsn 'postgres://user:password@localhost:5432/app?sslmode=disable'
//	DATABASE_URL=postgres://... go run ./examples/postgres -workers 4 -events 10000
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/outboxhook/webhooks"
	"github.com/outboxhook/webhooks/store/postgres"
)

const (
	// workerFlag makes the program a dispatcher process.
	workerFlag = "-worker"
	// readyLine is what a worker prints on stdout once it dispatches.
	readyLine = "dispatching"
	// userAgentPrefix + the worker's name is the User-Agent of its
	// deliveries, so the receivers can tell who delivered what.
	userAgentPrefix = "outboxhook-example/"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// cli runs the program with the given arguments and returns its exit code:
// 0 on success, 1 on failure, 2 for bad usage.
func cli(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("postgres", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	worker := fs.Bool(strings.TrimPrefix(workerFlag, "-"), false, "run as a dispatcher process (started by the coordinator)")
	name := fs.String("name", "worker", "with -worker: the worker's name")
	fs.StringVar(&o.DSN, "dsn", "", "PostgreSQL database URL (default $DATABASE_URL)")
	fs.IntVar(&o.Workers, "workers", 3, "dispatcher processes to start")
	fs.IntVar(&o.Events, "events", 3000, "orders to place, one order.placed event each")
	fs.IntVar(&o.PerTx, "per-tx", 10, "orders per transaction")
	fs.BoolVar(&o.Keep, "keep", false, "keep the example's schema instead of dropping it at exit")
	fs.DurationVar(&o.Timeout, "timeout", 5*time.Minute, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if o.DSN == "" {
		o.DSN = os.Getenv("DATABASE_URL")
	}
	if o.DSN == "" {
		fmt.Fprintln(stderr, "no database: pass -dsn or set DATABASE_URL to a PostgreSQL URL")
		return 2
	}
	var err error
	if *worker {
		err = runWorker(ctx, o.DSN, *name, stdin, stdout, stderr)
	} else {
		err = run(ctx, stdout, o)
	}
	if err != nil {
		fmt.Fprintln(stderr, "FAILED:", err)
		return 1
	}
	return 0
}

// runWorker is a dispatcher process: it delivers until stdin closes (the
// coordinator closes it, or exits) or ctx ends (SIGINT, SIGTERM), then shuts
// down gracefully, finishing the deliveries in flight.
func runWorker(ctx context.Context, dsn, name string, stdin io.Reader, stdout, stderr io.Writer) error {
	db, err := postgres.Open(ctx, dsn)
	if err != nil {
		return err
	}
	defer db.Close()
	disp, err := webhooks.NewDispatcher(db, webhooks.Config{
		UserAgent: userAgentPrefix + name,
		// The example's receivers listen on loopback, which the dispatcher
		// refuses to connect to unless allowed; a real service leaves this
		// empty, so tenants' URLs cannot reach into its own network.
		AllowedNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")},
		Logger:          slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		return err
	}
	runErr := make(chan error, 1)
	go func() { runErr <- disp.Run(context.WithoutCancel(ctx)) }()
	stdinClosed := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, stdin)
		close(stdinClosed)
	}()
	fmt.Fprintln(stdout, readyLine)
	select {
	case <-stdinClosed:
	case <-ctx.Done():
	case err := <-runErr:
		return fmt.Errorf("dispatcher stopped: %w", err)
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := disp.Shutdown(sctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if err := <-runErr; !errors.Is(err, webhooks.ErrDispatcherClosed) {
		return fmt.Errorf("dispatcher: %w", err)
	}
	return nil
}

// options configure the coordinator.
type options struct {
	DSN     string
	Workers int
	Events  int
	PerTx   int
	Keep    bool
	Timeout time.Duration
}

// run is the coordinator.
func run(ctx context.Context, out io.Writer, o options) (err error) {
	if o.Workers < 1 || o.Events < 1 || o.PerTx < 1 {
		return errors.New("-workers, -events and -per-tx must be positive")
	}
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	p := &printer{out: out, start: time.Now()}

	// --- A schema of our own in the given database.
	admin, err := postgres.Open(ctx, o.DSN)
	if err != nil {
		return err
	}
	defer admin.Close()
	schema := "outboxhook_example_" + randomHex(4)
	if _, err := admin.ExecContext(ctx, "CREATE SCHEMA "+schema); err != nil {
		return fmt.Errorf("create schema: %w", err)
	}
	if o.Keep {
		p.printf("schema     %s (kept: -keep)", schema)
	} else {
		p.printf("schema     %s (dropped at exit)", schema)
		defer func() {
			dctx, dcancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer dcancel()
			if _, derr := admin.ExecContext(dctx, "DROP SCHEMA "+schema+" CASCADE"); derr != nil && err == nil {
				err = fmt.Errorf("drop schema: %w", derr)
			}
		}()
	}
	dsn, err := withSearchPath(o.DSN, schema)
	if err != nil {
		return err
	}
	db, err := postgres.Open(ctx, dsn)
	if err != nil {
		return err
	}
	defer db.Close()
	if err := webhooks.Migrate(ctx, db); err != nil {
		return err
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE orders (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer    TEXT   NOT NULL,
    total_cents BIGINT NOT NULL
)`); err != nil {
		return fmt.Errorf("create orders table: %w", err)
	}
	p.printf("migrated   outboxhook tables + orders table")

	// --- Receivers and their subscriptions.
	tr := newTracker()
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	defer srv.Close()
	subs, err := webhooks.NewSubscriptions(db, webhooks.SubscriptionsConfig{})
	if err != nil {
		return err
	}
	endpoints := []struct{ name, types string }{
		{"fulfilment", "order.*"},
		{"accounting", "order.placed"},
		{"analytics", "*"},
	}
	for _, e := range endpoints {
		secret, err := webhooks.NewSecret()
		if err != nil {
			return err
		}
		verifier, err := webhooks.NewVerifier(secret)
		if err != nil {
			return err
		}
		mux.Handle("/"+e.name, verifier.Middleware(tr.handler(e.name)))
		sub, err := subs.Create(ctx, webhooks.Subscription{
			URL: srv.URL + "/" + e.name, EventTypes: []string{e.types}, Secret: secret, Description: e.name,
		})
		if err != nil {
			return err
		}
		p.printf("subscribed %-10s %-12s → %s (%s)", e.name, e.types, sub.URL, sub.ID)
	}

	// --- The workers: this program again, with -worker.
	workers := make([]*worker, 0, o.Workers)
	defer func() {
		for _, w := range workers {
			w.kill() // no-op for those stopped below
		}
	}()
	exited := make(chan *worker, o.Workers)
	for i := 1; i <= o.Workers; i++ {
		w, err := startWorker(fmt.Sprintf("worker-%d", i), dsn, p, exited)
		if err != nil {
			return err
		}
		workers = append(workers, w)
	}
	var pids []string
	for _, w := range workers {
		select {
		case <-w.ready:
			pids = append(pids, fmt.Sprintf("%s (pid %d)", w.name, w.cmd.Process.Pid))
		case w := <-exited:
			return fmt.Errorf("%s exited before dispatching: %v", w.name, w.err)
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", w.name, ctx.Err())
		}
	}
	p.printf("started    %d dispatcher processes: %s", len(workers), strings.Join(pids, ", "))

	// --- The business: each order and its event commit together.
	want := o.Events * len(endpoints)
	tr.expectTotal(want)
	published := time.Now()
	var ids []string
	txs := 0
	for n := 0; n < o.Events; n += o.PerTx {
		batch, err := placeOrders(ctx, db, n, min(o.PerTx, o.Events-n))
		if err != nil {
			return err
		}
		ids = append(ids, batch...)
		txs++
	}
	p.printf("published %d order.placed events in %d transactions in %v; waiting for %d deliveries",
		len(ids), txs, time.Since(published).Round(time.Millisecond), want)

	for done := false; !done; {
		select {
		case <-tr.complete:
			done = true
		case w := <-exited:
			return fmt.Errorf("%s exited early: %v", w.name, w.err)
		case <-ctx.Done():
			return fmt.Errorf("%d of %d deliveries after %v: %w", tr.unique(), want, o.Timeout, ctx.Err())
		}
	}
	took := time.Since(published)
	p.printf("delivered  all %d in %v (%.0f deliveries/s); stopping the workers", want, took.Round(time.Millisecond), float64(want)/took.Seconds())
	for _, w := range workers {
		w.stdin.Close()
	}
	for _, w := range workers {
		select {
		case <-w.done:
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s to stop: %w", w.name, ctx.Err())
		}
		if w.err != nil {
			return fmt.Errorf("%s: %w", w.name, w.err)
		}
	}

	// --- Exactly once, as the receivers and the database see it.
	dups, missing := tr.check(ids, endpoints[0].name, endpoints[1].name, endpoints[2].name)
	var succeeded, attempts, other int
	if err := db.QueryRowContext(ctx, `SELECT
    COUNT(*) FILTER (WHERE state = 'succeeded'),
    COALESCE(SUM(attempts), 0),
    COUNT(*) FILTER (WHERE state <> 'succeeded')
FROM webhook_deliveries`).Scan(&succeeded, &attempts, &other); err != nil {
		return err
	}
	p.printf("")
	p.printf("per worker (deliveries made, from the receivers' User-Agent):")
	counts := tr.perWorker()
	names := make([]string, 0, len(counts))
	for n := range counts {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		p.printf("  %-10s %6d  %s", n, counts[n], strings.Repeat("#", counts[n]*40/max(want, 1)))
	}
	p.printf("database:  %d deliveries succeeded, %d attempts, %d in another state", succeeded, attempts, other)
	switch {
	case missing > 0:
		return fmt.Errorf("%d deliveries never arrived", missing)
	case dups > 0:
		return fmt.Errorf("%d deliveries arrived more than once", dups)
	case succeeded != want || attempts != want || other != 0:
		return fmt.Errorf("database: %d succeeded, %d attempts, %d other; want %d, %d, 0", succeeded, attempts, other, want, want)
	}
	p.printf("OK  %d deliveries (%d events × %d subscriptions) by %d worker processes, each exactly once: 0 duplicates, 0 missing.",
		want, o.Events, len(endpoints), len(workers))
	return nil
}

// placeOrders inserts n orders, and publishes an event for each, in one
// transaction; first numbers the customers.
func placeOrders(ctx context.Context, db *sql.DB, first, n int) ([]string, error) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback() //nolint:errcheck // no-op after Commit
	ids := make([]string, 0, n)
	for i := first; i < first+n; i++ {
		customer := fmt.Sprintf("customer-%d", i)
		cents := 100 + i%9900
		var orderID int64
		if err := tx.QueryRowContext(ctx, `INSERT INTO orders (customer, total_cents) VALUES ($1, $2) RETURNING id`,
			customer, cents).Scan(&orderID); err != nil {
			return nil, fmt.Errorf("insert order: %w", err)
		}
		id, err := webhooks.Publish(ctx, tx, webhooks.Event{
			Type: "order.placed",
			Data: map[string]any{"order_id": orderID, "customer": customer, "total_cents": cents},
		})
		if err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	if err := tx.Commit(); err != nil {
		return nil, err
	}
	return ids, nil
}

// worker is a dispatcher process started by the coordinator.
type worker struct {
	name  string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	ready chan struct{}
	done  chan struct{} // closed when it has exited; err is set then
	err   error
}

// startWorker starts this program again as a dispatcher process. Its
// stderr is printed with its name; exited receives it when it exits.
func startWorker(name, dsn string, p *printer, exited chan<- *worker) (*worker, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	w := &worker{name: name, ready: make(chan struct{}), done: make(chan struct{})}
	w.cmd = exec.Command(self, workerFlag, "-name", name)
	w.cmd.Env = append(os.Environ(), "DATABASE_URL="+dsn)
	w.cmd.Stderr = &linePrinter{p: p, prefix: name + " | "}
	w.cmd.Stdout = &linePrinter{p: p, prefix: name + " | ", onLine: func(line string) bool {
		if line == readyLine {
			close(w.ready)
			return true
		}
		return false
	}}
	if w.stdin, err = w.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	if err := w.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		w.err = w.cmd.Wait()
		close(w.done)
		exited <- w
	}()
	return w, nil
}

// kill ends a worker that is still running (after a failure) and waits for
// it.
func (w *worker) kill() {
	select {
	case <-w.done:
	default:
		_ = w.cmd.Process.Kill()
		<-w.done
	}
}

// tracker records what the receivers got.
type tracker struct {
	complete chan struct{} // closed once want distinct deliveries arrived

	mu      sync.Mutex
	want    int
	got     map[string]int // receiver + "/" + event ID → requests
	workers map[string]int // worker name → requests
}

func newTracker() *tracker {
	return &tracker{complete: make(chan struct{}), got: map[string]int{}, workers: map[string]int{}}
}

func (t *tracker) expectTotal(n int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.want = n
	t.maybeComplete()
}

func (t *tracker) maybeComplete() {
	if t.want > 0 && len(t.got) == t.want {
		select {
		case <-t.complete:
		default:
			close(t.complete)
		}
	}
}

// handler is a receiver's endpoint; Verifier.Middleware lets only verified
// requests reach it.
func (t *tracker) handler(receiver string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var msg struct {
			ID   string `json:"id"`
			Type string `json:"type"`
		}
		id := r.Header.Get(webhooks.HeaderWebhookID)
		if err := json.NewDecoder(r.Body).Decode(&msg); err != nil || msg.ID != id {
			http.Error(w, "bad payload", http.StatusBadRequest)
			return
		}
		t.mu.Lock()
		t.got[receiver+"/"+id]++
		t.workers[strings.TrimPrefix(r.Header.Get("User-Agent"), userAgentPrefix)]++
		t.maybeComplete()
		t.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	})
}

func (t *tracker) unique() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.got)
}

// check counts the extra requests and the events of ids some receiver
// never got.
func (t *tracker) check(ids []string, receivers ...string) (dups, missing int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, r := range receivers {
		for _, id := range ids {
			if t.got[r+"/"+id] == 0 {
				missing++
			}
		}
	}
	for _, n := range t.got {
		dups += n - 1
	}
	return dups, missing
}

func (t *tracker) perWorker() map[string]int {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[string]int, len(t.workers))
	for k, v := range t.workers {
		out[k] = v
	}
	return out
}

// printer writes timestamped lines; it is safe for concurrent use.
type printer struct {
	mu    sync.Mutex
	out   io.Writer
	start time.Time
}

func (p *printer) printf(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.out, "%7.3fs  %s\n", time.Since(p.start).Seconds(), fmt.Sprintf(format, args...))
}

// linePrinter prints what a worker writes, line by line, with a prefix;
// onLine may claim a line so it is not printed.
type linePrinter struct {
	p       *printer
	prefix  string
	onLine  func(string) bool
	mu      sync.Mutex
	partial []byte
}

func (l *linePrinter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.partial = append(l.partial, b...)
	for {
		i := bytes.IndexByte(l.partial, '\n')
		if i < 0 {
			return len(b), nil
		}
		line := string(l.partial[:i])
		l.partial = l.partial[i+1:]
		if l.onLine == nil || !l.onLine(line) {
			l.p.printf("%s%s", l.prefix, line)
		}
	}
}

// withSearchPath returns dsn with its search_path set to schema, in URL or
// keyword/value form.
func withSearchPath(dsn, schema string) (string, error) {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return "", fmt.Errorf("database URL: %w", err)
		}
		q := u.Query()
		q.Set("search_path", schema)
		u.RawQuery = q.Encode()
		return u.String(), nil
	}
	return dsn + " search_path=" + schema, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
