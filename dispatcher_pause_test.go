package webhooks

import (
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// A wake-up that arrives while the dispatcher pauses after a database error
// must not be lost: once the pause ends the dispatcher looks for work again,
// even when PollInterval is long (LISTEN/NOTIFY doing the waking).
func TestWakeDuringErrorPauseIsNotLost(t *testing.T) {
	db := openPostgresTestDB(t)
	rc := newReceiver(t, nil)
	subs := newTestSubscriptions(t, db, nil)
	mustSubscribe(t, subs, rc, "", "*")

	failed := make(chan struct{})
	var once sync.Once
	logs := &mpBuffer{onLine: func(line string) {
		if strings.Contains(line, "level=ERROR") {
			once.Do(func() { close(failed) })
		}
	}}
	// Break the outbox so the next expansion fails.
	if _, err := db.Exec(`ALTER TABLE webhook_outbox RENAME TO webhook_outbox_away`); err != nil {
		t.Fatal(err)
	}
	d, _ := startDispatcher(t, db, Config{
		PollInterval: time.Hour, // LISTEN/NOTIFY wakes it; polling is a far fallback
		Logger:       slog.New(slog.NewTextHandler(logs, nil)),
	})
	d.Notify()
	select {
	case <-failed:
	case <-time.After(30 * time.Second):
		t.Fatal("no error logged")
	}
	// Repair the database and publish at once, within the pause (5s).
	if _, err := db.Exec(`ALTER TABLE webhook_outbox_away RENAME TO webhook_outbox`); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	publishTx(t, db, Event{Type: "a.b"}) // NOTIFY wakes the dispatcher, during its pause
	d.Notify()
	rc.wait(1) // 60s hang guard
	t.Logf("delivered %v after the publish; logs:\n%s", time.Since(start).Round(time.Millisecond), logs.String())
}
