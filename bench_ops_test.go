package webhooks

// Operations benchmarks: delivery throughput next to a large history, and
// the dispatcher's heap next to a large backlog. The shared helpers are in
// bench_test.go. Both seed their million rows with set-based SQL once per
// process and keep them for every run of the sub-benchmark (b.N calibration
// and -count), so only the first run pays for the seeding:
//
//	go test -run '^$' -bench 'BenchmarkHistory|BenchmarkBacklogHeap' -benchtime=1x .

import (
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"strconv"
	"strings"
	"testing"
	"time"
)

// ---------------------------------------------------------------------------
// Seeding: rows as the library writes them, made by the database itself.

// benchSeed describes deliveries, each with its own expanded event, that
// benchSeedRows inserts with a handful of INSERT … SELECT statements.
type benchSeed struct {
	// first and n: the rows are numbered first … first+n-1; the number
	// makes every ID unique, so later seeds continue where earlier ones
	// stopped.
	first, n int
	// subs are the subscriptions the deliveries go to, in turn.
	subs []string
	// fromMS and toMS: the rows' created_at is spread evenly over this
	// range (Unix ms), and so are the timestamps in their IDs.
	fromMS, toMS int64
	// succeeded makes finished history (succeeded on the first attempt,
	// with its attempt row); otherwise the deliveries are pending, never
	// attempted and due now: a backlog.
	succeeded bool
}

// IDs have the shape newID gives them: a prefix and the 32 hex digits of a
// UUIDv7, whose first 12 digits are the Unix ms of the row, so seeded rows
// sort before the rows written after them, as real ones do. The version
// digit is 7 and the variant digit 8 (events) or 9 (deliveries); the row
// number stands in for the random bits.
const (
	benchHexSQLite    = `printf('%012x7%03x{V}%015x', {MS}, i % 4096, i)`
	benchHexPostgres  = `lpad(to_hex({MS}), 12, '0') || '7' || lpad(to_hex(i % 4096), 3, '0') || '{V}' || lpad(to_hex(i), 15, '0')`
	benchTSSQLite     = `strftime('%Y-%m-%dT%H:%M:%fZ', ms / 1000.0, 'unixepoch')`
	benchTSPostgres   = `to_char(to_timestamp(ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')`
	benchSKUSQLite    = `printf('%04d', i % 1000)`
	benchSKUPostgres  = `lpad(CAST(i % 1000 AS text), 4, '0')`
	benchRowsSQLite   = `WITH RECURSIVE g(i) AS (SELECT {FIRST} UNION ALL SELECT i + 1 FROM g WHERE i < {LAST}),`
	benchRowsPostgres = `WITH g(i) AS (SELECT generate_series(CAST({FIRST} AS bigint), {LAST})),`
	// benchRows follows benchRows{SQLite,Postgres}: one row per number i
	// with its time ms and subscription sub.
	benchRows = `
subs(k, id) AS (VALUES {SUBS}),
r AS (SELECT i, {FROM} + (i - {FIRST}) * {SPAN} / {N} AS ms,
             (SELECT id FROM subs WHERE k = i % {K}) AS sub FROM g)
`
	// The payload is the envelope Publish stores for benchOrderN(i).
	benchSeedEvents = `INSERT INTO webhook_outbox (id, type, tenant, payload, occurred_at, created_at, expanded_at)
SELECT 'evt_' || {EVT}, '` + benchEventType + `', '` + benchTenant + `',
       '{"id":"evt_' || {EVT} || '","type":"` + benchEventType + `","timestamp":"' || {TS} ||
       '","data":{"orderId":' || i || ',"customer":"cus_8f14e45fceea167a","sku":"sku-' || {SKU} ||
       '","quantity":' || (1 + i % 5) || ',"amountCents":' || (1999 + i % 1000) || ',"currency":"EUR"}}',
       ms, ms, ms + 1
FROM r`
	benchSeedSucceeded = `INSERT INTO webhook_deliveries (id, event_id, subscription_id, tenant, state, attempts, next_at,
    claim_token, last_status, last_error, created_at, updated_at, delivered_at)
SELECT 'dlv_' || {DLV}, 'evt_' || {EVT}, sub, '` + benchTenant + `', 'succeeded', 1, ms + 3,
       CAST(NULL AS TEXT), 200, '', ms + 1, ms + 3, ms + 3
FROM r`
	benchSeedAttempts = `INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration_ms, status_code, error, response_body)
SELECT 'dlv_' || {DLV}, 1, ms + 1, 2, 200, '', ''
FROM r`
	benchSeedPending = `INSERT INTO webhook_deliveries (id, event_id, subscription_id, tenant, state, attempts, next_at,
    claim_token, last_status, last_error, created_at, updated_at, delivered_at)
SELECT 'dlv_' || {DLV}, 'evt_' || {EVT}, sub, '` + benchTenant + `', 'pending', 0, ms + 1,
       CAST(NULL AS TEXT), 0, '', ms + 1, ms + 1, CAST(NULL AS BIGINT)
FROM r`
)

// benchSeedRows inserts s in one transaction. It does not analyze.
func benchSeedRows(ctx context.Context, db *sql.DB, s benchSeed) error {
	if s.n <= 0 || len(s.subs) == 0 {
		return fmt.Errorf("bench seed: %d rows for %d subscriptions", s.n, len(s.subs))
	}
	dialect, err := detectDialect(db, "")
	if err != nil {
		return err
	}
	hex, ts, sku, rows := benchHexSQLite, benchTSSQLite, benchSKUSQLite, benchRowsSQLite
	if dialect == DialectPostgres {
		hex, ts, sku, rows = benchHexPostgres, benchTSPostgres, benchSKUPostgres, benchRowsPostgres
	}
	var subs []string
	for k, id := range s.subs {
		subs = append(subs, fmt.Sprintf("(%d, '%s')", k, strings.ReplaceAll(id, "'", "''")))
	}
	// Expressions first (they hold the {MS}, {V} and i the row set
	// defines), then the row set's numbers.
	r := strings.NewReplacer(
		"{EVT}", strings.NewReplacer("{MS}", "ms", "{V}", "8").Replace(hex),
		"{DLV}", strings.NewReplacer("{MS}", "(ms + 1)", "{V}", "9").Replace(hex),
		"{TS}", ts, "{SKU}", sku)
	num := strings.NewReplacer(
		"{FIRST}", strconv.Itoa(s.first), "{LAST}", strconv.Itoa(s.first+s.n-1), "{N}", strconv.Itoa(s.n),
		"{FROM}", strconv.FormatInt(s.fromMS, 10), "{SPAN}", strconv.FormatInt(max(s.toMS-s.fromMS, 0), 10),
		"{SUBS}", strings.Join(subs, ", "), "{K}", strconv.Itoa(len(s.subs)))
	stmts := []string{benchSeedEvents, benchSeedPending}
	if s.succeeded {
		stmts = []string{benchSeedEvents, benchSeedSucceeded, benchSeedAttempts}
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("bench seed: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // no-op after Commit
	for _, stmt := range stmts {
		q := num.Replace(rows + benchRows + r.Replace(stmt))
		res, err := tx.ExecContext(ctx, q)
		if err != nil {
			return fmt.Errorf("bench seed: %w\n%s", err, q)
		}
		if n, err := res.RowsAffected(); err != nil || n != int64(s.n) {
			return fmt.Errorf("bench seed: %d rows inserted, want %d (%v)\n%s", n, s.n, err, q)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("bench seed: %w", err)
	}
	return nil
}

// benchAnalyze gives the planner statistics of the seeded tables, as an
// operator's periodic ANALYZE (or autovacuum) would, and on SQLite folds
// the WAL back into the database file.
func benchAnalyze(ctx context.Context, db *sql.DB) error {
	dialect, err := detectDialect(db, "")
	if err != nil {
		return err
	}
	stmts := []string{`ANALYZE`, `PRAGMA wal_checkpoint(TRUNCATE)`}
	if dialect == DialectPostgres {
		// Only this schema's tables (search_path): the server is shared.
		stmts = []string{`VACUUM ANALYZE webhook_outbox, webhook_deliveries, webhook_attempts, webhook_subscriptions`}
	}
	for _, stmt := range stmts {
		if _, err := db.ExecContext(ctx, stmt); err != nil {
			return fmt.Errorf("bench analyze: %s: %w", stmt, err)
		}
	}
	return nil
}

// benchLongLived is a sub-benchmark lent its parent's lifetime: what it
// registers with Cleanup, and what it puts in TempDir, lasts until the
// parent benchmark ends, across every run of the sub-benchmark; failures
// and skips are still the sub-benchmark's own.
type benchLongLived struct {
	*testing.B
	parent *testing.B
}

func (l benchLongLived) Cleanup(f func()) { l.parent.Cleanup(f) }
func (l benchLongLived) TempDir() string  { return l.parent.TempDir() }

// benchOpenLongLived opens a fresh migrated database of backend that lives
// as long as parent.
func benchOpenLongLived(b, parent *testing.B, backend, name string) *sql.DB {
	b.Helper()
	l := benchLongLived{B: b, parent: parent}
	if backend == "postgres" {
		return openPostgresTestDB(l)
	}
	return openTestDBAt(l, filepath.Join(l.TempDir(), name+".db"))
}

// benchOpen opens a fresh migrated database of backend for this run of b.
func benchOpen(b *testing.B, backend string) *sql.DB {
	b.Helper()
	if backend == "postgres" {
		return openPostgresTestDB(b)
	}
	return openTestDB(b)
}

// benchCreateSubs creates k subscriptions to url/0 … url/k-1 and returns
// their IDs.
func benchCreateSubs(b *testing.B, db *sql.DB, url string, k int) []string {
	b.Helper()
	subs, err := NewSubscriptions(db, SubscriptionsConfig{})
	if err != nil {
		b.Fatal(err)
	}
	ids := make([]string, k)
	for i := range ids {
		sub, err := subs.Create(context.Background(), Subscription{Tenant: benchTenant,
			URL: fmt.Sprintf("%s/hook/%d", url, i), EventTypes: []string{"*"}})
		if err != nil {
			b.Fatal(err)
		}
		ids[i] = sub.ID
	}
	return ids
}

func benchCount(b *testing.B, db *sql.DB, query string, args ...any) int {
	b.Helper()
	var n int
	if err := db.QueryRowContext(context.Background(), query, args...).Scan(&n); err != nil {
		b.Fatalf("%s: %v", query, err)
	}
	return n
}

// ---------------------------------------------------------------------------
// 6. Delivery throughput with a million rows of history.

// benchHistoryRows is how many succeeded deliveries (each with its event and
// its attempt) the history database holds before the measurement.
const benchHistoryRows = 1_000_000

// benchHistoryArm is one of BenchmarkHistory's two setups.
type benchHistoryArm struct {
	db     *sql.DB
	rc     *benchReceiver
	seq    int64
	took   time.Duration
	seeded int64 // Unix ms: the seeded rows were created before it
}

// BenchmarkHistory measures deliveries per second with benchHistoryRows
// finished deliveries in the database against an empty database, both in
// the same run. history holds a million succeeded deliveries of the
// measured subscription with their attempts and their expanded events,
// written in the last hour before the run with IDs shaped like the
// library's (UUIDv7 hex, so older than every live row), then analyzed
// (ANALYZE; on PostgreSQL VACUUM ANALYZE). They are seeded with set-based
// SQL once per process (SQLite ≈ 15 s, PostgreSQL ≈ 30 s on the 2-core
// machine) and kept for every run of the sub-benchmark. empty is a fresh
// database for each run, never analyzed (a fresh install). Before the
// clock starts, one chunk goes through each setup (warm-up).
//
// Each setup has one subscription and its own dispatcher with Concurrency
// 32 and MaxInFlightPerSubscription 32 (BenchmarkEndToEnd's subs=1), the
// default Retention (30 days) and a CleanupInterval of 1 s, so the retention
// cleaner sweeps the history every second while deliveries run: it must
// find nothing to delete (the benchmark fails if the history shrank). A
// chunk is benchE2EChunk events committed in one transaction (the receiver
// expects them first), then Notify; the clock runs from the commit's return
// to the last arrival. One op is two chunks per setup, in the order
// empty, history, history, empty (or the reverse on odd ops), so
// -benchtime=1x already alternates. ns/op is the wall time of one op,
// publishing included. ratio = history rate / empty rate (the requirement:
// ≥ 0.8).
func BenchmarkHistory(b *testing.B) {
	for _, backend := range []string{"sqlite", "postgres"} {
		var hist *benchHistoryArm // kept across the sub-benchmark's runs
		b.Run(fmt.Sprintf("history=%d/db=%s", benchHistoryRows, backend), func(sb *testing.B) {
			if backend == "postgres" {
				postgresDSN(sb) // skip (or fail) before touching the parent
			}
			if hist == nil {
				hist = benchSeedHistory(sb, b, backend)
			}
			benchHistory(sb, backend, hist)
		})
	}
}

// benchSeedHistory makes the history setup, living as long as parent.
func benchSeedHistory(b, parent *testing.B, backend string) *benchHistoryArm {
	ctx := context.Background()
	start := time.Now()
	a := &benchHistoryArm{db: benchOpenLongLived(b, parent, backend, "history")}
	a.rc = newBenchReceiver(parent, false)
	subs := benchCreateSubs(b, a.db, a.rc.srv.URL, 1)
	now := time.Now()
	seed := benchSeed{first: 1, n: benchHistoryRows, subs: subs, succeeded: true,
		fromMS: now.Add(-time.Hour - time.Minute).UnixMilli(), toMS: now.Add(-time.Minute).UnixMilli()}
	if err := benchSeedRows(ctx, a.db, seed); err != nil {
		b.Fatal(err)
	}
	a.seeded = seed.toMS + 10 // the last rows' updated_at is ms + 3
	if err := benchAnalyze(ctx, a.db); err != nil {
		b.Fatal(err)
	}
	b.Logf("seeded %d succeeded deliveries with their events and attempts in %v", benchHistoryRows,
		time.Since(start).Round(100*time.Millisecond))
	return a
}

func benchHistory(b *testing.B, backend string, hist *benchHistoryArm) {
	cfg := Config{Concurrency: 32, MaxInFlightPerSubscription: 32, CleanupInterval: time.Second}
	empty := &benchHistoryArm{db: benchOpen(b, backend)}
	empty.rc = newBenchReceiver(b, false)
	benchCreateSubs(b, empty.db, empty.rc.srv.URL, 1)
	hist.took = 0
	type running struct {
		*benchHistoryArm
		d *Dispatcher
	}
	arms := [2]running{{empty, benchStartDispatcher(b, empty.db, cfg)}, {hist, benchStartDispatcher(b, hist.db, cfg)}}

	chunk := func(a running) {
		done := a.rc.expect(benchE2EChunk)
		benchPublishBatches(b, a.db, nil, benchE2EChunk, benchE2EChunk, &a.seq)
		start := time.Now()
		a.d.Notify()
		benchWait(b, done, "deliveries")
		a.took += time.Since(start)
	}
	// A chunk through each setup before the clock starts warms them up.
	for _, a := range arms {
		chunk(a)
		a.took = 0
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		order := [4]int{0, 1, 1, 0}
		if i%2 == 1 {
			order = [4]int{1, 0, 0, 1}
		}
		for _, k := range order {
			chunk(arms[k])
		}
	}
	b.StopTimer()
	// The cleaner ran alongside: it must have left the history alone.
	if n := benchCount(b, hist.db, `SELECT COUNT(*) FROM webhook_deliveries WHERE created_at < $1`, hist.seeded); n != benchHistoryRows {
		b.Fatalf("history holds %d deliveries, want %d: the cleaner deleted some", n, benchHistoryRows)
	}
	if n := benchCount(b, hist.db, `SELECT COUNT(*) FROM webhook_outbox WHERE created_at < $1`, hist.seeded); n != benchHistoryRows {
		b.Fatalf("history holds %d events, want %d: the cleaner deleted some", n, benchHistoryRows)
	}
	n := 2 * benchE2EChunk * b.N // deliveries per setup
	emptyRate, histRate := benchPerSecond(n, empty.took), benchPerSecond(n, hist.took)
	b.ReportMetric(histRate/emptyRate, "ratio")
	b.ReportMetric(emptyRate, "empty_deliveries/s")
	b.ReportMetric(histRate, "history_deliveries/s")
}

// ---------------------------------------------------------------------------
// 7. The dispatcher's heap with a backlog of a million deliveries.

// The two backlogs BenchmarkBacklogHeap compares, and how many deliveries
// each one's dispatcher makes per op.
const (
	benchBacklogBig     = 1_000_000
	benchBacklogSmall   = 10_000
	benchBacklogDeliver = 5_000
	benchBacklogSubs    = 4
	benchHeapEvery      = 10 * time.Millisecond
)

// benchBacklogArm is one of BenchmarkBacklogHeap's two setups.
type benchBacklogArm struct {
	size int
	db   *sql.DB
	rc   *benchReceiver
	subs []string
	next int // the next seed row number

	base, peak, peakLive uint64 // bytes, the largest seen over the ops
	took                 time.Duration
	delivered            int
}

// BenchmarkBacklogHeap measures the dispatcher's peak heap while it works
// through a backlog of benchBacklogBig pending deliveries against one of
// benchBacklogSmall, both in the same run. Each backlog is in a database of
// its own: deliveries due now, never attempted, spread over
// benchBacklogSubs subscriptions, each with its expanded event, seeded with
// set-based SQL once per process and analyzed. The receiver answers 200 at
// once. The dispatcher has the default Config (Concurrency 32,
// MaxInFlightPerSubscription 8).
//
// After a warm-up run of each, one op is, for each backlog in turn (the
// order alternates): a GC and the baseline heap; a dispatcher started,
// benchBacklogDeliver deliveries arrived (the small backlog cannot give
// more and stay a backlog), Shutdown; the heap sampled every benchHeapEvery
// from the start to the end of Shutdown. Then the backlog is topped up to
// its size again, off the clock. The heap is runtime/metrics' /memory/classes/heap/objects:bytes
// (live objects and garbage not yet swept: what the heap really holds) and
// /gc/heap/live:bytes (live after the last GC). The figures are of the
// whole test process, receivers included; SQLite's page cache is C memory
// and not in them. Reported: peak_heap_MB and base_heap_MB of each backlog
// (the largest over the ops), peak_live_MB, ratio = peak_heap 1M / 10k
// (bounded: ≈ 1), growth_ratio = (peak − base) 1M / 10k, and each backlog's
// deliveries/s. ns/op is the wall time of one op, topping up excluded.
func BenchmarkBacklogHeap(b *testing.B) {
	for _, backend := range []string{"sqlite", "postgres"} {
		var arms [2]*benchBacklogArm // big, small: kept across runs
		b.Run("db="+backend, func(sb *testing.B) {
			if backend == "postgres" {
				postgresDSN(sb)
			}
			for i, size := range []int{benchBacklogBig, benchBacklogSmall} {
				if arms[i] == nil {
					arms[i] = benchSeedBacklog(sb, b, backend, size)
				}
			}
			benchBacklogHeap(sb, arms)
		})
	}
}

// benchSeedBacklog makes a backlog setup of size deliveries, living as long
// as parent.
func benchSeedBacklog(b, parent *testing.B, backend string, size int) *benchBacklogArm {
	ctx := context.Background()
	start := time.Now()
	a := &benchBacklogArm{size: size, db: benchOpenLongLived(b, parent, backend, fmt.Sprintf("backlog%d", size))}
	a.rc = newBenchReceiver(parent, false)
	a.subs = benchCreateSubs(b, a.db, a.rc.srv.URL, benchBacklogSubs)
	now := time.Now()
	a.next = 1
	a.topUp(b, size, now.Add(-time.Hour).UnixMilli(), now.Add(-time.Second).UnixMilli())
	if err := benchAnalyze(ctx, a.db); err != nil {
		b.Fatal(err)
	}
	b.Logf("seeded a backlog of %d pending deliveries in %v", size, time.Since(start).Round(100*time.Millisecond))
	return a
}

// topUp adds n pending deliveries created between fromMS and toMS.
func (a *benchBacklogArm) topUp(b *testing.B, n int, fromMS, toMS int64) {
	b.Helper()
	if n <= 0 {
		return
	}
	s := benchSeed{first: a.next, n: n, subs: a.subs, fromMS: fromMS, toMS: toMS}
	if err := benchSeedRows(context.Background(), a.db, s); err != nil {
		b.Fatal(err)
	}
	a.next += n
}

func (a *benchBacklogArm) pending(b *testing.B) int {
	return benchCount(b, a.db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state IN ('pending', 'delivering')`)
}

func benchBacklogHeap(b *testing.B, arms [2]*benchBacklogArm) {
	// once runs a dispatcher on a's backlog, then tops it up off the clock.
	once := func(a *benchBacklogArm) {
		a.run(b)
		b.StopTimer()
		now := time.Now()
		left := a.pending(b)
		if a.size-left < benchBacklogDeliver {
			b.Fatalf("backlog of %d: %d deliveries made, want at least %d", a.size, a.size-left, benchBacklogDeliver)
		}
		a.delivered += benchBacklogDeliver
		a.topUp(b, a.size-left, now.Add(-time.Second).UnixMilli(), now.UnixMilli())
		b.StartTimer()
	}
	// A warm-up run of each, so that whichever goes first does not measure
	// its baseline before the process ever ran a dispatcher.
	for _, a := range arms {
		if n := a.pending(b); n != a.size {
			b.Fatalf("backlog of %d holds %d pending deliveries", a.size, n)
		}
		once(a)
	}
	for _, a := range arms {
		a.base, a.peak, a.peakLive, a.took, a.delivered = 0, 0, 0, 0, 0
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for k := range arms {
			once(arms[(i+k)%2])
		}
	}
	b.StopTimer()
	big, small := arms[0], arms[1]
	const mb = 1 << 20
	b.ReportMetric(float64(big.peak)/float64(small.peak), "ratio")
	b.ReportMetric(float64(big.peak-big.base)/float64(max(small.peak-small.base, 1)), "growth_ratio")
	for _, a := range arms {
		label := benchBacklogLabel(a.size)
		b.ReportMetric(float64(a.peak)/mb, "peak_heap_MB_"+label)
		b.ReportMetric(float64(a.base)/mb, "base_heap_MB_"+label)
		b.ReportMetric(float64(a.peakLive)/mb, "peak_live_MB_"+label)
		b.ReportMetric(benchPerSecond(a.delivered, a.took), "deliveries/s_"+label)
	}
}

func benchBacklogLabel(n int) string {
	switch {
	case n >= 1_000_000 && n%1_000_000 == 0:
		return fmt.Sprintf("%dM", n/1_000_000)
	case n >= 1000 && n%1000 == 0:
		return fmt.Sprintf("%dk", n/1000)
	}
	return strconv.Itoa(n)
}

// run starts a dispatcher on the backlog, waits for benchBacklogDeliver
// deliveries and shuts it down, sampling the heap meanwhile.
func (a *benchBacklogArm) run(b *testing.B) {
	b.Helper()
	samples := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/gc/heap/live:bytes"}}
	runtime.GC()
	metrics.Read(samples)
	a.base = max(a.base, samples[0].Value.Uint64())

	stop, sampled := make(chan struct{}), make(chan [2]uint64, 1)
	go func() {
		s := []metrics.Sample{{Name: samples[0].Name}, {Name: samples[1].Name}}
		var peak [2]uint64
		tick := time.NewTicker(benchHeapEvery)
		defer tick.Stop()
		for {
			metrics.Read(s)
			peak[0], peak[1] = max(peak[0], s[0].Value.Uint64()), max(peak[1], s[1].Value.Uint64())
			select {
			case <-stop:
				metrics.Read(s)
				peak[0], peak[1] = max(peak[0], s[0].Value.Uint64()), max(peak[1], s[1].Value.Uint64())
				sampled <- peak
				return
			case <-tick.C:
			}
		}
	}()

	done := a.rc.expect(benchBacklogDeliver)
	start := time.Now()
	d, err := NewDispatcher(a.db, allowLoopback(Config{Logger: benchLogger}))
	if err != nil {
		b.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- d.Run(context.Background()) }()
	benchWait(b, done, "backlog deliveries")
	a.took += time.Since(start)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := d.Shutdown(ctx); err != nil {
		b.Fatalf("Shutdown: %v", err)
	}
	if err := <-errc; err != ErrDispatcherClosed {
		b.Fatalf("Run returned %v, want ErrDispatcherClosed", err)
	}
	close(stop)
	peak := <-sampled
	a.peak, a.peakLive = max(a.peak, peak[0]), max(a.peakLive, peak[1])
}
