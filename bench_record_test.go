package webhooks

// The recorder of direct expansion (SQLite) alone: what writing a delivery
// costs, without HTTP or the dispatcher's loop.

import (
	"context"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/outboxhook/webhooks/store/sqlite"
)

// BenchmarkRecordDirect records deliveries made by direct expansion, each
// succeeded at its first attempt, in group commits of directBatchMin
// attempts (one subscription, one delivery per event), as the recorder
// goroutine does: the lease renewed, the delivery rows with their first
// attempt, the subscription's health, the events marked expanded. The events
// are published and read untimed. cpu_us/delivery is the process's CPU time
// (getrusage) per delivery while recording; ns/op the wall time. It is the
// recording share of BenchmarkEndToEnd's lib_cpu_us/delivery.
func BenchmarkRecordDirect(b *testing.B) {
	ctx := context.Background()
	db := benchOpenDB(b, sqlite.Options{})
	sub := benchSubscribe(b, db, "http://127.0.0.1:1/hook")
	d, err := NewDispatcher(db, allowLoopback(Config{Logger: benchLogger}))
	if err != nil {
		b.Fatal(err)
	}
	var seq, cursor int64
	var cpu time.Duration
	recorded := 0
	var scratch recordScratch
	b.ResetTimer()
	for done := 0; done < b.N; done += directBatchMin {
		b.StopTimer()
		benchPublishBatches(b, db, nil, directBatchMin, directBatchMin, &seq)
		var rows []outboxRow
		if err := sqlx.SelectContext(ctx, d.db, &rows, d.q.OutboxLease.SelectEvents, cursor, directBatchMin); err != nil {
			b.Fatal(err)
		}
		cursor = rows[len(rows)-1].Seq
		now := time.Now()
		events := make([]*heldEvent, len(rows))
		for i, e := range rows {
			he := &heldEvent{seq: e.Seq, id: e.ID, tenant: e.Tenant, readAt: now, made: 1}
			id, err := newID("dlv_")
			if err != nil {
				b.Fatal(err)
			}
			j := &job{DeliveryID: id, EventID: e.ID, SubscriptionID: sub.ID, Tenant: e.Tenant, held: he}
			he.results = []result{{job: j, started: now, duration: time.Millisecond, status: 200}}
			events[i] = he
		}
		b.StartTimer()
		c0 := benchCPU(b)
		r := d.recordDirect(ctx, "bench", events, &scratch)
		cpu += benchCPU(b) - c0
		if r.err != nil {
			b.Fatal(r.err)
		}
		recorded += len(events)
	}
	b.ReportMetric(float64(cpu.Nanoseconds())/1e3/float64(recorded), "cpu_us/delivery")
}
