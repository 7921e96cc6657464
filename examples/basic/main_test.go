package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestRun runs the whole example: the receivers subscribe through the API,
// and every expected delivery must succeed, verified by its receiver and
// recorded in the database.
func TestRun(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), &out, ""); err != nil {
		t.Fatalf("run: %v\noutput:\n%s", err, out.String())
	}
	for _, want := range []string{
		"→ 201 Created, Location: /api/webhook-subscriptions/sub_",
		"→ 401 Unauthorized, refused by Verifier.Middleware",
		"simulated outage 3/3",
		"(succeeded on attempt 2)",
		"OK  12 deliveries succeeded",
		"isolation: globex received 1 event of its own and 0 of acme's 6.",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

// TestRunKeepsDatabase runs the example on a given path, which it keeps, and
// refuses to reuse it.
func TestRunKeepsDatabase(t *testing.T) {
	path := filepath.Join(t.TempDir(), "shop.db")
	var out bytes.Buffer
	if err := run(context.Background(), &out, path); err != nil {
		t.Fatalf("run: %v\noutput:\n%s", err, out.String())
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("database file: %v", err)
	}
	if err := run(context.Background(), &out, path); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Fatalf("second run on the same file: %v, want an error saying it exists", err)
	}
}
