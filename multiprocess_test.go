//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

// This file needs flock(2) (see mpLockPostgresServer) and real process
// signals, hence the build constraint.

package webhooks

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"

	"github.com/outboxhook/webhooks/store/postgres"
)

// Multi-process and failure tests on PostgreSQL: several dispatcher
// processes sharing one database, one of them killed with SIGKILL, and the
// database server itself restarted mid-run. Each child dispatcher is this
// test binary run again as TestHelperDispatcherProcess.
//
// None of these tests is parallel: the restart test takes the shared test
// server down for a moment, and it also holds an exclusive flock that the
// PostgreSQL tests of other packages (examples/postgres) take shared, since
// `go test ./...` runs packages side by side.

// Environment of a child dispatcher process.
const (
	envHelperDispatcher     = "OUTBOXHOOK_HELPER_DISPATCHER" // "1": TestHelperDispatcherProcess runs
	envHelperDSN            = "OUTBOXHOOK_HELPER_DSN"
	envHelperIndex          = "OUTBOXHOOK_HELPER_INDEX"
	envHelperRequestTimeout = "OUTBOXHOOK_HELPER_REQUEST_TIMEOUT" // a time.Duration; empty: default
	envHelperLease          = "OUTBOXHOOK_HELPER_LEASE"           // a time.Duration; empty: default

	// envPostgresDataDir names the data directory of the server at
	// envPostgresDSN, for the restart test (.ci/start-postgres exports it).
	envPostgresDataDir = "OUTBOXHOOK_TEST_POSTGRES_DATADIR"

	// mpReadyLine is what a child prints on stdout once it dispatches.
	mpReadyLine = "outboxhook-helper: dispatching"

	// mpLockFileName is the flock file shared with examples/postgres's
	// tests: held exclusively while the test server is restarted, shared
	// by tests that need the server up throughout.
	mpLockFileName = "outboxhook-test-postgres.lock"

	// mpGuard bounds every wait of these tests. It is a hang guard, not a
	// timing assertion: runs normally finish far sooner.
	mpGuard = 5 * time.Minute
)

// mpUserAgent is the User-Agent of child dispatcher i, so the receiver can
// tell which process made each delivery.
func mpUserAgent(i int) string { return "outboxhook-test/dispatcher-" + strconv.Itoa(i) }

// TestHelperDispatcherProcess is not a test: it is the body of a child
// dispatcher process, and returns at once unless envHelperDispatcher is set.
// The child runs a Dispatcher on the database at envHelperDSN until its
// stdin closes (the parent closes it, or dies), then shuts down gracefully.
func TestHelperDispatcherProcess(t *testing.T) {
	if os.Getenv(envHelperDispatcher) != "1" {
		return
	}
	ctx := context.Background()
	index, err := strconv.Atoi(os.Getenv(envHelperIndex))
	if err != nil {
		t.Fatalf("%s: %v", envHelperIndex, err)
	}
	cfg := Config{
		UserAgent:       mpUserAgent(index),
		AllowedNetworks: loopbackNetworks, // the receivers are local
		Logger:          slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
	for env, dst := range map[string]*time.Duration{envHelperRequestTimeout: &cfg.RequestTimeout, envHelperLease: &cfg.LeaseDuration} {
		if s := os.Getenv(env); s != "" {
			if *dst, err = time.ParseDuration(s); err != nil {
				t.Fatalf("%s: %v", env, err)
			}
		}
	}
	db, err := postgres.Open(ctx, os.Getenv(envHelperDSN))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	d, err := NewDispatcher(db, allowLoopback(cfg))
	if err != nil {
		t.Fatal(err)
	}
	runErr := make(chan error, 1)
	go func() { runErr <- d.Run(ctx) }()
	stdinClosed := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(stdinClosed)
	}()
	fmt.Println(mpReadyLine)
	select {
	case <-stdinClosed:
	case err := <-runErr:
		t.Fatalf("Run returned before shutdown: %v", err)
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := d.Shutdown(sctx); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if err := <-runErr; !errors.Is(err, ErrDispatcherClosed) {
		t.Errorf("Run returned %v, want ErrDispatcherClosed", err)
	}
}

// TestThreeDispatcherProcessesDeliverEachOnce: three dispatcher processes on
// one database, 10,000 events to 3 subscriptions: all 30,000 deliveries
// made, each exactly once, and by all three processes.
func TestThreeDispatcherProcessesDeliverEachOnce(t *testing.T) {
	dsn := postgresDSN(t)
	const procs, events, subs = 3, 10000, 3
	begin := time.Now()
	env := mpNewEnv(t, dsn, subs)
	var ps []*mpProcess
	for i := 0; i < procs; i++ {
		ps = append(ps, mpStartProcess(t, env.childDSN, i))
	}
	for _, p := range ps {
		p.waitReady(t)
	}
	published := time.Now()
	ids := mpPublish(t, env.db, "", events)
	t.Logf("published %d events in %v", events, time.Since(published).Round(time.Millisecond))
	want := events * subs
	mpWait(t, fmt.Sprintf("all %d deliveries", want), env.rc.when(func(s *mpStats) bool { return s.unique == want }), env.rc, ps)
	elapsed := time.Since(published)
	for _, p := range ps {
		p.stop(t)
	}

	r := env.rc.result(ids, env.paths)
	r.check(t)
	if r.duplicates != 0 {
		t.Errorf("%d duplicate deliveries (%d keys), want 0 when nothing crashes: e.g. %v", r.duplicates, len(r.dupKeys), r.someDups(5))
	}
	sum := 0
	for i := 0; i < procs; i++ {
		n := r.byAgent[mpUserAgent(i)]
		if n == 0 {
			t.Errorf("dispatcher process %d made no delivery: %v", i, r.byAgent)
		}
		sum += n
	}
	if sum != r.total {
		t.Errorf("per-process counts %v add up to %d of %d requests", r.byAgent, sum, r.total)
	}
	states := mpStates(t, env.db)
	if states[string(DeliverySucceeded)] != want || len(states) != 1 {
		t.Errorf("delivery states %v, want all %d succeeded", states, want)
	}
	if n := countRows(t, env.db, `SELECT COUNT(*) FROM `+allAttempts); n != want {
		t.Errorf("%d attempts recorded, want %d (one per delivery)", n, want)
	}
	t.Logf("%d deliveries by %d processes in %v (%.0f/s end to end, race detector: %v); per process: %s; total %v",
		want, procs, elapsed.Round(time.Millisecond), float64(want)/elapsed.Seconds(), mpRace, r.agents(), time.Since(begin).Round(time.Millisecond))
}

// TestKilledDispatcherLosesNothing: of three dispatcher processes, one is
// killed with SIGKILL mid-run, with requests in flight (the receivers hold
// its requests unanswered just before). Every delivery is still made; the
// requests it had in flight are made again by the survivors, and the only
// duplicates are deliveries it had claimed at the kill.
//
// The victim runs with a short lease (RequestTimeout 2s, LeaseDuration 3s),
// the survivors with the defaults (15s + 30s). So the victim's claims lapse
// a few seconds after the kill and the survivors take them over: that wait
// is the behaviour under test, not a sleep for a result. (A fake clock
// offset in the survivors would also expire the survivors' own claims in
// flight, so it could not tell the victim's duplicates from theirs.) And
// since a claim stores next_at = now + lease and updated_at = now, every
// row in state 'delivering' at the kill tells whose claim it is:
// next_at - updated_at is 3000 ms for the victim's, 45000 ms for the
// survivors'.
func TestKilledDispatcherLosesNothing(t *testing.T) {
	dsn := postgresDSN(t)
	const procs, events, subs = 3, 10000, 3
	const victim = 0
	const victimTimeout, victimLease = 2 * time.Second, 3 * time.Second
	begin := time.Now()
	env := mpNewEnv(t, dsn, subs)
	var ps []*mpProcess
	for i := 0; i < procs; i++ {
		var extra []string
		if i == victim {
			extra = []string{envHelperRequestTimeout + "=" + victimTimeout.String(), envHelperLease + "=" + victimLease.String()}
		}
		ps = append(ps, mpStartProcess(t, env.childDSN, i, extra...))
	}
	for _, p := range ps {
		p.waitReady(t)
	}
	ids := mpPublish(t, env.db, "", events)
	want := events * subs

	// Kill the victim once the receivers have seen some thousands of
	// deliveries, some of them from the victim, and while it certainly has
	// deliveries in flight: the receivers hold its requests unanswered
	// from then on, and the kill comes once five of them arrived.
	victimUA := mpUserAgent(victim)
	mpWait(t, "3,000 deliveries, 100 of them by the victim", env.rc.when(func(s *mpStats) bool {
		return s.unique >= 3000 && s.byAgent[victimUA] >= 100
	}), env.rc, ps)
	release := env.rc.hold(t, victimUA)
	mpWait(t, "5 requests of the victim held", env.rc.when(func(s *mpStats) bool { return s.held >= 5 }), env.rc, ps)
	ps[victim].kill(t)
	release()
	survivors := append([]*mpProcess(nil), ps[victim+1:]...)

	// What was in state 'delivering' at the kill, and whose claim it was.
	subPath := map[string]string{}
	for path, id := range env.subIDs {
		subPath[id] = path
	}
	rows, err := env.db.Query(`SELECT event_id, subscription_id, next_at - updated_at FROM webhook_deliveries WHERE state = 'delivering'`)
	if err != nil {
		t.Fatal(err)
	}
	heldByVictim := map[mpKey]bool{}
	heldBySurvivors := 0
	for rows.Next() {
		var eventID, subID string
		var lease int64
		if err := rows.Scan(&eventID, &subID, &lease); err != nil {
			t.Fatal(err)
		}
		switch lease {
		case victimLease.Milliseconds():
			heldByVictim[mpKey{subPath[subID], eventID}] = true
		case (RequestTimeoutDefault + LeaseMarginDefault).Milliseconds():
			heldBySurvivors++
		default:
			t.Errorf("delivery of %s to %s claimed with a lease of %d ms: whose?", eventID, subID, lease)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	rows.Close()
	atKill := env.rc.stats()
	t.Logf("killed dispatcher %d after %d of %d deliveries (%d by it); at the kill %d deliveries were claimed by it, %d by the survivors",
		victim, atKill.unique, want, atKill.byAgent[victimUA], len(heldByVictim), heldBySurvivors)
	if atKill.unique == want {
		t.Fatalf("everything was delivered before the kill: the test proves nothing")
	}

	mpWait(t, fmt.Sprintf("all %d deliveries", want), env.rc.when(func(s *mpStats) bool { return s.unique == want }), env.rc, survivors)
	for _, p := range survivors {
		p.stop(t)
	}

	r := env.rc.result(ids, env.paths)
	r.check(t)
	for k, agents := range r.dupKeys {
		if !heldByVictim[k] {
			t.Errorf("delivery of %s to %s made %d times (by %v) but the killed process did not hold it", k.id, k.path, len(agents), agents)
		}
		fromVictim := false
		for _, a := range agents {
			fromVictim = fromVictim || a == victimUA
		}
		if !fromVictim {
			t.Errorf("delivery of %s to %s made %d times (by %v), none by the killed process", k.id, k.path, len(agents), agents)
		}
	}
	if r.duplicates > len(heldByVictim) {
		t.Errorf("%d duplicate deliveries, more than the %d the killed process held", r.duplicates, len(heldByVictim))
	}
	// The requests held unanswered reached the receiver, but the victim
	// never heard back: a survivor must have made each of them again.
	inFlight := env.rc.held()
	for _, k := range inFlight {
		if !heldByVictim[k] {
			t.Errorf("the killed process had the delivery of %s to %s in flight, but its claim was not in the database", k.id, k.path)
		}
		if len(r.dupKeys[k]) < 2 {
			t.Errorf("the killed process had the delivery of %s to %s in flight, but no survivor made it again", k.id, k.path)
		}
	}
	states := mpStates(t, env.db)
	if states[string(DeliverySucceeded)] != want || len(states) != 1 {
		t.Errorf("delivery states %v, want all %d succeeded", states, want)
	}
	t.Logf("all %d deliveries made; %d duplicates (at least the %d requests in flight at the kill, at most the %d deliveries it had claimed); per process: %s; total %v",
		want, r.duplicates, len(inFlight), len(heldByVictim), r.agents(), time.Since(begin).Round(time.Millisecond))
}

// TestPostgresRestartLosesNothing restarts the PostgreSQL server while an
// in-process dispatcher is delivering, then publishes more. Every event is
// delivered; the dispatcher logged the errors, paused with growing delays,
// reconnected and carried on.
//
// The restart is pg_ctl stop -m fast (which ends every connection), then,
// once the dispatcher has logged three failed attempts against the stopped
// server, pg_ctl start. A plain pg_ctl restart is the same with an outage
// of a few hundred milliseconds, too short to see the pauses grow.
func TestPostgresRestartLosesNothing(t *testing.T) {
	postgresDSN(t)
	dataDir := os.Getenv(envPostgresDataDir)
	if dataDir == "" {
		if os.Getenv(envRequirePostgres) != "" {
			t.Fatalf("%s is set but %s is empty: the PostgreSQL restart test cannot run", envRequirePostgres, envPostgresDataDir)
		}
		t.Skipf("PostgreSQL restart test skipped: set %s to the data directory of the server at %s (.ci/start-postgres prints it)",
			envPostgresDataDir, envPostgresDSN)
	}
	mpLockPostgresServer(t, true)
	pgctl := mpPgCtl(t, dataDir)
	begin := time.Now()

	db := openPostgresTestDB(t)
	var serverDir string
	if err := db.QueryRow(`SHOW data_directory`).Scan(&serverDir); err != nil {
		t.Fatal(err)
	}
	if !mpSameDir(serverDir, dataDir) {
		t.Fatalf("%s is %s but the server at %s has its data in %s", envPostgresDataDir, dataDir, envPostgresDSN, serverDir)
	}
	rc := mpNewReceiver(t)
	subs := newTestSubscriptions(t, db, nil)
	sub, err := subs.Create(context.Background(), Subscription{URL: rc.srv.URL + "/restart", EventTypes: []string{"*"}})
	if err != nil {
		t.Fatal(err)
	}
	rc.addPath("/restart", sub.Secret)

	// The dispatcher's logs, watched for its database errors.
	const errorsWhileDown = 3
	errorLine := regexp.MustCompile(`level=ERROR msg="webhooks: dispatcher: [^"]*"`)
	var errMu sync.Mutex
	var errorLines []string
	var threeErrors chan struct{} // closed at the third error while armed
	logs := &mpBuffer{onLine: func(line string) {
		if !errorLine.MatchString(line) {
			return
		}
		errMu.Lock()
		defer errMu.Unlock()
		errorLines = append(errorLines, line)
		if threeErrors != nil && len(errorLines) >= errorsWhileDown {
			close(threeErrors)
			threeErrors = nil
		}
	}}
	const concurrency = 16
	_, stop := startDispatcher(t, db, Config{
		PollInterval: PollIntervalDefault,
		Concurrency:  concurrency,
		// A claim whose commit the dying server acknowledged too late is
		// taken again after its lease; keep that wait short.
		RequestTimeout: 2 * time.Second,
		LeaseDuration:  10 * time.Second,
		Logger:         slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})),
	})
	// Registered last so it runs first: the server is up again before the
	// dispatcher stops and the schema is dropped, whatever happened.
	t.Cleanup(func() { pgctl.ensureRunning(t) })

	const before, after = 3000, 1000
	ids := mpPublish(t, db, "evt_before_", before)
	mpWait(t, "500 deliveries", rc.when(func(s *mpStats) bool { return s.unique >= 500 }), rc, nil)

	atStop := rc.stats().unique
	errMu.Lock()
	if len(errorLines) > 0 {
		errMu.Unlock()
		t.Fatalf("database errors before the restart: %v", errorLines)
	}
	down := make(chan struct{})
	threeErrors = down
	errMu.Unlock()
	stopBegin := time.Now()
	pgctl.run(t, "stop")
	stopped := time.Now()
	mpWait(t, "the dispatcher to log 3 database errors", down, rc, nil)
	outage := time.Since(stopped)
	pgctl.run(t, "start")
	restartTook := time.Since(stopBegin)
	atStart := rc.stats().unique
	t.Logf("stopped PostgreSQL after %d of %d deliveries; started it again %v later (%v in all), %d deliveries made by then",
		atStop, before, outage.Round(time.Millisecond), restartTook.Round(time.Millisecond), atStart)
	if atStart == before {
		t.Errorf("every event was delivered before the restart: it proves nothing")
	}

	// The application publishes again, over the same pool (whose
	// connections the restart ended), retrying as an application would.
	ids = append(ids, mpPublish(t, db, "evt_after_", after)...)
	want := before + after
	mpWait(t, fmt.Sprintf("all %d deliveries", want), rc.when(func(s *mpStats) bool { return s.unique == want }), rc, nil)
	stop()

	r := rc.result(ids, []string{"/restart"})
	r.check(t)
	if r.duplicates > concurrency {
		t.Errorf("%d duplicate deliveries; at most the %d in flight at the restart may be repeated", r.duplicates, concurrency)
	}
	states := mpStates(t, db)
	if states[string(DeliverySucceeded)] != want || len(states) != 1 {
		t.Errorf("delivery states %v, want all %d succeeded", states, want)
	}
	text := logs.String()
	if !strings.Contains(text, "listening for new events failed") {
		t.Errorf("the dispatcher did not log losing its LISTEN connection; logs:\n%s", mpTail(text, 4000))
	}
	errMu.Lock()
	lines := append([]string(nil), errorLines...)
	errMu.Unlock()
	var pauses []time.Duration
	for _, line := range lines {
		if m := regexp.MustCompile(`retry_in=(\S+)`).FindStringSubmatch(line); m != nil {
			d, err := time.ParseDuration(m[1])
			if err != nil {
				t.Fatalf("log line %q: %v", line, err)
			}
			pauses = append(pauses, d)
		}
	}
	if len(pauses) < errorsWhileDown {
		t.Fatalf("%d pauses logged, want %d or more; logs:\n%s", len(pauses), errorsWhileDown, mpTail(text, 4000))
	}
	for i := 1; i < errorsWhileDown; i++ {
		if pauses[i] <= pauses[i-1] {
			t.Errorf("pauses after consecutive errors %v do not grow", pauses[:errorsWhileDown])
		}
	}
	t.Logf("%d deliveries made, %d duplicates; %d database errors logged, pausing %v; total %v",
		want, r.duplicates, len(lines), pauses, time.Since(begin).Round(time.Millisecond))
	if testing.Verbose() {
		for _, line := range lines {
			t.Logf("  %s", line)
		}
	}
}

// BenchmarkPostgresDispatchers measures the end-to-end throughput (publish
// to receipt) of 1 and of 3 dispatchers on the same workload, in the same
// run, and reports both and their ratio. "in-process" runs the dispatchers
// as goroutines of this process, "processes" as child processes.
//
//	OUTBOXHOOK_TEST_POSTGRES_DSN=... go test -run '^$' -bench PostgresDispatchers -benchtime 1x
func BenchmarkPostgresDispatchers(b *testing.B) {
	dsn := postgresDSN(b)
	const events, subs = 3000, 3
	for _, mode := range []string{"in-process", "processes"} {
		b.Run(mode, func(b *testing.B) {
			var took [2]time.Duration // 1 dispatcher, 3 dispatchers
			for i := 0; i < b.N; i++ {
				order := []int{0, 1}
				if i%2 == 1 {
					order = []int{1, 0}
				}
				for _, k := range order {
					took[k] += mpRunWorkload(b, dsn, mode, 1+2*k, events, subs)
				}
			}
			n := float64(b.N * events * subs)
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(n/took[0].Seconds(), "deliveries/s-1")
			b.ReportMetric(n/took[1].Seconds(), "deliveries/s-3")
			b.ReportMetric(took[0].Seconds()/took[1].Seconds(), "ratio-3:1")
		})
	}
}

// mpRunWorkload starts n dispatchers on a fresh schema, then publishes
// events for subs subscriptions and returns the time from the first publish
// to the last receipt.
func mpRunWorkload(b *testing.B, dsn, mode string, n, events, subs int) time.Duration {
	b.StopTimer()
	env := mpNewEnv(b, dsn, subs)
	var stops []func()
	var ps []*mpProcess
	for i := 0; i < n; i++ {
		if mode == "processes" {
			p := mpStartProcess(b, env.childDSN, i)
			ps = append(ps, p)
			stops = append(stops, func() { p.stop(b) })
		} else {
			_, stop := startDispatcher(b, env.db, Config{
				PollInterval: PollIntervalDefault,
				UserAgent:    mpUserAgent(i),
				Logger:       slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
			})
			stops = append(stops, stop)
		}
	}
	for _, p := range ps {
		p.waitReady(b)
	}
	want := events * subs
	done := env.rc.when(func(s *mpStats) bool { return s.unique == want })
	b.StartTimer()
	start := time.Now()
	ids := mpPublish(b, env.db, "", events)
	mpWait(b, fmt.Sprintf("all %d deliveries", want), done, env.rc, ps)
	took := time.Since(start)
	b.StopTimer()
	for _, stop := range stops {
		stop()
	}
	env.rc.result(ids, env.paths).check(b)
	return took
}

// mpEnv is a fresh schema with subscriptions, one per path of a receiver.
type mpEnv struct {
	db       *sql.DB
	childDSN string // the test server's DSN with the schema's search_path
	rc       *mpReceiver
	paths    []string
	subIDs   map[string]string // path → subscription ID
}

func mpNewEnv(t testing.TB, dsn string, subs int) *mpEnv {
	t.Helper()
	db := openPostgresTestDB(t)
	var schema string
	if err := db.QueryRow(`SELECT current_schema()`).Scan(&schema); err != nil {
		t.Fatal(err)
	}
	env := &mpEnv{db: db, childDSN: withSearchPath(t, dsn, schema), rc: mpNewReceiver(t), subIDs: map[string]string{}}
	store := newTestSubscriptions(t, db, nil)
	for i := 0; i < subs; i++ {
		path := "/sub" + strconv.Itoa(i)
		sub, err := store.Create(context.Background(), Subscription{URL: env.rc.srv.URL + path, EventTypes: []string{"*"}})
		if err != nil {
			t.Fatal(err)
		}
		env.rc.addPath(path, sub.Secret)
		env.paths = append(env.paths, path)
		env.subIDs[path] = sub.ID
	}
	return env
}

// mpPublish publishes n events in transactions of 500 with PublishBatch.
// With a prefix the events get the IDs prefix00000, prefix00001, ..., and a
// transaction that fails (the server restarting) is tried again: if its
// commit went through after all, the retry finds the IDs taken.
func mpPublish(t testing.TB, db *sql.DB, prefix string, n int) []string {
	t.Helper()
	const chunk = 500
	ctx := context.Background()
	var ids []string
	for off := 0; off < n; off += chunk {
		events := make([]Event, min(chunk, n-off))
		for i := range events {
			events[i] = Event{Type: "load.test", Data: json.RawMessage(`{"n":` + strconv.Itoa(off+i) + `}`)}
			if prefix != "" {
				events[i].ID = fmt.Sprintf("%s%05d", prefix, off+i)
			}
		}
		var got []string
		var err error
		for attempt := 1; ; attempt++ {
			got, err = mpPublishTx(ctx, db, events)
			if err == nil || prefix == "" || attempt == 10 {
				break
			}
			if errors.Is(err, ErrDuplicateEvent) && countRows(t, db, `SELECT COUNT(*) FROM webhook_outbox WHERE id LIKE $1`, prefix+"%") == off+len(events) {
				got = nil
				for _, e := range events {
					got = append(got, e.ID)
				}
				err = nil
				break
			}
			t.Logf("publishing events %d-%d, attempt %d: %v; trying again", off, off+len(events)-1, attempt, err)
		}
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, got...)
	}
	return ids
}

func mpPublishTx(ctx context.Context, db *sql.DB, events []Event) ([]string, error) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	ids, err := PublishBatch(ctx, tx, events...)
	if err != nil {
		_ = tx.Rollback()
		return nil, err
	}
	return ids, tx.Commit()
}

// mpStates counts the deliveries by state.
func mpStates(t testing.TB, db *sql.DB) map[string]int {
	t.Helper()
	rows, err := db.Query(`SELECT state, COUNT(*) FROM webhook_deliveries GROUP BY state`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var s string
		var n int
		if err := rows.Scan(&s, &n); err != nil {
			t.Fatal(err)
		}
		out[s] = n
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// mpKey identifies a delivery as the receiver sees it: the subscription's
// path and the event ID.
type mpKey struct{ path, id string }

// mpStats is the receiver's state, passed to conditions under its lock.
type mpStats struct {
	unique, total int
	byAgent       map[string]int
	held          int // requests being held unanswered (see hold)
}

// mpReceiver is a real HTTP endpoint with one path per subscription. It
// verifies every request with the Standard Webhooks reference library,
// answers 200, and counts requests per delivery and per User-Agent.
type mpReceiver struct {
	srv *httptest.Server

	mu       sync.Mutex
	hooks    map[string]*standardwebhooks.Webhook // path → verifier
	first    map[mpKey]string                     // User-Agent of the first receipt
	dups     map[mpKey][]string                   // User-Agents of every receipt, for keys received twice or more
	st       mpStats
	bad      []string // verification failures (the first few)
	badCount int
	watchers []mpWatcher

	holdAgent string        // requests from this User-Agent are held...
	holding   chan struct{} // ...until this is closed
	heldKeys  []mpKey
}

type mpWatcher struct {
	cond func(*mpStats) bool
	ch   chan struct{}
}

func mpNewReceiver(t testing.TB) *mpReceiver {
	rc := &mpReceiver{hooks: map[string]*standardwebhooks.Webhook{}, first: map[mpKey]string{},
		dups: map[mpKey][]string{}, st: mpStats{byAgent: map[string]int{}}}
	rc.srv = httptest.NewServer(http.HandlerFunc(rc.serve))
	t.Cleanup(rc.srv.Close)
	return rc
}

func (rc *mpReceiver) addPath(path, secret string) {
	wh, err := standardwebhooks.NewWebhook(secret)
	if err != nil {
		panic(err)
	}
	rc.mu.Lock()
	rc.hooks[path] = wh
	rc.mu.Unlock()
}

func (rc *mpReceiver) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	rc.mu.Lock()
	wh := rc.hooks[r.URL.Path]
	rc.mu.Unlock()
	if err == nil && wh == nil {
		err = fmt.Errorf("no subscription at %s", r.URL.Path)
	}
	if err == nil {
		err = wh.Verify(body, r.Header)
	}
	key := mpKey{r.URL.Path, r.Header.Get(HeaderWebhookID)}
	ua := r.Header.Get("User-Agent")

	rc.mu.Lock()
	if err != nil {
		// Answered 200 all the same, so a failure is reported once at
		// the end rather than retried until the hang guard.
		if rc.badCount++; len(rc.bad) < 5 {
			rc.bad = append(rc.bad, fmt.Sprintf("%s %s: %v", key.path, key.id, err))
		}
	}
	rc.st.total++
	rc.st.byAgent[ua]++
	if prev, ok := rc.first[key]; ok {
		if rc.dups[key] == nil {
			rc.dups[key] = []string{prev}
		}
		rc.dups[key] = append(rc.dups[key], ua)
	} else {
		rc.first[key] = ua
		rc.st.unique++
	}
	var hold chan struct{}
	if rc.holding != nil && ua == rc.holdAgent {
		hold = rc.holding
		rc.heldKeys = append(rc.heldKeys, key)
		rc.st.held++
	}
	kept := rc.watchers[:0]
	for _, wt := range rc.watchers {
		if wt.cond(&rc.st) {
			close(wt.ch)
		} else {
			kept = append(kept, wt)
		}
	}
	clear(rc.watchers[len(kept):])
	rc.watchers = kept
	rc.mu.Unlock()
	if hold != nil {
		<-hold // then answer 200, to a sender that may be dead by now
	}
}

// hold makes the receiver keep the requests of agent unanswered, received
// but not acknowledged, until the returned release is called (at the
// latest when the test ends).
func (rc *mpReceiver) hold(t testing.TB, agent string) (release func()) {
	rc.mu.Lock()
	rc.holdAgent, rc.holding = agent, make(chan struct{})
	ch := rc.holding
	rc.mu.Unlock()
	var once sync.Once
	release = func() {
		once.Do(func() {
			rc.mu.Lock()
			rc.holding = nil
			rc.mu.Unlock()
			close(ch)
		})
	}
	t.Cleanup(release) // before the server closes, which waits for handlers
	return release
}

// held returns the deliveries whose requests were held.
func (rc *mpReceiver) held() []mpKey {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return append([]mpKey(nil), rc.heldKeys...)
}

// when returns a channel closed once cond holds (checked at once and after
// every request).
func (rc *mpReceiver) when(cond func(*mpStats) bool) <-chan struct{} {
	ch := make(chan struct{})
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if cond(&rc.st) {
		close(ch)
	} else {
		rc.watchers = append(rc.watchers, mpWatcher{cond, ch})
	}
	return ch
}

// stats returns a copy of the counters.
func (rc *mpReceiver) stats() mpStats {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	s := rc.st
	s.byAgent = map[string]int{}
	for k, v := range rc.st.byAgent {
		s.byAgent[k] = v
	}
	return s
}

// mpResult compares what the receiver got with the expected deliveries.
type mpResult struct {
	total, duplicates int
	missing           []mpKey
	unexpected        []mpKey
	dupKeys           map[mpKey][]string
	byAgent           map[string]int
	bad               []string
	badCount          int
}

// result expects one delivery of every event of ids to every path.
func (rc *mpReceiver) result(ids, paths []string) *mpResult {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	r := &mpResult{total: rc.st.total, dupKeys: map[mpKey][]string{}, byAgent: map[string]int{},
		bad: rc.bad, badCount: rc.badCount}
	for k, v := range rc.st.byAgent {
		r.byAgent[k] = v
	}
	expected := make(map[mpKey]bool, len(ids)*len(paths))
	for _, p := range paths {
		for _, id := range ids {
			k := mpKey{p, id}
			expected[k] = true
			if _, ok := rc.first[k]; !ok {
				r.missing = append(r.missing, k)
			}
		}
	}
	for k := range rc.first {
		if !expected[k] {
			r.unexpected = append(r.unexpected, k)
		}
	}
	for k, agents := range rc.dups {
		r.dupKeys[k] = agents
		r.duplicates += len(agents) - 1
	}
	return r
}

// check fails t on missing or unexpected deliveries and bad signatures.
func (r *mpResult) check(t testing.TB) {
	t.Helper()
	if len(r.missing) > 0 {
		t.Errorf("%d deliveries never made, e.g. %v", len(r.missing), r.missing[:min(5, len(r.missing))])
	}
	if len(r.unexpected) > 0 {
		t.Errorf("%d unexpected deliveries, e.g. %v", len(r.unexpected), r.unexpected[:min(5, len(r.unexpected))])
	}
	if r.badCount > 0 {
		t.Errorf("%d requests failed Standard Webhooks verification, e.g. %v", r.badCount, r.bad)
	}
}

func (r *mpResult) someDups(n int) []string {
	var out []string
	for k, agents := range r.dupKeys {
		if len(out) == n {
			break
		}
		out = append(out, fmt.Sprintf("%s%s×%d%v", k.path, k.id, len(agents), agents))
	}
	return out
}

// agents lists the requests per User-Agent.
func (r *mpResult) agents() string {
	var names []string
	for k := range r.byAgent {
		names = append(names, k)
	}
	sort.Strings(names)
	var parts []string
	for _, k := range names {
		parts = append(parts, fmt.Sprintf("%s=%d", strings.TrimPrefix(k, "outboxhook-test/"), r.byAgent[k]))
	}
	return strings.Join(parts, " ")
}

// mpWait waits for ch, failing t if a child process exits first or the hang
// guard passes.
func mpWait(t testing.TB, what string, ch <-chan struct{}, rc *mpReceiver, ps []*mpProcess) {
	t.Helper()
	exited := make(chan *mpProcess, len(ps))
	quit := make(chan struct{})
	defer close(quit)
	for _, p := range ps {
		go func() {
			select {
			case <-p.exited:
				exited <- p
			case <-quit:
			}
		}()
	}
	guard := time.NewTimer(mpGuard)
	defer guard.Stop()
	select {
	case <-ch:
	case p := <-exited:
		t.Fatalf("waiting for %s: dispatcher process %d exited: %v\nits stderr:\n%s", what, p.index, p.waitErr, mpTail(p.stderr.String(), 4000))
	case <-guard.C:
		s := rc.stats()
		var logs []string
		for _, p := range ps {
			logs = append(logs, fmt.Sprintf("process %d stderr:\n%s", p.index, mpTail(p.stderr.String(), 2000)))
		}
		t.Fatalf("waiting for %s: not done after %v (%d distinct deliveries, %d requests, %v)\n%s",
			what, mpGuard, s.unique, s.total, s.byAgent, strings.Join(logs, "\n"))
	}
}

// mpProcess is a child dispatcher process (TestHelperDispatcherProcess).
type mpProcess struct {
	index   int
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	stdout  *mpBuffer
	stderr  *mpBuffer
	ready   chan struct{}
	exited  chan struct{}
	waitErr error // set before exited is closed
}

func mpStartProcess(t testing.TB, dsn string, index int, env ...string) *mpProcess {
	t.Helper()
	p := &mpProcess{index: index, ready: make(chan struct{}), exited: make(chan struct{}), stderr: &mpBuffer{}}
	p.stdout = &mpBuffer{onLine: func(line string) {
		if line == mpReadyLine {
			close(p.ready)
		}
	}}
	p.cmd = exec.Command(os.Args[0], "-test.run=^TestHelperDispatcherProcess$", "-test.count=1")
	p.cmd.Env = append(os.Environ(),
		envHelperDispatcher+"=1", envHelperDSN+"="+dsn, envHelperIndex+"="+strconv.Itoa(index))
	p.cmd.Env = append(p.cmd.Env, env...)
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	var err error
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
	})
	return p
}

func (p *mpProcess) waitReady(t testing.TB) {
	t.Helper()
	guard := time.NewTimer(mpGuard)
	defer guard.Stop()
	select {
	case <-p.ready:
	case <-p.exited:
		t.Fatalf("dispatcher process %d exited before dispatching: %v\n%s%s", p.index, p.waitErr, p.stdout, p.stderr)
	case <-guard.C:
		t.Fatalf("dispatcher process %d not dispatching after %v", p.index, mpGuard)
	}
}

// stop closes the child's stdin, so it shuts down gracefully, and checks
// that it exits 0 (a data race in the child makes it exit 66).
func (p *mpProcess) stop(t testing.TB) {
	t.Helper()
	p.stdin.Close()
	guard := time.NewTimer(mpGuard)
	defer guard.Stop()
	select {
	case <-p.exited:
	case <-guard.C:
		t.Errorf("dispatcher process %d did not stop within %v; killing it", p.index, mpGuard)
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
	if p.waitErr != nil {
		t.Errorf("dispatcher process %d: %v\nstdout:\n%s\nstderr:\n%s", p.index, p.waitErr, mpTail(p.stdout.String(), 2000), mpTail(p.stderr.String(), 4000))
	}
}

// kill sends SIGKILL and waits until the process is gone.
func (p *mpProcess) kill(t testing.TB) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p.exited
	p.stdin.Close()
	var ee *exec.ExitError
	if !errors.As(p.waitErr, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("dispatcher process %d ended with %v, not by SIGKILL", p.index, p.waitErr)
	}
}

// mpBuffer is a concurrency-safe buffer; onLine, when set, sees every
// complete line written.
type mpBuffer struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	partial []byte
	onLine  func(string)
}

func (b *mpBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf.Write(p)
	if b.onLine != nil {
		b.partial = append(b.partial, p...)
		for {
			i := bytes.IndexByte(b.partial, '\n')
			if i < 0 {
				break
			}
			b.onLine(string(b.partial[:i]))
			b.partial = b.partial[i+1:]
		}
	}
	return len(p), nil
}

func (b *mpBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// mpRace tells whether this binary was built with the race detector.
var mpRace = func() bool {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "-race" {
				return s.Value == "true"
			}
		}
	}
	return false
}()

func mpTail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}

// mpLockPostgresServer takes the flock that serializes restarts of the test
// server with the PostgreSQL tests of other packages, until t ends:
// exclusive for a restart, shared otherwise.
func mpLockPostgresServer(t testing.TB, exclusive bool) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(os.TempDir(), mpLockFileName), os.O_RDONLY|os.O_CREATE, 0o666)
	if err != nil {
		t.Fatal(err)
	}
	how := syscall.LOCK_SH
	if exclusive {
		how = syscall.LOCK_EX
	}
	if err := syscall.Flock(int(f.Fd()), how); err != nil {
		f.Close()
		t.Fatalf("flock %s: %v", f.Name(), err)
	}
	t.Cleanup(func() { f.Close() }) // closing releases the lock
}

// mpPgCtlCmd runs pg_ctl on the test server's data directory, as the
// directory's owner when this process runs as root (PostgreSQL refuses to
// run as root).
type mpPgCtlCmd struct {
	pgctl, dataDir, logFile, owner string
}

// mpPgCtl finds pg_ctl for dataDir.
func mpPgCtl(t *testing.T, dataDir string) *mpPgCtlCmd {
	t.Helper()
	c := &mpPgCtlCmd{dataDir: dataDir}
	if v, err := os.ReadFile(filepath.Join(dataDir, "PG_VERSION")); err == nil {
		candidate := filepath.Join("/usr/lib/postgresql", strings.TrimSpace(string(v)), "bin", "pg_ctl")
		if _, err := os.Stat(candidate); err == nil {
			c.pgctl = candidate
		}
	}
	if c.pgctl == "" {
		p, err := exec.LookPath("pg_ctl")
		if err != nil {
			t.Fatalf("pg_ctl for %s not found: %v", dataDir, err)
		}
		c.pgctl = p
	}
	// pg_ctl needs a log file for the server it starts (else the server
	// inherits pg_ctl's output): use the one next to the data directory,
	// where .ci/start-postgres puts it.
	c.logFile = filepath.Join(filepath.Dir(filepath.Clean(dataDir)), "server.log")
	if os.Geteuid() == 0 {
		fi, err := os.Stat(dataDir)
		if err != nil {
			t.Fatal(err)
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			t.Fatalf("cannot tell the owner of %s", dataDir)
		}
		out, err := exec.Command("id", "-nu", strconv.Itoa(int(st.Uid))).Output()
		if err != nil {
			t.Fatalf("owner of %s: %v", dataDir, err)
		}
		c.owner = strings.TrimSpace(string(out))
	}
	return c
}

// ensureRunning starts the server if it is not running (after a test
// failed while it was stopped).
func (c *mpPgCtlCmd) ensureRunning(t testing.TB) {
	if _, err := c.output("status"); err != nil {
		t.Logf("PostgreSQL not running (%v); starting it", err)
		c.run(t, "start")
	}
}

func (c *mpPgCtlCmd) output(action string) (string, error) {
	args := []string{c.pgctl, "-D", c.dataDir, "-w", "-t", "120"}
	switch action {
	case "stop", "restart":
		args = append(args, "-m", "fast")
	}
	switch action {
	case "start", "restart":
		args = append(args, "-l", c.logFile)
	}
	args = append(args, action)
	if c.owner != "" {
		args = append([]string{"runuser", "-u", c.owner, "--"}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func (c *mpPgCtlCmd) run(t testing.TB, action string) {
	t.Helper()
	if _, err := c.output(action); err != nil {
		t.Fatal(err)
	}
}

func mpSameDir(a, b string) bool {
	ra, err1 := filepath.EvalSymlinks(a)
	rb, err2 := filepath.EvalSymlinks(b)
	if err1 != nil || err2 != nil {
		return filepath.Clean(a) == filepath.Clean(b)
	}
	return ra == rb
}
