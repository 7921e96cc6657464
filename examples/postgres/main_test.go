//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

// This file needs flock(2) (see lockTestServer), hence the build
// constraint; the program itself is portable.

package main

import (
	"bytes"
	"context"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

const (
	envPostgresDSN     = "OUTBOXHOOK_TEST_POSTGRES_DSN"
	envRequirePostgres = "OUTBOXHOOK_REQUIRE_POSTGRES"
	// lockFileName is the flock file the webhooks package's PostgreSQL
	// restart test holds exclusively while the test server restarts.
	lockFileName = "outboxhook-test-postgres.lock"
)

// TestMain lets the test binary be a worker: the coordinator starts
// os.Executable() with -worker, which here is this binary.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == workerFlag {
		os.Exit(cli(context.Background(), os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// testDSN returns the test server's URL, skipping the test without one
// unless PostgreSQL is required (CI), and keeps the server from being
// restarted by another package's test until the test ends.
func testDSN(t *testing.T) string {
	t.Helper()
	dsn := os.Getenv(envPostgresDSN)
	if dsn == "" {
		if os.Getenv(envRequirePostgres) != "" {
			t.Fatalf("%s is set but %s is empty: PostgreSQL tests cannot run", envRequirePostgres, envPostgresDSN)
		}
		t.Skipf("PostgreSQL example skipped: set %s to a server's URL (e.g. from .ci/start-postgres) to run it", envPostgresDSN)
	}
	f, err := os.OpenFile(filepath.Join(os.TempDir(), lockFileName), os.O_RDONLY|os.O_CREATE, 0o666)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH); err != nil {
		f.Close()
		t.Fatalf("flock %s: %v", f.Name(), err)
	}
	t.Cleanup(func() { f.Close() })
	return dsn
}

// TestPostgresExampleRun runs the whole example with three worker
// processes: every delivery arrives exactly once and the per-worker counts
// add up.
func TestPostgresExampleRun(t *testing.T) {
	dsn := testDSN(t)
	const workers, events, subscriptions = 3, 500, 3
	var out bytes.Buffer
	err := run(context.Background(), &out, options{DSN: dsn, Workers: workers, Events: events, PerTx: 10})
	t.Logf("output:\n%s", out.String())
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	want := events * subscriptions
	for _, s := range []string{
		"started    3 dispatcher processes",
		"published 500 order.placed events in 50 transactions",
		"database:  1500 deliveries succeeded, 1500 attempts, 0 in another state",
		"OK  1500 deliveries (500 events × 3 subscriptions) by 3 worker processes, each exactly once",
	} {
		if !strings.Contains(out.String(), s) {
			t.Errorf("output lacks %q", s)
		}
	}
	sum := 0
	for _, m := range regexp.MustCompile(`(?m)^\s*\S+s\s+(worker-\d+)\s+(\d+)`).FindAllStringSubmatch(out.String(), -1) {
		n, _ := strconv.Atoi(m[2])
		sum += n
	}
	if sum != want {
		t.Errorf("per-worker counts add up to %d, want %d", sum, want)
	}
	if strings.Contains(out.String(), "level=") {
		t.Errorf("a worker logged a warning or an error")
	}
}

// TestPostgresExampleReadsDatabaseURL runs the program as main does, with
// the database given by DATABASE_URL in keyword/value form and two workers.
func TestPostgresExampleReadsDatabaseURL(t *testing.T) {
	u, err := url.Parse(testDSN(t))
	if err != nil {
		t.Fatal(err)
	}
	kv := []string{"host=" + u.Hostname(), "dbname=" + strings.TrimPrefix(u.Path, "/")}
	if u.Port() != "" {
		kv = append(kv, "port="+u.Port())
	}
	if u.User != nil {
		kv = append(kv, "user="+u.User.Username())
		if pw, ok := u.User.Password(); ok {
			kv = append(kv, "password="+pw)
		}
	}
	for k, vs := range u.Query() {
		kv = append(kv, k+"="+vs[0])
	}
	t.Setenv("DATABASE_URL", strings.Join(kv, " "))
	var stdout, stderr bytes.Buffer
	code := cli(context.Background(), []string{"-workers", "2", "-events", "100", "-per-tx", "7"}, strings.NewReader(""), &stdout, &stderr)
	if code != 0 {
		t.Fatalf("exit code %d\nstdout:\n%s\nstderr:\n%s", code, stdout.String(), stderr.String())
	}
	for _, s := range []string{"published 100 order.placed events in 15 transactions", "OK  300 deliveries", "worker-2"} {
		if !strings.Contains(stdout.String(), s) {
			t.Errorf("output lacks %q:\n%s", s, stdout.String())
		}
	}
}

// TestPostgresExampleNeedsADatabase: without -dsn or DATABASE_URL the
// program says what it needs and exits 2.
func TestPostgresExampleNeedsADatabase(t *testing.T) {
	t.Setenv("DATABASE_URL", "")
	var stdout, stderr bytes.Buffer
	if code := cli(context.Background(), nil, strings.NewReader(""), &stdout, &stderr); code != 2 {
		t.Fatalf("exit code %d, want 2", code)
	}
	if !strings.Contains(stderr.String(), "DATABASE_URL") {
		t.Errorf("stderr %q does not mention DATABASE_URL", stderr.String())
	}
}

// TestPostgresExampleWithSearchPath covers both DSN forms.
func TestPostgresExampleWithSearchPath(t *testing.T) {
	for in, want := range map[string]string{
		"postgres://u@h:5432/db?sslmode=disable": "postgres://u@h:5432/db?search_path=s1&sslmode=disable",
		"postgresql://u@h/db":                    "postgresql://u@h/db?search_path=s1",
		"host=h dbname=db":                       "host=h dbname=db search_path=s1",
	} {
		got, err := withSearchPath(in, "s1")
		if err != nil || got != want {
			t.Errorf("withSearchPath(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}
