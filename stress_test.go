package webhooks

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outboxhook/webhooks/store/sqlite"
)

// stressLogSink collects the warnings and errors a dispatcher logs, so a test
// can fail on any of them (a "database is locked" is logged, not returned).
type stressLogSink struct {
	mu    sync.Mutex
	lines []string
}

func (s *stressLogSink) logger() *slog.Logger { return slog.New(s) }

func (s *stressLogSink) Enabled(context.Context, slog.Level) bool { return true }

func (s *stressLogSink) Handle(_ context.Context, r slog.Record) error {
	if r.Level < slog.LevelWarn {
		return nil
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s", r.Level, r.Message)
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value.Any())
		return true
	})
	s.mu.Lock()
	s.lines = append(s.lines, b.String())
	s.mu.Unlock()
	return nil
}

func (s *stressLogSink) WithAttrs([]slog.Attr) slog.Handler { return s }
func (s *stressLogSink) WithGroup(string) slog.Handler      { return s }

// requireQuiet fails the test if the dispatcher logged a warning or an error.
func (s *stressLogSink) requireQuiet(t *testing.T) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range s.lines {
		t.Errorf("dispatcher logged: %s", l)
	}
}

// stressEventIDs returns the event IDs of the deliveries in state.
func stressEventIDs(t *testing.T, db *sql.DB, state DeliveryState) map[string]bool {
	t.Helper()
	return stressIDs(t, db, `SELECT event_id FROM webhook_deliveries WHERE state = $1`, string(state))
}

// stressUnexpanded returns the IDs of the events not expanded yet.
func stressUnexpanded(t *testing.T, db *sql.DB) map[string]bool {
	t.Helper()
	return stressIDs(t, db, `SELECT id FROM webhook_outbox WHERE expanded_at IS NULL`)
}

// stressIDs returns the IDs a query selects, as a set.
func stressIDs(t *testing.T, db *sql.DB, query string, args ...any) map[string]bool {
	t.Helper()
	rows, err := db.Query(query, args...)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]bool{}
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		out[id] = true
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// stressPublish publishes n events of type typ for tenant in committed
// batches and returns their IDs.
func stressPublish(t *testing.T, db *sql.DB, tenant, typ string, n int) []string {
	t.Helper()
	var ids []string
	for len(ids) < n {
		events := make([]Event, min(250, n-len(ids)))
		for i := range events {
			events[i] = Event{Type: typ, Tenant: tenant, Data: map[string]int{"n": len(ids) + i}}
		}
		got, err := PublishBatch(context.Background(), db, events...)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, got...)
	}
	return ids
}

// Settings shared by the crashing child process and the parent's dispatcher.
const (
	crashChildEnv       = "OUTBOXHOOK_CRASH_CHILD"
	crashDBEnv          = "OUTBOXHOOK_CRASH_DB"
	crashURLEnv         = "OUTBOXHOOK_CRASH_RECEIVER_URL"
	crashPerSubEnv      = "OUTBOXHOOK_CRASH_PER_SUB"
	crashUAChild        = "outboxhook-crash-child"
	crashUARestarted    = "outboxhook-crash-restarted"
	crashRequestTimeout = 5 * time.Second
	crashLease          = 10 * time.Second
)

func crashConfig(ua string, perSub int, clock Clock, logger *slog.Logger) Config {
	return Config{
		PollInterval:               5 * time.Millisecond,
		Concurrency:                32,
		MaxInFlightPerSubscription: perSub,
		RequestTimeout:             crashRequestTimeout,
		LeaseDuration:              crashLease,
		UserAgent:                  ua,
		Clock:                      clock,
		Logger:                     logger,
	}
}

// TestCrashHelperProcess is the dispatcher process that
// TestCrashedDispatcherLosesNothing kills. It does nothing unless started by
// that test.
func TestCrashHelperProcess(t *testing.T) {
	if os.Getenv(crashChildEnv) != "1" {
		return
	}
	// Bounds the life of an orphan should the parent die without killing it.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	db, err := sqlite.Open(ctx, os.Getenv(crashDBEnv))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRowContext(ctx, `SELECT COUNT(*) FROM webhook_subscriptions WHERE url = $1`, os.Getenv(crashURLEnv)).Scan(&n); err != nil || n != 1 {
		t.Fatalf("child sees %d subscriptions to the receiver (err %v)", n, err)
	}
	perSub, err := strconv.Atoi(os.Getenv(crashPerSubEnv))
	if err != nil {
		t.Fatal(err)
	}
	d, err := NewDispatcher(db, allowLoopback(crashConfig(crashUAChild, perSub, nil, nil)))
	if err != nil {
		t.Fatal(err)
	}
	err = d.Run(ctx)
	t.Fatalf("the child's dispatcher returned (%v) instead of being killed", err)
}

// TestCrashedDispatcherLosesNothing kills (SIGKILL) a dispatcher process in
// the middle of 1,000 deliveries, with requests in flight, and starts a new
// dispatcher on the same database file: every event is delivered, and the
// only duplicates are deliveries the dead process had claimed, or started
// from events it held unexpanded, and not recorded.
//
// With perSub=8 the subscription's cap binds: the requests in flight at the
// kill are claimed rows ('delivering'). With perSub=32 (= Concurrency) they
// were started straight from the outbox (direct expansion): their events
// are unexpanded at the kill.
func TestCrashedDispatcherLosesNothing(t *testing.T) {
	for _, perSub := range []int{8, 32} {
		t.Run(fmt.Sprintf("perSub=%d", perSub), func(t *testing.T) { testCrashedDispatcher(t, perSub) })
	}
}

func testCrashedDispatcher(t *testing.T, crashPerSub int) {
	const total, answeredBeforeHold = 1000, 300
	path := filepath.Join(t.TempDir(), "crash.db")
	db := openTestDBAt(t, path)
	subs := newTestSubscriptions(t, db, nil)

	var (
		mu         sync.Mutex
		arrivals   = map[string]int{} // requests per event ID, both processes
		childSeen  = map[string]bool{}
		held       []string // the child's requests held open until after the kill
		unexpected []string
	)
	release := make(chan struct{})
	var releaseOnce sync.Once
	releaseHeld := func() { releaseOnce.Do(func() { close(release) }) }
	heldFull := make(chan struct{})
	restarted := make(chan string, 4*total)
	rc := newReceiver(t, func(_ int, _ http.ResponseWriter, r *http.Request) int {
		id := r.Header.Get(HeaderWebhookID)
		mu.Lock()
		arrivals[id]++
		switch r.UserAgent() {
		case crashUAChild:
			childSeen[id] = true
			if len(childSeen) <= answeredBeforeHold {
				mu.Unlock()
				return http.StatusOK
			}
			// From now on the child's requests stay open: they are in
			// flight when it is killed.
			held = append(held, id)
			if len(held) == crashPerSub {
				close(heldFull)
			}
			mu.Unlock()
			<-release
			return http.StatusOK
		case crashUARestarted:
			mu.Unlock()
			select {
			case restarted <- id:
			default: // more requests than events: the checks below report it
			}
			return http.StatusOK
		default:
			unexpected = append(unexpected, r.UserAgent())
			mu.Unlock()
			return http.StatusBadRequest
		}
	})
	t.Cleanup(releaseHeld) // runs before the server's Close, which waits for handlers
	mustSubscribe(t, subs, rc, "", "order.*")
	ids := stressPublish(t, db, "", "order.created", total)

	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashChildEnv+"=1", crashDBEnv+"="+path, crashURLEnv+"="+rc.URL(),
		crashPerSubEnv+"="+strconv.Itoa(crashPerSub))
	var childOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &childOut, &childOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	childDone := make(chan struct{})
	var childErr error
	go func() { childErr = cmd.Wait(); close(childDone) }()
	kill := func() {
		_ = cmd.Process.Kill() // SIGKILL: no Shutdown, no deferred code
		<-childDone
	}
	t.Cleanup(kill)

	hangGuard := time.NewTimer(60 * time.Second)
	defer hangGuard.Stop()
	select {
	case <-heldFull:
	case <-childDone:
		t.Fatalf("the child exited before it was killed: %v\n%s", childErr, childOut.String())
	case <-hangGuard.C:
		mu.Lock()
		n := len(childSeen)
		mu.Unlock()
		t.Fatalf("the child made %d deliveries and %d open requests before the deadline\n%s", n, crashPerSub, childOut.String())
	}
	kill()
	if cmd.ProcessState.Exited() {
		t.Fatalf("the child exited (%v) instead of being killed\n%s", cmd.ProcessState, childOut.String())
	}

	// What the dead process left behind.
	deliveringAtKill := stressEventIDs(t, db, DeliveryDelivering)
	succeededAtKill := stressEventIDs(t, db, DeliverySucceeded)
	mu.Lock()
	heldIDs := append([]string(nil), held...)
	seenByChild := len(childSeen)
	mu.Unlock()
	t.Logf("at the kill: %d events reached the receiver, %d requests open; deliveries: %d succeeded, %d delivering, %d other, %d events not expanded",
		seenByChild, len(heldIDs), len(succeededAtKill), len(deliveringAtKill),
		countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state NOT IN ('succeeded', 'delivering')`),
		countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE expanded_at IS NULL`))
	if len(succeededAtKill) == 0 {
		t.Fatal("the child recorded no delivery before it was killed")
	}
	// What the dead process may have sent without recording it: claimed
	// deliveries, and the events it held unexpanded.
	unrecordedAtKill := maps.Clone(deliveringAtKill)
	unexpandedAtKill := stressUnexpanded(t, db)
	maps.Copy(unrecordedAtKill, unexpandedAtKill)
	direct := directExpansion(t, db) && crashPerSub == 32
	for _, id := range heldIDs {
		switch {
		case direct && !unexpandedAtKill[id]:
			t.Errorf("event %s was in flight when the child died, started from the outbox, but is not unexpanded", id)
		case !direct && !deliveringAtKill[id]:
			t.Errorf("event %s was in flight when the child died but its delivery is not 'delivering'", id)
		}
	}
	releaseHeld() // the dead child never reads these answers

	// A new dispatcher whose clock is past the dead process's leases (set
	// with the real clock), but within the receiver's 5 min timestamp
	// tolerance, so signatures still verify against the real clock.
	clock := newFakeClock()
	clock.Advance(crashLease + time.Minute)
	logs := &stressLogSink{}
	_, stop := startDispatcher(t, db, crashConfig(crashUARestarted, crashPerSub, clock, logs.logger()))
	remaining := map[string]bool{}
	for _, id := range ids {
		if !succeededAtKill[id] {
			remaining[id] = true
		}
	}
	for len(remaining) > 0 {
		select {
		case id := <-restarted:
			delete(remaining, id)
		case <-hangGuard.C:
			t.Fatalf("%d undelivered events still missing after the restart when the deadline passed", len(remaining))
		}
	}
	stop() // records what is in flight
	logs.requireQuiet(t)

	if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries`); n != total {
		t.Errorf("%d deliveries, want %d", n, total)
	}
	if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'succeeded'`); n != total {
		t.Errorf("%d deliveries succeeded, want all %d", n, total)
	}
	mu.Lock()
	unexpectedUA := append([]string(nil), unexpected...)
	received := make(map[string]int, len(arrivals))
	for id, n := range arrivals {
		received[id] = n
	}
	mu.Unlock()
	if len(unexpectedUA) > 0 {
		t.Errorf("requests from unexpected user agents: %q", unexpectedUA)
	}
	published := map[string]bool{}
	for _, id := range ids {
		published[id] = true
		if received[id] == 0 {
			t.Errorf("event %s was never delivered", id)
		}
	}
	dupIDs, extra, requests := 0, 0, 0
	for id, n := range received {
		requests += n
		if !published[id] {
			t.Errorf("received unknown event ID %q", id)
		}
		if n > 1 {
			dupIDs++
			extra += n - 1
			if !unrecordedAtKill[id] {
				t.Errorf("event %s received %d times, but the child had not left its delivery claimed or its event unexpanded", id, n)
			}
		}
	}
	if extra > len(unrecordedAtKill) {
		t.Errorf("%d duplicate requests, more than the %d deliveries claimed or events unexpanded at the kill", extra, len(unrecordedAtKill))
	}
	for _, id := range heldIDs {
		if received[id] < 2 {
			t.Errorf("event %s, in flight at the kill, was not delivered again", id)
		}
	}
	t.Logf("%d requests for %d events: %d events received twice (bound: %d claimed or unexpanded at the kill)",
		requests, total, dupIDs, len(unrecordedAtKill))
	rc.wait(requests) // every request, the child's too, verified with the reference library
}

// TestNoDatabaseLockedUnderConcurrentPublish runs 8 goroutines of 1,000
// application transactions each (read, insert a business row, Publish,
// commit) on the database handle store/sqlite.Open returns, while the
// dispatcher delivers on the same handle: no transaction fails and the
// dispatcher logs no error; then every event arrives.
func TestNoDatabaseLockedUnderConcurrentPublish(t *testing.T) {
	const publishers, perPublisher = 8, 1000
	ctx := context.Background()
	db := openTestDB(t)
	if _, err := db.ExecContext(ctx, `CREATE TABLE orders (id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, total INTEGER NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	subs := newTestSubscriptions(t, db, nil)
	rc := newReceiver(t, nil)
	var secrets []string
	for p := 0; p < publishers; p++ {
		sub := mustSubscribe(t, subs, rc, fmt.Sprintf("tenant-%d", p), "order.*")
		secrets = append(secrets, sub.Secret)
	}
	rc.setSecrets(secrets...)
	logs := &stressLogSink{}
	d, stop := startDispatcher(t, db, Config{Logger: logs.logger()})

	// placeOrder is an application transaction: it reads first, then
	// writes, the pattern that fails with SQLITE_BUSY without waiting in a
	// deferred transaction.
	placeOrder := func(tenant string, total int) (eventID string, err error) {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return "", fmt.Errorf("begin: %w", err)
		}
		defer func() {
			if err != nil {
				_ = tx.Rollback()
			}
		}()
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM orders WHERE tenant = $1`, tenant).Scan(&n); err != nil {
			return "", fmt.Errorf("read orders: %w", err)
		}
		res, err := tx.ExecContext(ctx, `INSERT INTO orders (tenant, total) VALUES ($1, $2)`, tenant, total)
		if err != nil {
			return "", fmt.Errorf("insert order: %w", err)
		}
		orderID, err := res.LastInsertId()
		if err != nil {
			return "", err
		}
		eventID, err = Publish(ctx, tx, Event{Type: "order.created", Tenant: tenant,
			Data: map[string]any{"orderId": orderID, "total": total, "nth": n + 1}})
		if err != nil {
			return "", err
		}
		if err := tx.Commit(); err != nil {
			return "", fmt.Errorf("commit: %w", err)
		}
		return eventID, nil
	}

	began := time.Now()
	ids := make([][]string, publishers)
	errs := make(chan error, publishers)
	var wg sync.WaitGroup
	for p := 0; p < publishers; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tenant := fmt.Sprintf("tenant-%d", p)
			for i := 0; i < perPublisher; i++ {
				id, err := placeOrder(tenant, 100*p+i)
				if err != nil {
					errs <- fmt.Errorf("%s, transaction %d: %w", tenant, i, err)
					return
				}
				ids[p] = append(ids[p], id)
				d.Notify()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		logs.requireQuiet(t)
		t.FailNow()
	}
	t.Logf("%d transactions committed in %v", publishers*perPublisher, time.Since(began))

	got := rc.wait(publishers * perPublisher)
	t.Logf("all %d events received %v after the first transaction began", len(got), time.Since(began))
	stop()
	logs.requireQuiet(t)

	want := map[string]bool{}
	for _, p := range ids {
		for _, id := range p {
			want[id] = true
		}
	}
	orders := map[int64][2]any{} // order ID -> tenant, total
	rows, err := db.Query(`SELECT id, tenant, total FROM orders`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id int64
		var tenant string
		var total int
		if err := rows.Scan(&id, &tenant, &total); err != nil {
			t.Fatal(err)
		}
		orders[id] = [2]any{tenant, total}
	}
	if err := rows.Close(); err != nil {
		t.Fatal(err)
	}
	if len(orders) != publishers*perPublisher || len(want) != publishers*perPublisher {
		t.Fatalf("%d orders and %d events, want %d of each", len(orders), len(want), publishers*perPublisher)
	}
	seen := map[string]bool{}
	for _, r := range got {
		if seen[r.ID] {
			t.Errorf("event %s received twice", r.ID)
		}
		seen[r.ID] = true
		if !want[r.ID] {
			t.Errorf("received unknown event %s", r.ID)
			continue
		}
		var env struct {
			Data struct {
				OrderID int64 `json:"orderId"`
				Total   int   `json:"total"`
			} `json:"data"`
		}
		if err := json.Unmarshal(r.Body, &env); err != nil {
			t.Fatalf("body %s: %v", r.Body, err)
		}
		if o, ok := orders[env.Data.OrderID]; !ok || o[1] != env.Data.Total {
			t.Errorf("event %s carries order %d (total %d), which does not match the committed orders", r.ID, env.Data.OrderID, env.Data.Total)
		}
	}
	if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'succeeded'`); n != publishers*perPublisher {
		t.Errorf("%d deliveries succeeded, want %d", n, publishers*perPublisher)
	}
}

// TestHangingEndpointDoesNotBlockOthers: an endpoint that never answers holds
// at most MaxInFlightPerSubscription requests, and every event still reaches
// the other subscription meanwhile.
func TestHangingEndpointDoesNotBlockOthers(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		const events, perSub = 200, 4
		db := openTestDB(t)
		subs := newTestSubscriptions(t, db, nil)

		var mu sync.Mutex
		open, maxOpen, arrived := 0, 0, 0
		release := make(chan struct{})
		var releaseOnce sync.Once
		releaseHanging := func() { releaseOnce.Do(func() { close(release) }) }
		full := make(chan struct{})
		overCap := make(chan struct{}) // closed when the hanging endpoint has too many requests open
		normal := newReceiver(t, nil)
		hanging := newReceiver(t, func(_ int, _ http.ResponseWriter, r *http.Request) int {
			mu.Lock()
			open++
			arrived++
			if open > perSub && maxOpen <= perSub {
				close(overCap)
			}
			maxOpen = max(maxOpen, open)
			if arrived == perSub {
				close(full)
			}
			mu.Unlock()
			<-release // hangs until the test lets go
			mu.Lock()
			open--
			mu.Unlock()
			return http.StatusOK
		})
		mustSubscribe(t, subs, normal, "acme", "*")
		mustSubscribe(t, subs, hanging, "acme", "*")
		logs := &stressLogSink{}
		_, stop := startDispatcher(t, db, Config{
			Concurrency: 16, MaxInFlightPerSubscription: perSub,
			RequestTimeout: time.Minute, // the hanging requests never time out here
			Logger:         logs.logger(),
		})
		t.Cleanup(releaseHanging) // before stop: Shutdown waits for requests in flight

		ids := stressPublish(t, db, "acme", "order.created", events)
		want := map[string]bool{}
		for _, id := range ids {
			want[id] = true
		}
		hangGuard := time.NewTimer(60 * time.Second)
		defer hangGuard.Stop()
		for len(want) > 0 {
			select {
			case r := <-normal.ch:
				if r.VerifyErr != nil {
					t.Errorf("request %s failed Standard Webhooks verification: %v", r.ID, r.VerifyErr)
				}
				if !want[r.ID] {
					t.Fatalf("the normal endpoint received %s twice or unknown", r.ID)
				}
				delete(want, r.ID)
			case <-overCap:
				t.Fatalf("the hanging endpoint has more than MaxInFlightPerSubscription (%d) requests open", perSub)
			case <-hangGuard.C:
				t.Fatalf("%d of %d events reached the normal endpoint before the deadline", events-len(want), events)
			}
		}
		select {
		case <-full:
		case <-hangGuard.C:
			t.Fatal("the hanging endpoint never had MaxInFlightPerSubscription requests open")
		}
		mu.Lock()
		if open != perSub || arrived != perSub {
			t.Errorf("after all %d events reached the normal endpoint, the hanging one has %d requests open of %d received; want %d and %d",
				events, open, arrived, perSub, perSub)
		}
		mu.Unlock()
		claimed := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries d JOIN webhook_subscriptions s ON s.id = d.subscription_id
			WHERE s.url = $1 AND d.state = 'delivering'`, hanging.URL())
		if directExpansion(t, db) {
			// The hanging requests were started straight from the outbox:
			// their events stay unexpanded until they end, and nothing
			// else of the hanging endpoint's is claimed.
			if claimed != 0 {
				t.Errorf("%d deliveries to the hanging endpoint are claimed, want none", claimed)
			}
			if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE expanded_at IS NULL`); n < perSub {
				t.Errorf("%d events unexpanded, want at least the %d whose requests hang", n, perSub)
			}
		} else if claimed != perSub {
			t.Errorf("%d deliveries to the hanging endpoint are claimed, want %d", claimed, perSub)
		}

		releaseHanging()
		hanging.wait(events) // now it recovers and gets everything
		stop()
		logs.requireQuiet(t)
		mu.Lock()
		if maxOpen > perSub {
			t.Errorf("the hanging endpoint had %d requests open at once, more than MaxInFlightPerSubscription %d", maxOpen, perSub)
		}
		mu.Unlock()
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'succeeded'`); n != 2*events {
			t.Errorf("%d deliveries succeeded, want %d", n, 2*events)
		}
	})
}

// TestRetriesDoNotStarveFirstAttempts: a subscription with a large backlog of
// due retries, older than any new event, does not keep new events of another
// subscription waiting until the backlog is worked off, even when it may take
// every delivery slot (MaxInFlightPerSubscription = Concurrency). Were due
// deliveries claimed in next_at order across first attempts and retries, the
// whole old backlog would be attempted before the first new event.
func TestRetriesDoNotStarveFirstAttempts(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		const backlog, fresh, slots = 200, 20, 4
		const uaBacklog, uaTest = "outboxhook-backlog", "outboxhook-test"
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)

		var mu sync.Mutex
		tried := map[string]bool{} // backlog events attempted while building it
		retriesAfter := 0          // failing endpoint's requests in the tested phase
		allTried := make(chan struct{})
		drained := make(chan struct{})
		failing := newReceiver(t, func(_ int, _ http.ResponseWriter, r *http.Request) int {
			mu.Lock()
			defer mu.Unlock()
			switch r.UserAgent() {
			case uaBacklog:
				if id := r.Header.Get(HeaderWebhookID); !tried[id] {
					if tried[id] = true; len(tried) == backlog {
						close(allTried)
					}
				}
			case uaTest:
				if retriesAfter++; retriesAfter == backlog {
					close(drained)
				}
			}
			return http.StatusInternalServerError
		})
		release := make(chan struct{})
		var releaseOnce sync.Once
		releaseNew := func() { releaseOnce.Do(func() { close(release) }) }
		open, snapped := 0, false
		snapshot := make(chan int, 1) // retriesAfter when the new events held every slot
		normal := newReceiver(t, func(_ int, _ http.ResponseWriter, r *http.Request) int {
			mu.Lock()
			if open++; open == slots && !snapped {
				snapped = true
				snapshot <- retriesAfter
			}
			mu.Unlock()
			<-release // held open, so the retry count at the snapshot cannot move
			mu.Lock()
			open--
			mu.Unlock()
			return http.StatusOK
		})
		failingSub := mustSubscribe(t, subs, failing, "r", "*")
		mustSubscribe(t, subs, normal, "n", "*")
		cfg := func(ua string, retry RetryPolicy, logger *slog.Logger) Config {
			return Config{
				Clock: clock, Concurrency: slots, MaxInFlightPerSubscription: slots,
				RequestTimeout: time.Minute, RetryPolicy: retry,
				UserAgent: ua, Logger: logger,
			}
		}

		// The backlog: every delivery to the failing endpoint attempted once
		// and due again at t0 (one second later, which the standing clock does
		// not reach while the backlog is built).
		t0 := clock.Now().Add(time.Second).UnixMilli()
		stressPublish(t, db, "r", "order.created", backlog)
		logs := &stressLogSink{}
		_, stopBacklog := startDispatcher(t, db, cfg(uaBacklog, stressFixedRetry{time.Second}, logs.logger()))
		select {
		case <-allTried:
		case <-time.After(60 * time.Second):
			t.Fatal("the backlog was not built before the deadline")
		}
		stopBacklog()
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries
			WHERE subscription_id = $1 AND state = 'pending' AND attempts = 1 AND next_at = $2`, failingSub.ID, t0); n != backlog {
			t.Fatalf("backlog of %d due retries, want %d", n, backlog)
		}

		// New events a minute later, so every retry of the backlog is due and
		// older; from now on failed attempts are retried at once, so the
		// failing endpoint always has due retries.
		clock.Advance(time.Minute)
		stressPublish(t, db, "n", "order.created", fresh)
		_, stop := startDispatcher(t, db, cfg(uaTest, immediateRetry{max: 1 << 30}, logs.logger()))
		t.Cleanup(releaseNew) // before stop: Shutdown waits for requests in flight

		var retriesBefore int
		select {
		case retriesBefore = <-snapshot:
		case <-drained:
			t.Fatalf("the whole backlog of %d old retries was attempted before the new events got %d slots", backlog, slots)
		case <-time.After(60 * time.Second):
			t.Fatalf("the new events did not get %d slots before the deadline", slots)
		}
		// While the new events hold every slot nothing else is claimed, so the
		// database shows the same: most of the old backlog is still due.
		oldDue := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries
			WHERE subscription_id = $1 AND state = 'pending' AND next_at = $2`, failingSub.ID, t0)
		t.Logf("new events held all %d slots after %d retries; %d of %d old retries still due", slots, retriesBefore, oldDue, backlog)
		// Slots are shared between the lanes: retries get about as many as
		// first attempts while both have work (3*slots leaves room for any
		// fair alternation).
		if retriesBefore > 3*slots {
			t.Errorf("%d retries were attempted before %d first attempts were in flight", retriesBefore, slots)
		}
		if oldDue != backlog-retriesBefore {
			t.Errorf("%d old retries still due, want %d - %d attempted", oldDue, backlog, retriesBefore)
		}

		releaseNew()
		normal.wait(fresh)
		stop()
		logs.requireQuiet(t)
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE subscription_id <> $1 AND state = 'succeeded'`, failingSub.ID); n != fresh {
			t.Errorf("%d new events delivered, want %d", n, fresh)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE subscription_id = $1 AND state IN ('pending', 'delivering')`, failingSub.ID); n != backlog {
			t.Errorf("%d deliveries to the failing endpoint still retrying, want %d", n, backlog)
		}
	})
}

// stressFixedRetry retries every failed attempt after the same delay.
type stressFixedRetry struct{ delay time.Duration }

func (p stressFixedRetry) NextAttempt(FailedAttempt) (time.Duration, bool) { return p.delay, true }

// TestFirstAttemptsDoNotStarveRetries is the converse of
// TestRetriesDoNotStarveFirstAttempts: a due retry is not kept waiting until a
// backlog of first attempts is worked off. With Concurrency 1 every claim has
// one free slot, which makes the claims, and so the test, deterministic.
func TestFirstAttemptsDoNotStarveRetries(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		const fresh = 50
		const uaBacklog, uaTest = "outboxhook-backlog", "outboxhook-test"
		db := openTestDB(t)
		clock := newFakeClock()
		subs := newTestSubscriptions(t, db, clock)

		var mu sync.Mutex
		firstBefore := -1 // first attempts made before the retry
		firsts := 0
		retried := make(chan struct{})
		failed := make(chan struct{})
		retrying := newReceiver(t, func(_ int, _ http.ResponseWriter, r *http.Request) int {
			mu.Lock()
			defer mu.Unlock()
			if r.UserAgent() == uaBacklog {
				close(failed)
				return http.StatusInternalServerError
			}
			if firstBefore < 0 {
				firstBefore = firsts
				close(retried)
			}
			return http.StatusOK
		})
		normal := newReceiver(t, func(int, http.ResponseWriter, *http.Request) int {
			mu.Lock()
			firsts++
			mu.Unlock()
			return http.StatusOK
		})
		retryingSub := mustSubscribe(t, subs, retrying, "r", "*")
		mustSubscribe(t, subs, normal, "n", "*")
		cfg := func(ua string, logger *slog.Logger) Config {
			return Config{
				Clock: clock, Concurrency: 1, RequestTimeout: time.Minute,
				RetryPolicy: stressFixedRetry{time.Second}, UserAgent: ua, Logger: logger,
			}
		}

		// One failed attempt, retried a second later, which the standing
		// clock does not reach yet.
		stressPublish(t, db, "r", "order.created", 1)
		logs := &stressLogSink{}
		_, stopBacklog := startDispatcher(t, db, cfg(uaBacklog, logs.logger()))
		select {
		case <-failed:
		case <-time.After(60 * time.Second):
			t.Fatal("no first attempt before the deadline")
		}
		stopBacklog()

		// A minute later the retry is due, and a backlog of first attempts
		// arrives.
		clock.Advance(time.Minute)
		stressPublish(t, db, "n", "order.created", fresh)
		_, stop := startDispatcher(t, db, cfg(uaTest, logs.logger()))
		select {
		case <-retried:
		case <-time.After(60 * time.Second):
			t.Fatal("the retry was not made before the deadline")
		}
		normal.wait(fresh)
		stop()
		logs.requireQuiet(t)
		mu.Lock()
		defer mu.Unlock()
		t.Logf("the due retry was made after %d of %d first attempts", firstBefore, fresh)
		if firstBefore > 2 {
			t.Errorf("the due retry waited for %d first attempts; with one slot the lanes should take turns", firstBefore)
		}
		if n := countRows(t, db, `SELECT COUNT(*) FROM webhook_deliveries WHERE subscription_id = $1 AND state = 'succeeded' AND attempts = 2`, retryingSub.ID); n != 1 {
			t.Errorf("the retried delivery is not recorded as succeeded on its second attempt")
		}
	})
}
