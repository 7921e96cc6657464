//go:build unix

package webhooks

// A sketch of the leanest dispatcher loop this schema allows, to measure
// (rather than compute, as BenchmarkEndToEndBound does) how close to the raw
// client any design could come on this machine. Benchmark code only: it
// handles the success path of one subscription and none of the rest.

import (
	"context"
	"database/sql"
	"fmt"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/outboxhook/webhooks/internal/dbtx"
	"github.com/outboxhook/webhooks/store/sqlite"
)

// BenchmarkEndToEndSketch runs arms in turns, in chunks of benchE2EChunk
// deliveries to one subscription with C = 32: raw (as in BenchmarkEndToEnd),
// lib (the Dispatcher, subs=1) and sketches of other dispatcher shapes. A
// sketch keeps the library's worker side (Dispatcher.deliver on 32
// long-lived goroutines: signing, timeout, headers, the capped response
// read) and replaces its loop:
//
//   - floor: one write transaction per step, started once a quarter of the
//     slots is free (as the library does), that records each finished
//     delivery once, in its final state, with its attempt row, marks its
//     event expanded (prepared statements, one row per execution), renews a
//     one-row lease, and reads the next events past an in-memory cursor.
//     Events in flight stay unexpanded until recorded: with the lease, that
//     is what makes a crash lose nothing (a successor delivers them again);
//   - one_row: floor recording only the delivery row (no attempt row, no
//     event marked: less than this schema keeps);
//   - async: jobs start from read-only queries past the cursor, with no
//     write transaction; finished attempts go to a writer goroutine that
//     records (as floor) whatever gathered while its last transaction ran;
//   - async_64, async_256: async, handing the writer at least 64 or 256
//     results at a time (or the round's last ones);
//   - nodb: no database at all (bodies handed out from memory, nothing
//     recorded): what the worker side and the loop's hand-offs cost alone.
//
// Only the success path of one subscription is sketched. ratio_* are each
// arm's rate over raw's, *_cpu_us CPU time (all threads) per delivery,
// *_rows_per_tx the deliveries an async writer recorded per transaction.
func BenchmarkEndToEndSketch(b *testing.B) {
	const c = 32
	ctx := context.Background()

	rawRecv := newBenchReceiver(b, false)
	rawURLs := []string{rawRecv.srv.URL + "/hook/0"}
	client := benchHTTPClient(c)
	b.Cleanup(client.CloseIdleConnections)

	libDB := benchOpenDB(b, sqlite.Options{})
	libRecv := newBenchReceiver(b, false)
	benchSubscribe(b, libDB, libRecv.srv.URL+"/hook/0")
	d := benchStartDispatcher(b, libDB, Config{Concurrency: c, MaxInFlightPerSubscription: c})

	// The sketches: the floor loop stepping at a quarter of the slots free
	// (as the library does) or at half, and the loop with no database at
	// all (the events' bodies are handed out from memory, nothing is
	// recorded): what the worker side and the loop's hand-offs cost alone.
	type variant struct {
		name    string
		minFree int
		noDB    bool
		oneRow  bool
		async   bool
		minRows int
		db      *sql.DB
		recv    *benchReceiver
		sk      *benchSketch
		seq     int64
		t, cpu  time.Duration
	}
	variants := []*variant{{name: "floor", minFree: c / 4}, {name: "one_row", minFree: c / 4, oneRow: true},
		{name: "async", minFree: c / 4, async: true},
		{name: "async_64", minFree: c / 4, async: true, minRows: 64},
		{name: "async_256", minFree: c / 4, async: true, minRows: 256},
		{name: "nodb", minFree: c / 4, noDB: true}}
	for _, v := range variants {
		v.db = benchOpenDB(b, sqlite.Options{})
		v.recv = newBenchReceiver(b, false)
		v.sk = newBenchSketch(b, v.db, benchSubscribe(b, v.db, v.recv.srv.URL+"/hook/0"), c)
		v.sk.minFree, v.sk.noDB, v.sk.oneRow, v.sk.async, v.sk.minRows = v.minFree, v.noDB, v.oneRow, v.async, v.minRows
	}

	var seq, libSeq int64
	var rawT, libT, rawCPU, libCPU time.Duration
	n := 0
	b.ResetTimer()
	for round := 0; n < b.N; round++ {
		k := min(benchE2EChunk, b.N-n)
		b.StopTimer()
		bodies := benchBodies(b, k, seq)
		seq += int64(k)
		b.StartTimer()
		arms := []func(){
			func() {
				wall, cpu := benchRawChunk(b, client, rawRecv, rawURLs, bodies, c)
				rawT += wall
				rawCPU += cpu
			},
			func() {
				wall, cpu := benchLibChunk(b, libDB, d, libRecv, k, &libSeq)
				libT += wall
				libCPU += cpu
			},
		}
		for _, v := range variants {
			arms = append(arms, func() {
				b.StopTimer()
				done := v.recv.expect(k)
				if v.noDB {
					v.sk.bodies = bodies
				} else {
					benchPublishBatches(b, v.db, nil, k, k, &v.seq)
				}
				b.StartTimer()
				cpu, start := benchCPU(b), time.Now()
				errc := make(chan error, 1)
				go func() { errc <- v.sk.run(ctx, k) }()
				benchWait(b, done, "sketch deliveries")
				if err := <-errc; err != nil { // the last records, on the clock as the library's
					b.Fatal(err)
				}
				v.t += time.Since(start)
				v.cpu += benchCPU(b) - cpu
			})
		}
		for i := range arms {
			arms[(i+round)%len(arms)]()
		}
		n += k
	}
	b.StopTimer()
	per := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / float64(n) / 1000 }
	b.ReportMetric(rawT.Seconds()/libT.Seconds(), "ratio_lib")
	b.ReportMetric(per(rawCPU), "raw_cpu_us")
	b.ReportMetric(per(libCPU), "lib_cpu_us")
	for _, v := range variants {
		b.ReportMetric(rawT.Seconds()/v.t.Seconds(), "ratio_"+v.name)
		b.ReportMetric(per(v.cpu), v.name+"_cpu_us")
		if v.async {
			b.ReportMetric(float64(n)/float64(v.sk.txs), v.name+"_rows_per_tx")
		}
	}
}

// benchSketch is BenchmarkEndToEndSketch's dispatcher.
type benchSketch struct {
	d       *Dispatcher // its deliver, client and signer cache only: never Run
	db      *sqlx.DB
	sub     Subscription
	secrets string // the subscription's secrets column
	c       int
	jobs    chan *job
	results chan result
	seqOf   map[string]int64 // delivery ID → its event's seq, while in flight
	cursor  int64            // the highest seq handed to a worker
	minFree int              // free slots that make a step
	noDB    bool             // no database: jobs from bodies, nothing recorded
	oneRow  bool             // record only the delivery row: no attempt row, no event marked
	async   bool             // start jobs from reads; a writer goroutine records in group commits
	minRows int              // async: the writer waits for this many results (or the round's end)
	txs     int              // async: write transactions run
	bodies  [][]byte         // noDB: the round's envelopes, handed out in turn
}

func newBenchSketch(b *testing.B, db *sql.DB, sub Subscription, c int) *benchSketch {
	b.Helper()
	ctx := context.Background()
	d, err := NewDispatcher(db, allowLoopback(Config{Concurrency: c, Logger: benchLogger}))
	if err != nil {
		b.Fatal(err)
	}
	sk := &benchSketch{d: d, db: sqlx.NewDb(db, "sqlite3"), sub: sub, c: c,
		jobs: make(chan *job, c), results: make(chan result, c), seqOf: map[string]int64{}}
	if err := db.QueryRowContext(ctx, `SELECT secrets FROM webhook_subscriptions WHERE id = ?1`, sub.ID).Scan(&sk.secrets); err != nil {
		b.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE bench_sketch_lease (id INTEGER PRIMARY KEY, owner TEXT, until INTEGER)`); err != nil {
		b.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, `INSERT INTO bench_sketch_lease VALUES (1, 'sketch', 0)`); err != nil {
		b.Fatal(err)
	}
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	for w := 0; w < c; w++ {
		go func() {
			defer func() { done <- struct{}{} }()
			for j := range sk.jobs {
				sk.results <- d.deliver(wctx, j)
			}
		}()
	}
	b.Cleanup(func() {
		close(sk.jobs)
		for w := 0; w < c; w++ {
			<-done
		}
		cancel()
	})
	return sk
}

// run delivers and records k events, published before it starts.
func (sk *benchSketch) run(ctx context.Context, k int) error {
	if sk.async {
		return sk.runAsync(ctx)
	}
	inFlight, recorded, more := 0, 0, true
	var finished []result
	for recorded < k {
		if free := sk.c - inFlight; inFlight == 0 || free >= sk.minFree {
			jobs, err := sk.step(ctx, finished, free, more)
			if err != nil {
				return err
			}
			recorded += len(finished)
			finished = finished[:0]
			more = len(jobs) == free
			for _, j := range jobs {
				inFlight++
				sk.jobs <- j
			}
			if recorded == k {
				break
			}
		}
		r := <-sk.results
		inFlight--
		finished = append(finished, r)
		for drained := false; !drained; {
			select {
			case r := <-sk.results:
				inFlight--
				finished = append(finished, r)
			default:
				drained = true
			}
		}
	}
	return nil
}

// runAsync is the async variant of run: the loop starts jobs from
// read-only queries past the cursor (the events stay unexpanded until
// recorded, as in the other variants), and hands finished attempts to a
// writer goroutine, which records whatever has gathered while its last
// transaction ran (group commit) with the same statements as step.
func (sk *benchSketch) runAsync(ctx context.Context) error {
	type batch struct {
		results []result
		seqs    []int64
	}
	batches := make(chan batch, 1)
	werr := make(chan error, 1)
	go func() {
		var err error
		for bt := range batches {
			sk.txs++
			if err == nil {
				err = dbtx.Run(ctx, sk.db, true, func(tx dbtx.Tx) error { return sk.record(ctx, tx, bt.results, bt.seqs) })
			}
		}
		werr <- err
	}()
	var pending batch
	handOff := func(block bool) {
		if len(pending.results) == 0 {
			return
		}
		if block {
			batches <- pending
			pending = batch{}
			return
		}
		select {
		case batches <- pending:
			pending = batch{}
		default: // the writer is busy: more gathers meanwhile
		}
	}
	inFlight, more := 0, true
	for more || inFlight > 0 {
		if free := sk.c - inFlight; more && (inFlight == 0 || free >= sk.minFree) {
			jobs, seqs, err := sk.read(ctx, sk.db, free)
			if err != nil {
				return err
			}
			more = len(jobs) == free
			for i, j := range jobs {
				sk.seqOf[j.DeliveryID] = seqs[i]
				sk.cursor = max(sk.cursor, seqs[i])
				inFlight++
				sk.jobs <- j
			}
		}
		if len(pending.results) >= sk.minRows {
			handOff(false)
		}
		if inFlight == 0 {
			continue
		}
		for first := true; ; first = false {
			var r result
			if first {
				r = <-sk.results
			} else {
				select {
				case r = <-sk.results:
				default:
				}
				if r.job == nil {
					break
				}
			}
			inFlight--
			pending.results = append(pending.results, r)
			pending.seqs = append(pending.seqs, sk.seqOf[r.job.DeliveryID])
			delete(sk.seqOf, r.job.DeliveryID)
		}
	}
	handOff(true)
	close(batches)
	return <-werr
}

// step is one write transaction: record finished, renew the lease, and
// read up to free events past the cursor as jobs.
func (sk *benchSketch) step(ctx context.Context, finished []result, free int, more bool) ([]*job, error) {
	if sk.noDB {
		var jobs []*job
		for len(jobs) < free && len(sk.bodies) > 0 {
			id, err := newID("dlv_")
			if err != nil {
				return nil, err
			}
			jobs = append(jobs, &job{DeliveryID: id, EventID: id, SubscriptionID: sk.sub.ID, Tenant: sk.sub.Tenant,
				URL: sk.sub.URL, Secrets: sk.secrets, Headers: "{}", Payload: sk.bodies[0]})
			sk.bodies = sk.bodies[1:]
		}
		return jobs, nil
	}
	var jobs []*job
	var seqs []int64
	err := dbtx.Run(ctx, sk.db, true, func(tx dbtx.Tx) error {
		jobs, seqs = jobs[:0], seqs[:0]
		recSeqs := make([]int64, len(finished))
		for i := range finished {
			recSeqs[i] = sk.seqOf[finished[i].job.DeliveryID]
		}
		if err := sk.record(ctx, tx, finished, recSeqs); err != nil {
			return err
		}
		if !more || free == 0 {
			return nil
		}
		var err error
		jobs, seqs, err = sk.read(ctx, tx, free)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("sketch step: %w", err)
	}
	for _, r := range finished {
		delete(sk.seqOf, r.job.DeliveryID)
	}
	for i, j := range jobs {
		sk.seqOf[j.DeliveryID] = seqs[i]
		sk.cursor = max(sk.cursor, seqs[i])
	}
	return jobs, nil
}

// record writes finished attempts (seqs: their events) and renews the lease.
func (sk *benchSketch) record(ctx context.Context, tx dbtx.Tx, finished []result, seqs []int64) error {
	now := time.Now().UnixMilli()
	if len(finished) > 0 {
		st, err := benchPrepareRecord(ctx, tx)
		if err != nil {
			return err
		}
		defer st.close()
		ins, att, mark := st.ins, st.att, st.mark
		for i := range finished {
			r := &finished[i]
			state, deliveredAt := string(DeliverySucceeded), any(now)
			if r.status < 200 || r.status > 299 {
				state, deliveredAt = string(DeliveryPending), nil
			}
			j := r.job
			if _, err := ins.ExecContext(ctx, j.DeliveryID, j.EventID, j.SubscriptionID, j.Tenant, state, now,
				r.status, r.errText, deliveredAt); err != nil {
				return err
			}
			if sk.oneRow {
				continue
			}
			if _, err := att.ExecContext(ctx, j.DeliveryID, r.started.UnixMilli(), r.duration.Milliseconds(),
				r.status, r.errText, r.excerpt); err != nil {
				return err
			}
			if _, err := mark.ExecContext(ctx, now, seqs[i]); err != nil {
				return err
			}
		}
	}
	_, err := tx.ExecContext(ctx, `UPDATE bench_sketch_lease SET until = ?1 WHERE id = 1 AND owner = 'sketch'`,
		now+int64(sk.d.cfg.LeaseDuration/time.Millisecond))
	return err
}

// read returns up to free events past the cursor as jobs, with their seqs.
func (sk *benchSketch) read(ctx context.Context, q sqlx.QueryerContext, free int) ([]*job, []int64, error) {
	type ev struct {
		Seq     int64  `db:"seq"`
		ID      string `db:"id"`
		Tenant  string `db:"tenant"`
		Payload []byte `db:"payload"`
	}
	var events []ev
	if err := sqlx.SelectContext(ctx, q, &events, `SELECT seq, id, tenant, payload FROM webhook_outbox
WHERE expanded_at IS NULL AND seq > ?1 ORDER BY seq LIMIT ?2`, sk.cursor, free); err != nil {
		return nil, nil, err
	}
	jobs, seqs := make([]*job, 0, len(events)), make([]int64, 0, len(events))
	for _, e := range events {
		id, err := newID("dlv_")
		if err != nil {
			return nil, nil, err
		}
		jobs = append(jobs, &job{DeliveryID: id, EventID: e.ID, SubscriptionID: sk.sub.ID, Tenant: e.Tenant,
			URL: sk.sub.URL, Secrets: sk.secrets, Headers: "{}", Payload: e.Payload})
		seqs = append(seqs, e.Seq)
	}
	return jobs, seqs, nil
}

// benchRecordStmts record finished deliveries the least costly way measured:
// ins a delivery in its final state ($1 id, $2 event_id, $3
// subscription_id, $4 tenant, $5 state, $6 now, $7 last_status, $8
// last_error, $9 delivered_at), att its attempt ($1 delivery_id, $2
// started_at, $3 duration_ms, $4 status_code, $5 error, $6 response_body),
// mark its event expanded ($1 now, $2 seq).
type benchRecordStmts struct{ ins, att, mark *sqlx.Stmt }

func benchPrepareRecord(ctx context.Context, tx dbtx.Tx) (*benchRecordStmts, error) {
	var st benchRecordStmts
	for _, p := range []struct {
		stmt  **sqlx.Stmt
		query string
	}{
		{&st.ins, `INSERT INTO webhook_deliveries
    (id, event_id, subscription_id, tenant, state, attempts, next_at, last_status, last_error, created_at, updated_at, delivered_at)
VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7, ?8, ?6, ?6, ?9)`},
		{&st.att, `INSERT INTO webhook_attempts
    (delivery_id, attempt, started_at, duration_ms, status_code, error, response_body)
VALUES (?1, 1, ?2, ?3, ?4, ?5, ?6)`},
		{&st.mark, `UPDATE webhook_outbox SET expanded_at = ?1 WHERE seq = ?2`},
	} {
		stmt, err := tx.PreparexContext(ctx, p.query)
		if err != nil {
			st.close()
			return nil, err
		}
		*p.stmt = stmt
	}
	return &st, nil
}

func (st *benchRecordStmts) close() {
	for _, s := range []*sqlx.Stmt{st.ins, st.att, st.mark} {
		if s != nil {
			s.Close()
		}
	}
}
