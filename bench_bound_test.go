//go:build unix

package webhooks

// The ceiling of BenchmarkEndToEnd's ratio on this machine: what the raw
// client spends per request, against the least database work any dispatcher
// that keeps this schema's records must do per delivery.

import (
	"context"
	"database/sql"
	"fmt"
	"net/http"
	"runtime"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/outboxhook/webhooks/internal/dbtx"
	"github.com/outboxhook/webhooks/store/sqlite"
)

// BenchmarkEndToEndBound measures, in one run and for the same number of
// deliveries:
//
//   - raw: BenchmarkEndToEnd's raw side (C = 32 goroutines posting the
//     envelopes through the dispatcher's transport to a receiver in this
//     process): wall time and CPU time (getrusage, all cores) per request;
//   - lib: BenchmarkEndToEnd's library side (subs=1) on its own database:
//     CPU time per delivery, and the ratio of the rates;
//   - floor: the fewest SQLite writes that record a delivery in this schema,
//     with no HTTP, no signing and no dispatcher logic: per transaction of
//     floor_step deliveries (32, the most one step of a dispatcher with
//     Concurrency 32 records, or 128), read the events to expand with their payloads, insert
//     each delivery once, directly in its final state (succeeded, one
//     attempt), insert its attempt row, mark the events expanded; prepared
//     statements, one row per execution (the cheapest form measured).
//
// A dispatcher that delivers over the same transport and records those rows
// in steps of that size does at least both amounts of work, so on this
// machine its rate is at most NumCPU / (raw CPU + floor CPU) per delivery,
// and at most 1 / floor wall time (SQLite has one writer). bound_cpu and
// bound_writer are those rates over the raw rate, and bound the lower of
// the two: the best BenchmarkEndToEnd ratio (subs=1) such a dispatcher could
// reach here. It is an estimate, not a proof: bigger steps lower the floor
// (see BENCHMARKS.md §3). lib_cpu_us/delivery is what the library spends in
// fact. One op is one delivery by each of the three.
func BenchmarkEndToEndBound(b *testing.B) {
	for _, step := range []int{32, 128} {
		b.Run(fmt.Sprintf("floor_step=%d", step), func(b *testing.B) { benchEndToEndBound(b, step) })
	}
}

func benchEndToEndBound(b *testing.B, step int) {
	const c = 32
	ctx := context.Background()
	db := benchOpenDB(b, sqlite.Options{})
	recv := newBenchReceiver(b, false)
	sub := benchSubscribe(b, db, recv.srv.URL+"/hook/0")
	urls := []string{recv.srv.URL + "/hook/0"}
	client := benchHTTPClient(c)
	b.Cleanup(client.CloseIdleConnections)
	xdb := sqlx.NewDb(db, "sqlite3")
	libDB := benchOpenDB(b, sqlite.Options{})
	libRecv := newBenchReceiver(b, false)
	benchSubscribe(b, libDB, libRecv.srv.URL+"/hook/0")
	d := benchStartDispatcher(b, libDB, Config{Concurrency: c, MaxInFlightPerSubscription: c})
	var libSeq int64
	var libCPU, libWall time.Duration

	var seq int64
	var rawCPU, rawWall, floorCPU, floorWall time.Duration
	n := 0
	b.ResetTimer()
	for n < b.N {
		k := min(benchE2EChunk, b.N-n)
		b.StopTimer()
		bodies := benchBodies(b, k, seq)
		benchPublishBatches(b, db, nil, k, k, &seq)
		wall, cpu := benchLibChunk(b, libDB, d, libRecv, k, &libSeq)
		libWall += wall
		libCPU += cpu

		wall, cpu = benchRawChunk(b, client, recv, urls, bodies, c)
		rawWall += wall
		rawCPU += cpu

		cpu, start := benchCPU(b), time.Now()
		for left := k; left > 0; left -= step {
			if err := benchFloorStep(ctx, xdb, sub.ID, min(step, left)); err != nil {
				b.Fatal(err)
			}
		}
		floorWall += time.Since(start)
		floorCPU += benchCPU(b) - cpu
		n += k
	}
	b.StopTimer()
	per := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / float64(n) / 1000 }
	boundCPU := float64(runtime.NumCPU()) * rawWall.Seconds() / (rawCPU + floorCPU).Seconds()
	boundWriter := rawWall.Seconds() / floorWall.Seconds()
	b.ReportMetric(per(rawCPU), "raw_cpu_us/req")
	b.ReportMetric(per(rawWall), "raw_wall_us/req")
	b.ReportMetric(per(libCPU), "lib_cpu_us/delivery")
	b.ReportMetric(rawWall.Seconds()/libWall.Seconds(), "ratio")
	b.ReportMetric(per(floorCPU), "floor_cpu_us/delivery")
	b.ReportMetric(per(floorWall), "floor_wall_us/delivery")
	b.ReportMetric(boundCPU, "bound_cpu")
	b.ReportMetric(boundWriter, "bound_writer")
	b.ReportMetric(min(boundCPU, boundWriter), "bound")
}

// benchLibChunk publishes k events in one transaction (off the benchmark
// clock), wakes d and waits until recv has them all and they are recorded:
// the wall and CPU time from the wake-up on.
func benchLibChunk(b *testing.B, db *sql.DB, d *Dispatcher, recv *benchReceiver, k int, seq *int64) (wall, cpu time.Duration) {
	b.StopTimer()
	// Expect before publishing: the dispatcher's poll may see the events
	// as soon as they commit, before Notify.
	done := recv.expect(k)
	benchPublishBatches(b, db, nil, k, k, seq)
	b.StartTimer()
	cpu0, start := benchCPU(b), time.Now()
	d.Notify()
	benchWait(b, done, "library deliveries")
	benchWaitRecorded(b, db)
	return time.Since(start), benchCPU(b) - cpu0
}

// benchRawChunk posts bodies from c goroutines and waits until recv has
// them all: the wall and CPU time it took.
func benchRawChunk(b *testing.B, client *http.Client, recv *benchReceiver, urls []string, bodies [][]byte, c int) (wall, cpu time.Duration) {
	cpu0, start := benchCPU(b), time.Now()
	done := recv.expect(len(bodies))
	benchRawPost(b, client, urls, bodies, c)
	benchWait(b, done, "raw deliveries")
	return time.Since(start), benchCPU(b) - cpu0
}

// benchFloorStep is one transaction of BenchmarkEndToEndBound's floor: k
// events read, k deliveries and k attempts inserted, k events marked.
func benchFloorStep(ctx context.Context, db *sqlx.DB, subID string, k int) error {
	return dbtx.Run(ctx, db, true, func(tx dbtx.Tx) error {
		type ev struct {
			Seq     int64  `db:"seq"`
			ID      string `db:"id"`
			Tenant  string `db:"tenant"`
			Payload string `db:"payload"`
		}
		var events []ev
		if err := sqlx.SelectContext(ctx, tx, &events, `SELECT seq, id, tenant, payload FROM webhook_outbox
WHERE expanded_at IS NULL ORDER BY seq LIMIT ?1`, k); err != nil {
			return err
		}
		now := time.Now().UnixMilli()
		st, err := benchPrepareRecord(ctx, tx)
		if err != nil {
			return err
		}
		defer st.close()
		for _, e := range events {
			id, err := newID("dlv_")
			if err != nil {
				return err
			}
			if _, err := st.ins.ExecContext(ctx, id, e.ID, subID, e.Tenant, string(DeliverySucceeded), now, 200, "", now); err != nil {
				return err
			}
			if _, err := st.att.ExecContext(ctx, id, now, 1, 200, "", ""); err != nil {
				return err
			}
			if _, err := st.mark.ExecContext(ctx, now, e.Seq); err != nil {
				return err
			}
		}
		return nil
	})
}
