package webhooks

// Benchmarks of the library against hand-written baselines measured in the
// same run. Every figure that matters is a ratio computed inside one
// benchmark function that alternates the library and its baseline, so that
// machine noise hits both alike. See BENCHMARKS.md for the commands and the
// figures:
//
//	go test -run '^$' -bench . -benchtime=2s .

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/outboxhook/webhooks/store"
	"github.com/outboxhook/webhooks/store/sqlite"
)

// ---------------------------------------------------------------------------
// Shared helpers (all prefixed bench, to stay clear of the other test files).

// benchLogger discards everything the dispatcher logs.
var benchLogger = slog.New(slog.NewTextHandler(io.Discard, nil))

// benchOrder is the small struct published as an event's Data.
type benchOrder struct {
	OrderID     int64  `json:"orderId"`
	Customer    string `json:"customer"`
	SKU         string `json:"sku"`
	Quantity    int    `json:"quantity"`
	AmountCents int64  `json:"amountCents"`
	Currency    string `json:"currency"`
}

func benchOrderN(i int64) benchOrder {
	return benchOrder{
		OrderID: i, Customer: "cus_8f14e45fceea167a", SKU: benchSKUs[i%int64(len(benchSKUs))],
		Quantity: 1 + int(i%5), AmountCents: 1999 + i%1000, Currency: "EUR",
	}
}

const (
	benchEventType = "order.created"
	benchTenant    = "acme"
)

var benchSKUs = func() []string {
	s := make([]string, 1000)
	for i := range s {
		s[i] = fmt.Sprintf("sku-%04d", i)
	}
	return s
}()

// benchOpenDB opens a fresh migrated SQLite database with opts.
func benchOpenDB(b *testing.B, opts sqlite.Options) *sql.DB {
	b.Helper()
	ctx := context.Background()
	db, err := sqlite.OpenWith(ctx, filepath.Join(b.TempDir(), "bench.db"), opts)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { db.Close() })
	if err := Migrate(ctx, db); err != nil {
		b.Fatal(err)
	}
	return db
}

// benchBackends runs f as the sub-benchmarks name/db=sqlite and
// name/db=postgres, each on a fresh migrated database (PostgreSQL only when
// OUTBOXHOOK_TEST_POSTGRES_DSN names a server; see backend_test.go).
func benchBackends(b *testing.B, name string, f func(b *testing.B, db *sql.DB)) {
	b.Run(name+"/db=sqlite", func(b *testing.B) { f(b, benchOpenDB(b, sqlite.Options{})) })
	b.Run(name+"/db=postgres", func(b *testing.B) { f(b, openPostgresTestDB(b)) })
}

// benchRawEvent is what a developer writing the outbox row by hand would do:
// marshal the data, build the envelope with fmt, generate a UUID.
type benchRawEvent struct {
	id, typ, tenant, payload string
	occurred, created        int64
}

func benchRawRow(typ, tenant string, data any) (benchRawEvent, error) {
	d, err := json.Marshal(data)
	if err != nil {
		return benchRawEvent{}, err
	}
	u, err := uuid.NewV7()
	if err != nil {
		return benchRawEvent{}, err
	}
	id := "evt_" + u.String()
	now := time.Now()
	payload := fmt.Sprintf(`{"id":%q,"type":%q,"timestamp":%q,"data":%s}`,
		id, typ, now.UTC().Format(time.RFC3339Nano), d)
	ms := now.UnixMilli()
	return benchRawEvent{id: id, typ: typ, tenant: tenant, payload: payload, occurred: ms, created: ms}, nil
}

func (r *benchRawEvent) insert(ctx context.Context, tx *sql.Tx) error {
	_, err := tx.ExecContext(ctx, store.InsertEvent, r.id, r.typ, r.tenant, r.payload, r.occurred, r.created)
	return err
}

// benchPublishRaw is the hand-written equivalent of Publish.
func benchPublishRaw(ctx context.Context, tx *sql.Tx, typ, tenant string, data any) error {
	r, err := benchRawRow(typ, tenant, data)
	if err != nil {
		return err
	}
	return r.insert(ctx, tx)
}

func benchPublishLib(ctx context.Context, tx *sql.Tx, i int64) error {
	_, err := Publish(ctx, tx, Event{Type: benchEventType, Tenant: benchTenant, Data: benchOrderN(i)})
	return err
}

// benchReceiver is an HTTP endpoint that does nothing expensive: it reads the
// body and answers 200. It counts requests, can signal when a count is
// reached, can timestamp arrivals, and can hang until released.
type benchReceiver struct {
	srv *httptest.Server
	n   atomic.Int64

	want   atomic.Int64
	mu     sync.Mutex
	done   chan struct{}
	stamps chan time.Time // when not nil, every arrival's time is sent here

	hang    chan struct{} // when not nil, requests block until it is closed
	hanging atomic.Int64  // requests blocked right now
}

func newBenchReceiver(b *testing.B, hang bool) *benchReceiver {
	b.Helper()
	rc := &benchReceiver{}
	if hang {
		rc.hang = make(chan struct{})
	}
	rc.want.Store(1 << 62)
	rc.srv = httptest.NewServer(rc)
	b.Cleanup(rc.srv.Close)
	return rc
}

// release lets hanging requests finish, now and from now on. Register it as
// a cleanup after the dispatcher's, so (cleanups run last-in first-out) the
// requests are released before the dispatcher's graceful shutdown waits for
// them and before Close does.
func (rc *benchReceiver) release() { close(rc.hang) }

func (rc *benchReceiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	now := time.Now()
	_, _ = io.Copy(io.Discard, r.Body)
	if rc.hang != nil {
		rc.hanging.Add(1)
		select {
		case <-rc.hang:
		case <-r.Context().Done():
		}
		rc.hanging.Add(-1)
	}
	w.WriteHeader(http.StatusOK)
	if rc.stamps != nil {
		rc.stamps <- now
	}
	if n := rc.n.Add(1); n >= rc.want.Load() {
		rc.mu.Lock()
		if rc.done != nil && n >= rc.want.Load() {
			close(rc.done)
			rc.done = nil
		}
		rc.mu.Unlock()
	}
}

// expect returns a channel closed once k more requests than now have
// arrived. Call it before causing the requests.
func (rc *benchReceiver) expect(k int) <-chan struct{} {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	ch := make(chan struct{})
	rc.done = ch
	rc.want.Store(rc.n.Load() + int64(k))
	return ch
}

// benchWait waits for ch, failing the benchmark after a generous deadline (a
// hang guard, not a measurement).
func benchWait(b *testing.B, ch <-chan struct{}, what string) {
	b.Helper()
	select {
	case <-ch:
	case <-time.After(2 * time.Minute):
		b.Fatalf("timed out waiting for %s", what)
	}
}

// benchWaitRecorded waits until every published event is expanded and no
// first attempt is pending or in flight: the deliveries the receiver has
// seen are recorded too. End to end, a delivery counts once recorded, so
// that recording left for after the last receipt (a group commit) is not
// taken off the clock. It polls (cheap reads of two partial indexes).
func benchWaitRecorded(b *testing.B, db *sql.DB) {
	b.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		var left bool
		if err := db.QueryRow(`SELECT EXISTS (SELECT 1 FROM webhook_outbox WHERE expanded_at IS NULL)
    OR EXISTS (SELECT 1 FROM webhook_deliveries WHERE state IN ('pending', 'delivering') AND attempts = 0)`).Scan(&left); err != nil {
			b.Fatal(err)
		}
		if !left {
			return
		}
		if time.Now().After(deadline) {
			b.Fatal("timed out waiting for the deliveries to be recorded")
		}
		time.Sleep(100 * time.Microsecond)
	}
}

func benchSubscribe(b *testing.B, db *sql.DB, url string) Subscription {
	b.Helper()
	subs, err := NewSubscriptions(db, SubscriptionsConfig{})
	if err != nil {
		b.Fatal(err)
	}
	sub, err := subs.Create(context.Background(), Subscription{Tenant: benchTenant, URL: url, EventTypes: []string{"*"}})
	if err != nil {
		b.Fatal(err)
	}
	return sub
}

// benchStartDispatcher runs a dispatcher with cfg (logs discarded) until the
// benchmark run ends. Unlike startDispatcher it keeps cfg's PollInterval.
func benchStartDispatcher(b *testing.B, db *sql.DB, cfg Config) *Dispatcher {
	b.Helper()
	cfg.Logger = benchLogger
	d, err := NewDispatcher(db, allowLoopback(cfg))
	if err != nil {
		b.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- d.Run(context.Background()) }()
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = d.Shutdown(ctx)
		<-errc
	})
	return d
}

// benchPublishBatches publishes n events, batch per transaction, calling
// Notify after each commit when d is not nil. seq numbers the orders.
func benchPublishBatches(b *testing.B, db *sql.DB, d *Dispatcher, n, batch int, seq *int64) {
	b.Helper()
	ctx := context.Background()
	for n > 0 {
		k := min(batch, n)
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			b.Fatal(err)
		}
		for j := 0; j < k; j++ {
			*seq++
			if err := benchPublishLib(ctx, tx, *seq); err != nil {
				b.Fatal(err)
			}
		}
		if err := tx.Commit(); err != nil {
			b.Fatal(err)
		}
		if d != nil {
			d.Notify()
		}
		n -= k
	}
}

// benchHTTPClient is what the dispatcher builds for itself when
// Config.HTTPClient is nil, so the raw baseline gets the same transport.
func benchHTTPClient(concurrency int) *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConns = concurrency * 2
	tr.MaxIdleConnsPerHost = concurrency
	return &http.Client{Transport: tr}
}

// benchRawPost posts every body (to urls round-robin) from c goroutines.
func benchRawPost(b *testing.B, client *http.Client, urls []string, bodies [][]byte, c int) {
	b.Helper()
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Value
	for w := 0; w < c; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(bodies) {
					return
				}
				req, err := http.NewRequest(http.MethodPost, urls[i%len(urls)], bytes.NewReader(bodies[i]))
				if err != nil {
					failed.Store(err)
					return
				}
				req.Header.Set("Content-Type", "application/json")
				resp, err := client.Do(req)
				if err != nil {
					failed.Store(err)
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					failed.Store(fmt.Errorf("status %d", resp.StatusCode))
					return
				}
			}
		}()
	}
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		b.Fatal(err)
	}
}

// benchBodies returns n envelopes exactly as Publish would store them.
func benchBodies(b *testing.B, n int, seq int64) [][]byte {
	b.Helper()
	var p Publisher
	out := make([][]byte, n)
	for i := range out {
		row, err := p.row(Event{Type: benchEventType, Tenant: benchTenant, Data: benchOrderN(seq + int64(i))})
		if err != nil {
			b.Fatal(err)
		}
		out[i] = row.payload
	}
	return out
}

func benchPerSecond(n int, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / d.Seconds()
}

// benchMedian returns the median of per-op samples (ns), which a rare
// outlier such as an SQLite checkpoint's fsync does not move.
func benchMedian(samples []float64) float64 {
	if len(samples) == 0 {
		return 0
	}
	s := slices.Clone(samples)
	slices.Sort(s)
	return s[len(s)/2]
}

func benchRatio(a, b time.Duration) float64 {
	if b <= 0 {
		return 0
	}
	return float64(a) / float64(b)
}

// ---------------------------------------------------------------------------
// 1. Publish: the library's insert against a hand-written one.

// benchPublishEventsPerTx is how many events share a transaction in the
// shared-transaction variants, so that BEGIN/COMMIT is amortized away.
const benchPublishEventsPerTx = 100

// BenchmarkPublish measures one published event, through webhooks.Publish
// (lib) or a hand-written INSERT of the same row with store.InsertEvent
// (raw), either with benchPublishEventsPerTx events per transaction
// (tx=shared) or one transaction per event (tx=per-event). Compare lib and
// raw with BenchmarkPublishOverhead, which alternates them in one run.
func BenchmarkPublish(b *testing.B) {
	for _, mode := range []string{"shared", "per-event"} {
		perTx := benchPublishEventsPerTx
		if mode == "per-event" {
			perTx = 1
		}
		for _, impl := range []string{"lib", "raw"} {
			b.Run("tx="+mode+"/"+impl, func(b *testing.B) {
				ctx := context.Background()
				db := benchOpenDB(b, sqlite.Options{})
				b.ReportAllocs()
				b.ResetTimer()
				var seq int64
				for done := 0; done < b.N; {
					k := min(perTx, b.N-done)
					tx, err := db.BeginTx(ctx, nil)
					if err != nil {
						b.Fatal(err)
					}
					for j := 0; j < k; j++ {
						seq++
						if impl == "lib" {
							err = benchPublishLib(ctx, tx, seq)
						} else {
							err = benchPublishRaw(ctx, tx, benchEventType, benchTenant, benchOrderN(seq))
						}
						if err != nil {
							b.Fatal(err)
						}
					}
					if err := tx.Commit(); err != nil {
						b.Fatal(err)
					}
					done += k
				}
			})
		}
	}
}

// BenchmarkPublishOverhead alternates the library and the hand-written
// insert on one database (alternating which goes first) and times each
// separately. A third arm, bare, inserts a row whose values were computed
// before the clock started: the SQLite cost alone. Metrics: ratio =
// lib_ns/op / raw_ns/op (target ≤ 1.2); ratio_p50, the same from the median
// transaction of each arm, which the occasional checkpoint fsync does not
// move; ratio_vs_bare = lib / bare; and each arm's mean ns per event. The
// built-in ns/op covers all three arms.
func BenchmarkPublishOverhead(b *testing.B) {
	for _, mode := range []string{"shared", "per-event"} {
		perTx := benchPublishEventsPerTx
		if mode == "per-event" {
			perTx = 1
		}
		benchBackends(b, "tx="+mode, func(b *testing.B, db *sql.DB) {
			ctx := context.Background()
			var seq int64
			var libT, rawT, bareT time.Duration
			var samples [3][]float64 // ns per event of each transaction, per arm
			pre := make([]benchRawEvent, perTx)
			arm := func(which int, k int) time.Duration {
				if which == 2 { // bare: values ready before the clock starts
					for j := 0; j < k; j++ {
						seq++
						r, err := benchRawRow(benchEventType, benchTenant, benchOrderN(seq))
						if err != nil {
							b.Fatal(err)
						}
						pre[j] = r
					}
				}
				start := time.Now()
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					b.Fatal(err)
				}
				for j := 0; j < k; j++ {
					switch which {
					case 0:
						seq++
						err = benchPublishLib(ctx, tx, seq)
					case 1:
						seq++
						err = benchPublishRaw(ctx, tx, benchEventType, benchTenant, benchOrderN(seq))
					case 2:
						err = pre[j].insert(ctx, tx)
					}
					if err != nil {
						b.Fatal(err)
					}
				}
				if err := tx.Commit(); err != nil {
					b.Fatal(err)
				}
				return time.Since(start)
			}
			orders := [][3]int{{0, 1, 2}, {1, 2, 0}, {2, 0, 1}, {0, 2, 1}, {1, 0, 2}, {2, 1, 0}}
			b.ResetTimer()
			for done, round := 0, 0; done < b.N; round++ {
				k := min(perTx, b.N-done)
				for _, which := range orders[round%len(orders)] {
					d := arm(which, k)
					samples[which] = append(samples[which], float64(d.Nanoseconds())/float64(k))
					switch which {
					case 0:
						libT += d
					case 1:
						rawT += d
					case 2:
						bareT += d
					}
				}
				done += k
			}
			b.StopTimer()
			n := float64(b.N)
			b.ReportMetric(benchRatio(libT, rawT), "ratio")
			b.ReportMetric(benchMedian(samples[0])/benchMedian(samples[1]), "ratio_p50")
			b.ReportMetric(benchRatio(libT, bareT), "ratio_vs_bare")
			b.ReportMetric(float64(libT.Nanoseconds())/n, "lib_ns/op")
			b.ReportMetric(float64(rawT.Nanoseconds())/n, "raw_ns/op")
			b.ReportMetric(float64(bareT.Nanoseconds())/n, "bare_ns/op")
		})
	}
}

// BenchmarkPublishBatch compares PublishBatch of n events with n Publish
// calls in one transaction, alternating the two on one database. One op is
// one event by each; ratio = batch_ns/op / loop_ns/op (below 1 means the
// batch statement pays off).
func BenchmarkPublishBatch(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		b.Run(fmt.Sprintf("n=%d", n), func(b *testing.B) {
			ctx := context.Background()
			db := benchOpenDB(b, sqlite.Options{})
			var seq int64
			var batchT, loopT time.Duration
			events := make([]Event, n)
			b.ResetTimer()
			for done, round := 0, 0; done < b.N; round++ {
				for k := 0; k < 2; k++ {
					batch := (round+k)%2 == 0
					b.StopTimer()
					for j := range events {
						seq++
						events[j] = Event{Type: benchEventType, Tenant: benchTenant, Data: benchOrderN(seq)}
					}
					b.StartTimer()
					start := time.Now()
					tx, err := db.BeginTx(ctx, nil)
					if err != nil {
						b.Fatal(err)
					}
					if batch {
						_, err = PublishBatch(ctx, tx, events...)
					} else {
						for _, e := range events {
							if _, err = Publish(ctx, tx, e); err != nil {
								break
							}
						}
					}
					if err != nil {
						b.Fatal(err)
					}
					if err := tx.Commit(); err != nil {
						b.Fatal(err)
					}
					if batch {
						batchT += time.Since(start)
					} else {
						loopT += time.Since(start)
					}
				}
				done += n
			}
			b.StopTimer()
			ops := float64((b.N + n - 1) / n * n)
			b.ReportMetric(benchRatio(batchT, loopT), "ratio")
			b.ReportMetric(float64(batchT.Nanoseconds())/ops, "batch_ns/op")
			b.ReportMetric(float64(loopT.Nanoseconds())/ops, "loop_ns/op")
		})
	}
}

// ---------------------------------------------------------------------------
// 2. A business transaction with and without Publish.

const benchBusinessSchema = `
CREATE TABLE orders (
    id           INTEGER PRIMARY KEY,
    customer     TEXT    NOT NULL,
    sku          TEXT    NOT NULL,
    quantity     INTEGER NOT NULL,
    amount_cents INTEGER NOT NULL,
    created_at   INTEGER NOT NULL
);
CREATE TABLE stock (
    sku TEXT    PRIMARY KEY,
    qty INTEGER NOT NULL
)`

// The three kinds of business transaction BenchmarkBusinessTx compares.
const (
	benchTxPlain = iota // no event
	benchTxLib          // webhooks.Publish
	benchTxRaw          // the hand-written outbox insert
)

func benchBusinessTx(ctx context.Context, db *sql.DB, i int64, kind int) error {
	o := benchOrderN(i)
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() //nolint:errcheck // no-op after Commit
	res, err := tx.ExecContext(ctx,
		`INSERT INTO orders (customer, sku, quantity, amount_cents, created_at) VALUES ($1, $2, $3, $4, $5)`,
		o.Customer, o.SKU, o.Quantity, o.AmountCents, time.Now().UnixMilli())
	if err != nil {
		return err
	}
	if o.OrderID, err = res.LastInsertId(); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `UPDATE stock SET qty = qty - $1 WHERE sku = $2`, o.Quantity, o.SKU); err != nil {
		return err
	}
	switch kind {
	case benchTxLib:
		if _, err := Publish(ctx, tx, Event{Type: benchEventType, Tenant: benchTenant, Data: o}); err != nil {
			return err
		}
	case benchTxRaw:
		if err := benchPublishRaw(ctx, tx, benchEventType, benchTenant, o); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// BenchmarkBusinessTx runs a business transaction (insert an order, update a
// stock row, commit) without an event (plain), with webhooks.Publish of the
// order in the same transaction (lib), and with the hand-written outbox
// insert instead (raw), rotating which goes first, for SQLite
// synchronous=NORMAL (the default) and FULL. One op is one transaction of
// each kind. ratio = lib_ns/op / plain_ns/op (what publishing costs a
// business transaction); ratio_p50, the same from median transactions;
// raw_ratio = raw / plain (what any outbox row costs); lib_vs_raw = lib /
// raw.
func BenchmarkBusinessTx(b *testing.B) {
	for _, syncMode := range []string{"NORMAL", "FULL"} {
		b.Run("sync="+syncMode, func(b *testing.B) {
			ctx := context.Background()
			db := benchOpenDB(b, sqlite.Options{Synchronous: syncMode})
			for _, stmt := range splitStatements(benchBusinessSchema) {
				if _, err := db.ExecContext(ctx, stmt); err != nil {
					b.Fatal(err)
				}
			}
			for _, sku := range benchSKUs {
				if _, err := db.ExecContext(ctx, `INSERT INTO stock (sku, qty) VALUES ($1, $2)`, sku, 1<<40); err != nil {
					b.Fatal(err)
				}
			}
			var took [3]time.Duration
			var samples [3][]float64
			var seq int64
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				for k := 0; k < 3; k++ {
					kind := (i + k) % 3 // rotate which goes first
					seq++
					start := time.Now()
					if err := benchBusinessTx(ctx, db, seq, kind); err != nil {
						b.Fatal(err)
					}
					d := time.Since(start)
					took[kind] += d
					samples[kind] = append(samples[kind], float64(d.Nanoseconds()))
				}
			}
			b.StopTimer()
			n := float64(b.N)
			b.ReportMetric(benchRatio(took[benchTxLib], took[benchTxPlain]), "ratio")
			b.ReportMetric(benchMedian(samples[benchTxLib])/benchMedian(samples[benchTxPlain]), "ratio_p50")
			b.ReportMetric(benchRatio(took[benchTxRaw], took[benchTxPlain]), "raw_ratio")
			b.ReportMetric(benchRatio(took[benchTxLib], took[benchTxRaw]), "lib_vs_raw")
			b.ReportMetric(float64(took[benchTxPlain].Nanoseconds())/n, "plain_ns/op")
			b.ReportMetric(float64(took[benchTxLib].Nanoseconds())/n, "lib_ns/op")
			b.ReportMetric(float64(took[benchTxRaw].Nanoseconds())/n, "raw_ns/op")
		})
	}
}
