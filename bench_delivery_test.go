package webhooks

// Delivery benchmarks (end to end, latency, a hanging endpoint); the shared
// helpers and the publishing benchmarks are in bench_test.go.

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/outboxhook/webhooks/store/sqlite"
)

// ---------------------------------------------------------------------------
// 3. End to end: deliveries per second through the library against a raw
// HTTP client.

// benchE2EChunk is how many deliveries each side makes before the other
// takes its turn.
const benchE2EChunk = 2000

// BenchmarkEndToEnd measures deliveries per second. lib: a chunk of events
// is committed (in transactions of 100), then Notify wakes a dispatcher with
// Concurrency C that expands, signs, delivers and records them to local
// receivers that answer 200; the clock runs from Notify until the last one
// arrived and every one of them is recorded (benchWaitRecorded). Publishing is timed apart: ratio_with_publish counts it in the
// library's time too. raw: an
// http.Client with the same transport settings posts the same number of
// bodies of the same size from C goroutines to receivers of the same kind.
// The two alternate in chunks of benchE2EChunk deliveries. One op is one
// delivery by each side. ratio = lib rate / raw rate (target ≥ 0.6);
// *_cpu_us/delivery is the process's CPU time (all threads, getrusage) per
// delivery while each side ran: both sides keep the two cores busy, so the
// ratio follows raw CPU / lib CPU.
//
// subs=1 has one subscription with MaxInFlightPerSubscription = C; subs=4
// has four (one event makes four deliveries) with the default
// MaxInFlightPerSubscription (8, so 4×8 = C).
func BenchmarkEndToEnd(b *testing.B) {
	const c = 32
	for _, nsubs := range []int{1, 4} {
		benchBackends(b, fmt.Sprintf("subs=%d/C=%d", nsubs, c), func(b *testing.B, db *sql.DB) {
			libRecv := newBenchReceiver(b, false)
			rawRecv := newBenchReceiver(b, false)
			var rawURLs []string
			for s := 0; s < nsubs; s++ {
				path := fmt.Sprintf("/hook/%d", s)
				benchSubscribe(b, db, libRecv.srv.URL+path)
				rawURLs = append(rawURLs, rawRecv.srv.URL+path)
			}
			cfg := Config{Concurrency: c}
			if nsubs == 1 {
				cfg.MaxInFlightPerSubscription = c
			}
			d := benchStartDispatcher(b, db, cfg)
			client := benchHTTPClient(c)
			b.Cleanup(client.CloseIdleConnections)

			var seq int64
			var libT, rawT, pubT, libCPU, rawCPU time.Duration
			delivered := 0 // by each side: b.N rounded up to whole events
			b.ResetTimer()
			for done, round := 0, 0; done < b.N; round++ {
				k := min(benchE2EChunk, b.N-done)
				events := (k + nsubs - 1) / nsubs
				deliveries := events * nsubs

				b.StopTimer()
				bodies := benchBodies(b, deliveries, seq)
				b.StartTimer()

				runRaw := func() {
					start, cpu := time.Now(), benchCPU(b)
					rawDone := rawRecv.expect(deliveries)
					benchRawPost(b, client, rawURLs, bodies, c)
					benchWait(b, rawDone, "raw deliveries")
					rawT += time.Since(start)
					rawCPU += benchCPU(b) - cpu
				}
				runLib := func() {
					// The round's events are committed first, in one
					// transaction (so no dispatcher sees any of them
					// before the clock starts), as the raw side's bodies
					// are built first; publishing is timed on its own
					// (pubT).
					libDone := libRecv.expect(deliveries)
					pubStart := time.Now()
					benchPublishBatches(b, db, nil, events, events, &seq)
					start, cpu := time.Now(), benchCPU(b)
					pubT += start.Sub(pubStart)
					d.Notify()
					benchWait(b, libDone, "library deliveries")
					benchWaitRecorded(b, db)
					libT += time.Since(start)
					libCPU += benchCPU(b) - cpu
				}
				if round%2 == 0 {
					runRaw()
					runLib()
				} else {
					runLib()
					runRaw()
				}

				done += deliveries
				delivered += deliveries
			}
			b.StopTimer()
			n := float64(delivered)
			libRate := n / libT.Seconds()
			rawRate := n / rawT.Seconds()
			b.ReportMetric(libRate/rawRate, "ratio")
			b.ReportMetric(n/(libT+pubT).Seconds()/rawRate, "ratio_with_publish")
			b.ReportMetric(libRate, "lib_deliveries/s")
			b.ReportMetric(float64(libCPU.Nanoseconds())/1e3/n, "lib_cpu_us/delivery")
			b.ReportMetric(float64(rawCPU.Nanoseconds())/1e3/n, "raw_cpu_us/delivery")
			b.ReportMetric(rawRate, "raw_deliveries/s")
		})
	}
}

// ---------------------------------------------------------------------------
// 4. Commit-to-receipt latency at light load.

// benchLatencySamples is how many events one op publishes, one at a time.
const benchLatencySamples = 100

// BenchmarkLatency publishes one event at a time and measures from the
// return of Commit to the arrival of the request at the receiver; the next
// event is published after the previous one arrived. mode=poll relies on
// the default PollInterval (100ms) alone; a random pause of up to one
// PollInterval separates samples so commits do not stay in phase with the
// poll ticker. mode=listen (PostgreSQL) relies on LISTEN/NOTIFY alone (the
// outbox trigger), with the same random pauses. mode=notify calls
// Dispatcher.Notify after each commit. One op
// is benchLatencySamples events; ns/op is suppressed, read p50_ms and
// p99_ms.
func BenchmarkLatency(b *testing.B) {
	for _, c := range []struct{ backend, mode string }{
		{"sqlite", "poll"}, {"sqlite", "notify"}, {"postgres", "listen"}, {"postgres", "notify"},
	} {
		mode := c.mode
		b.Run("mode="+mode+"/db="+c.backend, func(b *testing.B) {
			ctx := context.Background()
			var db *sql.DB
			if c.backend == "sqlite" {
				db = benchOpenDB(b, sqlite.Options{})
			} else {
				db = openPostgresTestDB(b)
			}
			rc := newBenchReceiver(b, false)
			rc.stamps = make(chan time.Time, 16)
			benchSubscribe(b, db, rc.srv.URL+"/hook")
			d := benchStartDispatcher(b, db, Config{PollInterval: PollIntervalDefault})

			lat := make([]time.Duration, 0, b.N*benchLatencySamples)
			var seq int64
			b.ResetTimer()
			for i := 0; i < b.N*benchLatencySamples; i++ {
				if mode != "notify" {
					time.Sleep(rand.N(PollIntervalDefault))
				}
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					b.Fatal(err)
				}
				seq++
				if err := benchPublishLib(ctx, tx, seq); err != nil {
					b.Fatal(err)
				}
				if err := tx.Commit(); err != nil {
					b.Fatal(err)
				}
				committed := time.Now()
				if mode == "notify" {
					d.Notify()
				}
				select {
				case got := <-rc.stamps:
					lat = append(lat, got.Sub(committed))
				case <-time.After(time.Minute):
					b.Fatal("event not delivered within a minute")
				}
			}
			b.StopTimer()
			slices.Sort(lat)
			pct := func(p float64) float64 {
				i := int(p*float64(len(lat))+0.999999) - 1
				i = max(0, min(i, len(lat)-1))
				return float64(lat[i].Microseconds()) / 1000
			}
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(pct(0.50), "p50_ms")
			b.ReportMetric(pct(0.99), "p99_ms")
			b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max_ms")
			b.ReportMetric(float64(len(lat)), "samples")
		})
	}
}

// ---------------------------------------------------------------------------
// 5. A hanging endpoint next to a healthy one.

// benchHangChunk is how many deliveries to A each setup makes before the
// other takes its turn.
const benchHangChunk = 500

// benchSeedType is the type of the events that build H's backlog: H
// subscribes to everything, A only to benchEventType's "order.*".
const benchSeedType = "audit.tick"

// BenchmarkHangingEndpoint measures the delivery rate to a healthy endpoint
// A in three setups run side by side with the default Config (Concurrency
// 32, MaxInFlightPerSubscription 8, RequestTimeout 15s): alone, A is the
// only subscription; with-healthy, a second subscription H receives every
// event too and answers at once; with-hanging, H never answers until the
// benchmark ends. Events are published in transactions of 100 with Notify;
// the setups take turns (in rotating order) in chunks of benchHangChunk
// events. One op is one delivery to A in each setup.
//
// ratio_vs_healthy = rate with a hanging H / rate with a healthy H: what
// H's hanging costs A, the isolation requirement (≥ 0.9). ratio = rate with
// a hanging H / rate alone also counts what any second subscription costs
// (its deliveries are written and recorded by the same dispatcher).
//
// backlog=N first publishes N events that only H subscribes to, in every
// setup (in the alone setup nobody receives them), and waits until they are
// expanded (and, for the healthy H, delivered): the state after H has hung
// for a while, N events ago.
func BenchmarkHangingEndpoint(b *testing.B) {
	for _, backlog := range []int{0, 10000} {
		b.Run(fmt.Sprintf("backlog=%d", backlog), func(b *testing.B) {
			benchHanging(b, backlog)
		})
	}
}

func benchHanging(b *testing.B, backlog int) {
	type setup struct {
		db   *sql.DB
		d    *Dispatcher
		a    *benchReceiver
		h    *benchReceiver
		seq  int64
		took time.Duration
	}
	mk := func(withH, hanging bool) *setup {
		s := &setup{db: benchOpenDB(b, sqlite.Options{})}
		s.a = newBenchReceiver(b, false)
		subs, err := NewSubscriptions(s.db, SubscriptionsConfig{})
		if err != nil {
			b.Fatal(err)
		}
		ctx := context.Background()
		if _, err := subs.Create(ctx, Subscription{Tenant: benchTenant, URL: s.a.srv.URL + "/a", EventTypes: []string{"order.*"}}); err != nil {
			b.Fatal(err)
		}
		if withH {
			s.h = newBenchReceiver(b, hanging)
			if _, err := subs.Create(ctx, Subscription{Tenant: benchTenant, URL: s.h.srv.URL + "/h", EventTypes: []string{"*"}}); err != nil {
				b.Fatal(err)
			}
		}
		s.d = benchStartDispatcher(b, s.db, Config{})
		if s.h != nil && hanging {
			b.Cleanup(s.h.release)
		}
		return s
	}
	seed := func(s *setup) {
		ctx := context.Background()
		events := make([]Event, 0, 1000)
		for done := 0; done < backlog; done += len(events) {
			events = events[:0]
			for j := 0; j < min(1000, backlog-done); j++ {
				events = append(events, Event{Type: benchSeedType, Tenant: benchTenant, Data: map[string]int{"n": done + j}})
			}
			tx, err := s.db.BeginTx(ctx, nil)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := PublishBatch(ctx, tx, events...); err != nil {
				b.Fatal(err)
			}
			if err := tx.Commit(); err != nil {
				b.Fatal(err)
			}
		}
		deadline := time.Now().Add(2 * time.Minute)
		for {
			s.d.Notify()
			var left int
			if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM webhook_outbox WHERE expanded_at IS NULL`).Scan(&left); err != nil {
				b.Fatal(err)
			}
			if left == 0 {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("%d seed events still unexpanded", left)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	alone, healthy, hang := mk(false, false), mk(true, false), mk(true, true)
	if backlog > 0 {
		seed(alone)
		seed(hang)
		seed(healthy)
		// The healthy H gets its backlog before the clock starts.
		deadline := time.Now().Add(2 * time.Minute)
		for healthy.h.n.Load() < int64(backlog) {
			if time.Now().After(deadline) {
				b.Fatalf("healthy H got %d of its %d backlog events", healthy.h.n.Load(), backlog)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	b.ResetTimer()
	for done, round := 0, 0; done < b.N; round++ {
		k := min(benchHangChunk, b.N-done)
		orders := [][]*setup{{alone, healthy, hang}, {hang, alone, healthy}, {healthy, hang, alone},
			{alone, hang, healthy}, {hang, healthy, alone}, {healthy, alone, hang}}
		order := orders[round%len(orders)]
		for _, s := range order {
			start := time.Now()
			ch := s.a.expect(k)
			benchPublishBatches(b, s.db, s.d, k, 100, &s.seq)
			benchWait(b, ch, "deliveries to A")
			s.took += time.Since(start)
		}
		done += k
	}
	b.StopTimer()
	// Sanity check: H must really be hanging (its requests may still be on
	// their way when the last delivery to A arrives).
	for deadline := time.Now().Add(5 * time.Second); hang.h.hanging.Load() == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			b.Fatal("no request to H is hanging")
		}
	}
	aloneRate := benchPerSecond(b.N, alone.took)
	healthyRate := benchPerSecond(b.N, healthy.took)
	hangRate := benchPerSecond(b.N, hang.took)
	b.ReportMetric(hangRate/aloneRate, "ratio")
	b.ReportMetric(hangRate/healthyRate, "ratio_vs_healthy")
	b.ReportMetric(aloneRate, "alone_deliveries/s")
	b.ReportMetric(healthyRate, "with_healthy_deliveries/s")
	b.ReportMetric(hangRate, "with_hanging_deliveries/s")
}
