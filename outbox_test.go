package webhooks

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestPublishWritesOneRowInTheCallersTransaction(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		ctx := context.Background()

		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		id, err := Publish(ctx, tx, Event{Type: "order.shipped", Tenant: "acme", Data: map[string]int{"n": 1}})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(id, "evt_") || len(id) != 4+32 {
			t.Fatalf("generated ID %q: want evt_ + 32 hex digits", id)
		}
		if err := tx.Rollback(); err != nil {
			t.Fatal(err)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox`); n != 0 {
			t.Fatalf("after rollback: %d outbox rows, want 0", n)
		}

		ids := publishTx(t, db, Event{Type: "order.shipped", Tenant: "acme"})
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE id = $1`, ids[0]); n != 1 {
			t.Fatalf("after commit: %d rows, want 1", n)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries`); n != 0 {
			t.Fatalf("Publish wrote %d deliveries; it must write the outbox row only", n)
		}
	})
}

func TestPublishPayload(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		ctx := context.Background()
		at := time.Date(2024, 5, 4, 12, 0, 0, 123000000, time.FixedZone("X", 3600))
		raw := json.RawMessage("{ \"orderId\" :  \"or_1\",\n \"n\": 1.50 }")
		id, err := Publish(ctx, db, Event{ID: "evt_custom-1", Type: "order.shipped", Tenant: "t", Data: raw, OccurredAt: at})
		if err != nil {
			t.Fatal(err)
		}
		if id != "evt_custom-1" {
			t.Fatalf("id %q", id)
		}
		var payload string
		if err := db.QueryRow(`SELECT payload FROM webhook_outbox WHERE id = $1`, id).Scan(&payload); err != nil {
			t.Fatal(err)
		}
		want := `{"id":"evt_custom-1","type":"order.shipped","timestamp":"2024-05-04T11:00:00.123Z","data":` + string(raw) + `}`
		if payload != want {
			t.Fatalf("payload\n got %s\nwant %s", payload, want)
		}
		var env map[string]any
		if err := json.Unmarshal([]byte(payload), &env); err != nil {
			t.Fatalf("payload is not JSON: %v", err)
		}
		if _, ok := env["tenant"]; ok {
			t.Fatal("the tenant must not be sent")
		}

		// nil data is an empty object.
		id, err = Publish(ctx, db, Event{Type: "user.deleted"})
		if err != nil {
			t.Fatal(err)
		}
		if err := db.QueryRow(`SELECT payload FROM webhook_outbox WHERE id = $1`, id).Scan(&payload); err != nil {
			t.Fatal(err)
		}
		if !strings.HasSuffix(payload, `"data":{}}`) {
			t.Fatalf("nil data: payload %s", payload)
		}
	})
}

func TestPublishRejectsInvalidInputAndWritesNothing(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		ctx := context.Background()
		p := &Publisher{MaxPayloadBytes: 1024}
		cases := []struct {
			name string
			e    Event
			want error
		}{
			{"empty type", Event{}, ErrInvalidEvent},
			{"space in type", Event{Type: "order shipped"}, ErrInvalidEvent},
			{"empty segment", Event{Type: "order..shipped"}, ErrInvalidEvent},
			{"trailing dot", Event{Type: "order."}, ErrInvalidEvent},
			{"wildcard type", Event{Type: "order.*"}, ErrInvalidEvent},
			{"unicode type", Event{Type: "ordér.shipped"}, ErrInvalidEvent},
			{"long type", Event{Type: strings.Repeat("a", MaxEventTypeLength+1)}, ErrInvalidEvent},
			{"array data", Event{Type: "a.b", Data: []int{1}}, ErrInvalidEvent},
			{"string data", Event{Type: "a.b", Data: "x"}, ErrInvalidEvent},
			{"number data", Event{Type: "a.b", Data: 3}, ErrInvalidEvent},
			{"raw array", Event{Type: "a.b", Data: json.RawMessage(`[1]`)}, ErrInvalidEvent},
			{"raw invalid", Event{Type: "a.b", Data: json.RawMessage(`{"a":`)}, ErrInvalidEvent},
			{"raw null", Event{Type: "a.b", Data: json.RawMessage(`null`)}, ErrInvalidEvent},
			{"unmarshalable", Event{Type: "a.b", Data: map[string]any{"f": func() {}}}, ErrInvalidEvent},
			{"id with space", Event{Type: "a.b", ID: "evt 1"}, ErrInvalidEvent},
			{"id with quote", Event{Type: "a.b", ID: `evt"1`}, ErrInvalidEvent},
			{"long id", Event{Type: "a.b", ID: strings.Repeat("x", MaxEventIDLength+1)}, ErrInvalidEvent},
			{"tenant control char", Event{Type: "a.b", Tenant: "ac\nme"}, ErrInvalidEvent},
			{"tenant invalid utf8", Event{Type: "a.b", Tenant: "\xff"}, ErrInvalidEvent},
			{"too large", Event{Type: "a.b", Data: map[string]string{"x": strings.Repeat("y", 1024)}}, ErrPayloadTooLarge},
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				_, err := p.Publish(ctx, db, c.e)
				if !errors.Is(err, c.want) {
					t.Fatalf("err = %v, want %v", err, c.want)
				}
			})
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox`); n != 0 {
			t.Fatalf("%d rows written by invalid publishes", n)
		}
	})
}

func TestPublishDefaultPayloadLimit(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		big := map[string]string{"x": strings.Repeat("y", MaxPayloadBytesDefault)}
		if _, err := Publish(context.Background(), db, Event{Type: "a.b", Data: big}); !errors.Is(err, ErrPayloadTooLarge) {
			t.Fatalf("err = %v, want ErrPayloadTooLarge", err)
		}
		ok := map[string]string{"x": strings.Repeat("y", MaxPayloadBytesDefault-200)}
		if _, err := Publish(context.Background(), db, Event{Type: "a.b", Data: ok}); err != nil {
			t.Fatalf("payload under the limit: %v", err)
		}
	})
}

func TestPublishDuplicateIDIsIdempotent(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		ctx := context.Background()
		publishTx(t, db, Event{ID: "order-42-shipped", Type: "order.shipped", Data: map[string]int{"v": 1}})

		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		_, err = Publish(ctx, tx, Event{ID: "order-42-shipped", Type: "order.shipped", Data: map[string]int{"v": 2}})
		if !errors.Is(err, ErrDuplicateEvent) {
			t.Fatalf("err = %v, want ErrDuplicateEvent", err)
		}
		// The transaction is still usable and the first event is unchanged.
		if _, err := Publish(ctx, tx, Event{Type: "order.shipped"}); err != nil {
			t.Fatalf("transaction unusable after a duplicate: %v", err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		var payload string
		if err := db.QueryRow(`SELECT payload FROM webhook_outbox WHERE id = 'order-42-shipped'`).Scan(&payload); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(payload, `"data":{"v":1}`) {
			t.Fatalf("duplicate overwrote the event: %s", payload)
		}
	})
}

func TestPublishBatch(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		ctx := context.Background()
		ids, err := PublishBatch(ctx, db,
			Event{Type: "a.one", Data: map[string]int{"i": 1}},
			Event{ID: "fixed-id", Type: "a.two"},
			Event{Type: "a.three", Tenant: "t"},
		)
		if err != nil {
			t.Fatal(err)
		}
		if len(ids) != 3 || ids[1] != "fixed-id" {
			t.Fatalf("ids %v", ids)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox`); n != 3 {
			t.Fatalf("%d rows, want 3", n)
		}

		// A batch with an existing ID writes nothing.
		_, err = PublishBatch(ctx, db, Event{Type: "b.one"}, Event{ID: "fixed-id", Type: "b.two"})
		if !errors.Is(err, ErrDuplicateEvent) {
			t.Fatalf("err = %v, want ErrDuplicateEvent", err)
		}
		// Duplicates inside the batch, and invalid events, are refused up front.
		if _, err := PublishBatch(ctx, db, Event{ID: "x", Type: "c.one"}, Event{ID: "x", Type: "c.two"}); !errors.Is(err, ErrInvalidEvent) {
			t.Fatalf("err = %v, want ErrInvalidEvent", err)
		}
		if _, err := PublishBatch(ctx, db, Event{Type: "c.one"}, Event{Type: "bad type"}); !errors.Is(err, ErrInvalidEvent) {
			t.Fatalf("err = %v, want ErrInvalidEvent", err)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox`); n != 3 {
			t.Fatalf("%d rows after refused batches, want 3", n)
		}
		if ids, err := PublishBatch(ctx, db); err != nil || ids != nil {
			t.Fatalf("empty batch: %v %v", ids, err)
		}
	})
}

// A batch bigger than one statement is still all or none: through a
// transaction of the caller's, and through a *sql.DB (a transaction of its
// own), a duplicate ID in its last statement leaves nothing of it written.
func TestPublishBatchOfSeveralStatements(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		ctx := context.Background()
		batch := func(prefix string, n int) []Event {
			events := make([]Event, n)
			for i := range events {
				events[i] = Event{ID: fmt.Sprintf("%s-%04d", prefix, i), Type: "order.placed", Data: map[string]int{"i": i}}
			}
			return events
		}
		n := 2*BatchStatementEvents + 50
		ids, err := PublishBatch(ctx, db, batch("a", n)...)
		if err != nil {
			t.Fatal(err)
		}
		if len(ids) != n || ids[n-1] != fmt.Sprintf("a-%04d", n-1) {
			t.Fatalf("%d ids, last %q", len(ids), ids[len(ids)-1])
		}
		if got := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox`); got != n {
			t.Fatalf("%d rows, want %d", got, n)
		}
		// Its seqs follow the batch's order.
		var first, last int64
		if err := db.QueryRow(`SELECT seq FROM webhook_outbox WHERE id = 'a-0000'`).Scan(&first); err != nil {
			t.Fatal(err)
		}
		if err := db.QueryRow(fmt.Sprintf(`SELECT seq FROM webhook_outbox WHERE id = 'a-%04d'`, n-1)).Scan(&last); err != nil {
			t.Fatal(err)
		}
		if last-first != int64(n-1) {
			t.Fatalf("seqs %d..%d for %d events", first, last, n)
		}

		// The last statement meets an existing ID: nothing of the batch is
		// left, through a *sql.DB ...
		dup := batch("b", n)
		dup[n-1].ID = "a-0007"
		if _, err := PublishBatch(ctx, db, dup...); !errors.Is(err, ErrDuplicateEvent) {
			t.Fatalf("err = %v, want ErrDuplicateEvent", err)
		}
		if got := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox`); got != n {
			t.Fatalf("%d rows after the refused batch, want %d", got, n)
		}
		// ... and inside the caller's transaction, which can commit what
		// else it wrote.
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := Publish(ctx, tx, Event{ID: "other", Type: "order.placed"}); err != nil {
			t.Fatal(err)
		}
		if _, err := PublishBatch(ctx, tx, dup...); !errors.Is(err, ErrDuplicateEvent) {
			t.Fatalf("in a transaction: err = %v, want ErrDuplicateEvent", err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		if got := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE id LIKE 'b-%'`); got != 0 {
			t.Fatalf("%d events of the refused batch written", got)
		}
		if got := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox`); got != n+1 {
			t.Fatalf("%d rows, want %d", got, n+1)
		}
		// Through a *sql.Conn, which may be inside a transaction begun with
		// SQL, the batch is one statement: all or none by itself, and no
		// transaction of PublishBatch's own commits the caller's.
		conn, err := db.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := conn.ExecContext(ctx, "BEGIN"); err != nil {
			t.Fatal(err)
		}
		if _, err := PublishBatch(ctx, conn, batch("d", n)...); err != nil {
			t.Fatalf("on a connection in a transaction: %v", err)
		}
		if _, err := PublishBatch(ctx, conn, dup...); !errors.Is(err, ErrDuplicateEvent) {
			t.Fatalf("on a connection: err = %v, want ErrDuplicateEvent", err)
		}
		if _, err := conn.ExecContext(ctx, "ROLLBACK"); err != nil {
			t.Fatal(err)
		}
		if got := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE id LIKE 'd-%' OR id LIKE 'b-%'`); got != 0 {
			t.Fatalf("%d events written through the rolled-back connection", got)
		}
		// Outside a transaction, the connection's batch is all or none too.
		if _, err := PublishBatch(ctx, conn, dup...); !errors.Is(err, ErrDuplicateEvent) {
			t.Fatalf("on an idle connection: err = %v, want ErrDuplicateEvent", err)
		}
		if got := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE id LIKE 'b-%'`); got != 0 {
			t.Fatalf("%d events of a refused batch written through an idle connection", got)
		}
		if _, err := PublishBatch(ctx, conn, batch("e", n)...); err != nil {
			t.Fatalf("on an idle connection: %v", err)
		}
		if got := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE id LIKE 'e-%'`); got != n {
			t.Fatalf("%d events written through an idle connection, want %d", got, n)
		}
		if _, err := PublishBatch(ctx, db, batch("c", MaxBatchEvents+1)...); !errors.Is(err, ErrInvalidEvent) {
			t.Fatalf("over MaxBatchEvents: err = %v, want ErrInvalidEvent", err)
		}
	})
}

// On PostgreSQL an ID that another transaction is inserting, not committed
// yet, is found only once part of a batch is written. PublishBatch rolls
// that part back (to its savepoint in the caller's transaction, which stays
// usable; its own transaction through a *sql.DB or an idle *sql.Conn) and
// returns ErrDuplicateEvent: nothing of the batch is written.
func TestPublishBatchMeetsAnIDBeingInserted(t *testing.T) {
	db := openPostgresTestDB(t)
	ctx := context.Background()
	for _, via := range []string{"db", "tx", "conn"} {
		other, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		raceID := "race-" + via
		if _, err := Publish(ctx, other, Event{ID: raceID, Type: "order.placed"}); err != nil {
			t.Fatal(err)
		}
		events := make([]Event, BatchStatementEvents+10)
		for i := range events {
			events[i] = Event{ID: fmt.Sprintf("%s-%03d", raceID, i), Type: "order.placed"}
		}
		events[BatchStatementEvents+5].ID = raceID // in the second statement
		var ex Execer = db
		var tx *sql.Tx
		switch via {
		case "tx":
			if tx, err = db.BeginTx(ctx, nil); err != nil {
				t.Fatal(err)
			}
			ex = tx
		case "conn":
			conn, err := db.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			ex = conn
		}
		errc := make(chan error, 1)
		go func() { _, err := PublishBatch(ctx, ex, events...); errc <- err }()
		// The batch's insert waits for the other transaction's row lock.
		for deadline := time.Now().Add(30 * time.Second); ; {
			if countRows(t, db, `SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()
  AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO webhook_outbox%'`) > 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the batch never waited for the other transaction")
			}
			time.Sleep(time.Millisecond)
		}
		if err := other.Commit(); err != nil {
			t.Fatal(err)
		}
		err = <-errc
		if tx != nil {
			// The caller's transaction goes on: nothing of the batch in it.
			var inTx int
			qerr := tx.QueryRow(`SELECT COUNT(*) FROM webhook_outbox WHERE id LIKE $1`, raceID+"-%").Scan(&inTx)
			if cerr := tx.Commit(); qerr != nil || cerr != nil {
				t.Fatalf("the caller's transaction after the batch: %v, %v", qerr, cerr)
			}
			if inTx != 0 {
				t.Fatalf("%d events of the batch in the caller's transaction", inTx)
			}
		}
		if !errors.Is(err, ErrDuplicateEvent) {
			t.Fatalf("through %s: err = %v, want ErrDuplicateEvent", via, err)
		}
		if got := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE id LIKE $1`, raceID+"-%"); got != 0 {
			t.Fatalf("through %s: %d events of the batch written", via, got)
		}
		if got := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE id = $1`, raceID); got != 1 {
			t.Fatalf("%d rows of the other transaction's event, want 1", got)
		}
	}
}

func TestPublishIDsSortByTime(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		db := openTestDB(t)
		prev := ""
		for i := 0; i < 100; i++ {
			id, err := Publish(context.Background(), db, Event{Type: "a.b"})
			if err != nil {
				t.Fatal(err)
			}
			if id <= prev {
				t.Fatalf("ID %s does not sort after %s", id, prev)
			}
			prev = id
		}
	})
}
