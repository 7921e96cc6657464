package webhooks

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/jmoiron/sqlx"

	"github.com/outboxhook/webhooks/internal/dbtx"
	"github.com/outboxhook/webhooks/store"
)

// Limits on events.
const (
	// MaxPayloadBytesDefault is the default limit on the size of the body
	// delivered for one event.
	MaxPayloadBytesDefault = 256 << 10
	// MaxEventTypeLength bounds an event type's length.
	MaxEventTypeLength = 128
	// MaxEventIDLength bounds a caller-chosen event ID's length.
	MaxEventIDLength = 128
	// MaxBatchEvents bounds the events of one PublishBatch.
	MaxBatchEvents = 1000
	// BatchStatementEvents is how many events of a PublishBatch go in one
	// statement (see PublishBatch). SQLite looks each $N parameter up among
	// those before it while it prepares a statement, so one statement for
	// 1,000 events (6,000 parameters) cost 14-24 times a loop of Publish in
	// one transaction the first time; in statements of 50 it costs about
	// what that loop costs.
	BatchStatementEvents = 50
	// MaxTenantLength bounds a tenant's length.
	MaxTenantLength = 256
)

// Event is something that happened, to be delivered to every enabled
// subscription of its tenant whose event types match its type.
type Event struct {
	// ID identifies the event; receivers deduplicate on it (it is sent as
	// webhook-id and the payload's "id"). Empty means "evt_" followed by a
	// UUIDv7, which sorts by time. A caller-chosen ID makes publishing
	// idempotent: publishing it again returns ErrDuplicateEvent. At most
	// MaxEventIDLength visible ASCII characters.
	ID string
	// Type names what happened, e.g. "order.shipped": dot-separated
	// segments of letters, digits, '_' and '-'. Required.
	Type string
	// Tenant scopes the event: only subscriptions of the same tenant receive
	// it. Empty is a tenant like any other (single-tenant applications).
	Tenant string
	// Data is the payload's "data": any value that marshals to a JSON
	// object. A json.RawMessage is sent byte for byte as given. Nil means {}.
	Data any
	// OccurredAt is the payload's "timestamp". Zero means now.
	OccurredAt time.Time
}

// Execer is what Publish writes through: *sql.Tx, *sqlx.Tx, *sql.DB,
// *sqlx.DB and *sql.Conn all qualify. Pass the transaction that changes the
// business data, so the event commits or rolls back with it.
type Execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

// Publisher publishes events with non-default settings. The zero value is
// ready to use and behaves like the package-level Publish.
type Publisher struct {
	// MaxPayloadBytes limits the size of the delivered body (the JSON
	// envelope with id, type, timestamp and data). Zero means
	// MaxPayloadBytesDefault.
	MaxPayloadBytes int
	// Clock supplies OccurredAt when an event has none. Nil means the
	// system clock.
	Clock Clock
}

// Publish writes event into the outbox through tx, which should be the
// transaction that changes the business data: if it rolls back, there is no
// event; once it commits, the event will be delivered to every matching
// subscription. Publish writes one row and nothing else. It returns the
// event's ID.
//
// Invalid input returns an error wrapping ErrInvalidEvent or
// ErrPayloadTooLarge before anything is written; an ID that already exists
// returns ErrDuplicateEvent and writes nothing.
func Publish(ctx context.Context, tx Execer, event Event) (string, error) {
	var p Publisher
	return p.Publish(ctx, tx, event)
}

// PublishBatch publishes several events: all of them or none. IDs must be
// unique within the batch. In a transaction (a *sql.Tx or *sqlx.Tx, or a
// *sql.Conn inside one) the batch is written under a savepoint that a
// failure rolls back, so the transaction can go on; through a *sql.DB,
// *sqlx.DB or a *sql.Conn outside a transaction it is written in a
// transaction of its own. Either way it goes BatchStatementEvents events per
// statement. Any other Execer gets the whole batch in one statement (which
// SQLite prepares slowly for big batches).
func PublishBatch(ctx context.Context, tx Execer, events ...Event) ([]string, error) {
	var p Publisher
	return p.PublishBatch(ctx, tx, events...)
}

// Publish is the package-level Publish with p's settings.
func (p *Publisher) Publish(ctx context.Context, tx Execer, event Event) (string, error) {
	row, err := p.row(event)
	if err != nil {
		return "", err
	}
	res, err := tx.ExecContext(ctx, store.InsertEvent, row.args()...)
	if err != nil {
		return "", fmt.Errorf("webhooks: publish %s: %w", row.id, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return "", fmt.Errorf("webhooks: publish %s: %w", row.id, err)
	}
	if n == 0 {
		return "", fmt.Errorf("%w: %s", ErrDuplicateEvent, row.id)
	}
	return row.id, nil
}

// PublishBatch is the package-level PublishBatch with p's settings.
//
// If any ID already exists the batch writes nothing and returns
// ErrDuplicateEvent; so it does when, on PostgreSQL, another transaction is
// inserting one of the IDs at the same moment (PublishBatch waits for it to
// commit). Only through an Execer of the last kind above can that race
// leave part of the batch written; the error then is not ErrDuplicateEvent.
func (p *Publisher) PublishBatch(ctx context.Context, tx Execer, events ...Event) ([]string, error) {
	if len(events) == 0 {
		return nil, nil
	}
	if len(events) > MaxBatchEvents {
		return nil, fmt.Errorf("%w: batch of %d events; at most %d", ErrInvalidEvent, len(events), MaxBatchEvents)
	}
	ids := make([]string, len(events))
	args := make([]any, 0, len(events)*7)
	seen := make(map[string]bool, len(events))
	for i, e := range events {
		row, err := p.row(e)
		if err != nil {
			return nil, fmt.Errorf("event %d: %w", i, err)
		}
		if seen[row.id] {
			return nil, fmt.Errorf("%w: event %d: ID %s appears twice in the batch", ErrInvalidEvent, i, row.id)
		}
		seen[row.id] = true
		ids[i] = row.id
		args = append(args, row.args()...)
	}
	var err error
	switch t := tx.(type) {
	case *sql.Tx, *sqlx.Tx:
		err = publishBatchInSavepoint(ctx, tx, len(ids), args)
	case *sql.DB:
		err = publishBatchInTx(ctx, t, len(ids), args)
	case *sqlx.DB:
		err = publishBatchInTx(ctx, t.DB, len(ids), args)
	case *sql.Conn:
		err = publishBatchOnConn(ctx, t, len(ids), args)
	case *sqlx.Conn:
		err = publishBatchOnConn(ctx, t.Conn, len(ids), args)
	default:
		// An Execer that may run each statement on a connection of its
		// own: one statement is all or none by itself.
		err = insertEventChunk(ctx, tx, len(ids), args)
	}
	if err != nil {
		return nil, err
	}
	return ids, nil
}

// batchSavepoint is the savepoint PublishBatch writes a batch under.
const batchSavepoint = "outboxhook_publish_batch"

// sqlBracket is the SQL around a batch's statements: open before, undo
// after a failure, done after success.
type sqlBracket struct {
	open string
	undo []string
	done string
}

var (
	// savepointBracket works in the transaction the Execer is in, which a
	// failure leaves usable (on PostgreSQL, too, after a failed statement).
	savepointBracket = sqlBracket{open: "SAVEPOINT " + batchSavepoint,
		undo: []string{"ROLLBACK TO SAVEPOINT " + batchSavepoint, "RELEASE SAVEPOINT " + batchSavepoint},
		done: "RELEASE SAVEPOINT " + batchSavepoint}
	// txBracket is a transaction of its own, begun with SQL.
	txBracket = sqlBracket{open: "BEGIN", undo: []string{"ROLLBACK"}, done: "COMMIT"}
)

// publishBatchInSavepoint inserts n events (args: their parameters in
// order) in the transaction ex is in, under a savepoint: a failure rolls
// back to it, so nothing of the batch is left.
func publishBatchInSavepoint(ctx context.Context, ex Execer, n int, args []any) error {
	return publishBatchBracketed(ctx, ex, savepointBracket, n, args)
}

// publishBatchBracketed inserts n events between br's statements.
func publishBatchBracketed(ctx context.Context, ex Execer, br sqlBracket, n int, args []any) error {
	if _, err := ex.ExecContext(ctx, br.open); err != nil {
		if dbtx.SQLState(err) == "25P01" { // no_active_sql_transaction
			return fmt.Errorf("webhooks: publish batch: %w: %w", errNoSavepoint, err)
		}
		return fmt.Errorf("webhooks: publish batch: %w", err)
	}
	if err := insertEventChunks(ctx, ex, n, args); err != nil {
		for _, q := range br.undo {
			if _, rerr := ex.ExecContext(ctx, q); rerr != nil {
				// Not ErrDuplicateEvent: part of the batch may stay written.
				return fmt.Errorf("webhooks: publish batch: %v; %s failed, roll back the transaction: %w", err, q, rerr)
			}
		}
		return nothingWritten(err)
	}
	if _, err := ex.ExecContext(ctx, br.done); err != nil {
		return fmt.Errorf("webhooks: publish batch: %w", err)
	}
	return nil
}

// publishBatchInTx inserts n events in a transaction of its own.
func publishBatchInTx(ctx context.Context, db *sql.DB, n int, args []any) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("webhooks: publish batch: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // after Commit: nothing to roll back
	if err := insertEventChunks(ctx, tx, n, args); err != nil {
		return nothingWritten(err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("webhooks: publish batch: %w", err)
	}
	return nil
}

// publishBatchOnConn inserts n events through a connection that may be
// inside a transaction begun with SQL, or not. A savepoint serves both on
// SQLite (outside a transaction it starts one); PostgreSQL refuses one
// outside a transaction, and then the batch gets a transaction of its own,
// begun with SQL on the same connection.
func publishBatchOnConn(ctx context.Context, conn *sql.Conn, n int, args []any) error {
	err := publishBatchInSavepoint(ctx, conn, n, args)
	if errors.Is(err, errNoSavepoint) {
		return publishBatchBracketed(ctx, conn, txBracket, n, args)
	}
	return err
}

// errNoSavepoint is a savepoint PostgreSQL refused: there is no transaction.
var errNoSavepoint = errors.New("not in a transaction")

// nothingWritten is the error of a batch that was rolled back: one that
// wrote part of a statement (errBatchPartial) wrote nothing in the end,
// and the ID it met exists now.
func nothingWritten(err error) error {
	if errors.Is(err, errBatchPartial) {
		return fmt.Errorf("%w: an event of the batch was being written by another transaction; nothing written", ErrDuplicateEvent)
	}
	return err
}

// insertEventChunks inserts n events BatchStatementEvents at a time (args
// holds their parameters in order, len(args)/n per event). It stops at the
// first statement that fails or meets an existing ID; its caller undoes the
// statements before it.
func insertEventChunks(ctx context.Context, ex Execer, n int, args []any) error {
	per := len(args) / n
	for i := 0; i < n; i += BatchStatementEvents {
		k := min(BatchStatementEvents, n-i)
		if err := insertEventChunk(ctx, ex, k, args[i*per:(i+k)*per]); err != nil {
			return err
		}
	}
	return nil
}

// insertEventChunk inserts k events (args: their parameters in order) in
// one statement, all or none.
func insertEventChunk(ctx context.Context, ex Execer, k int, args []any) error {
	res, err := ex.ExecContext(ctx, store.InsertEventBatch(k), args...)
	if err != nil {
		return fmt.Errorf("webhooks: publish batch: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("webhooks: publish batch: %w", err)
	}
	switch {
	case n == 0:
		return fmt.Errorf("%w: an event of the batch exists already", ErrDuplicateEvent)
	case n != int64(k):
		// An ID another transaction was inserting at the same time
		// (PostgreSQL): part of the statement is written.
		return fmt.Errorf("%w: %d of %d written", errBatchPartial, n, k)
	}
	return nil
}

// errBatchPartial is a statement of a batch that wrote only some of its
// events: another transaction was inserting one of their IDs. It is not
// ErrDuplicateEvent, which promises that nothing was written.
var errBatchPartial = errors.New("webhooks: publish batch: an event ID of the batch was being written by another transaction at the same time; part of the batch is written, roll back")

// eventRow is a validated event as stored in the outbox.
type eventRow struct {
	id, typ, tenant string
	payload         []byte
	occurredAt      int64
	createdAt       int64
}

func (r *eventRow) args() []any {
	return []any{r.id, r.typ, r.tenant, string(r.payload), r.occurredAt, r.createdAt}
}

// row validates e and builds the row Publish stores.
func (p *Publisher) row(e Event) (*eventRow, error) {
	if err := validateEventType(e.Type); err != nil {
		return nil, err
	}
	if err := validateTenant(e.Tenant); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidEvent, err)
	}
	id := e.ID
	if id == "" {
		var err error
		if id, err = newID("evt_"); err != nil {
			return nil, err
		}
	} else if err := validateEventID(id); err != nil {
		return nil, err
	}
	data, err := marshalData(e.Data)
	if err != nil {
		return nil, err
	}
	now := clockOrSystem(p.Clock).Now()
	occurred := e.OccurredAt
	if occurred.IsZero() {
		occurred = now
	}
	payload := buildPayload(id, e.Type, occurred, data)
	limit := p.MaxPayloadBytes
	if limit <= 0 {
		limit = MaxPayloadBytesDefault
	}
	if len(payload) > limit {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrPayloadTooLarge, len(payload), limit)
	}
	return &eventRow{
		id: id, typ: e.Type, tenant: e.Tenant, payload: payload,
		occurredAt: unixMilli(occurred), createdAt: unixMilli(now),
	}, nil
}

// buildPayload writes the Standard Webhooks envelope by hand so a
// json.RawMessage in data reaches the receiver byte for byte.
func buildPayload(id, typ string, occurred time.Time, data []byte) []byte {
	// id and type are validated ASCII without quotes or backslashes, so they
	// need no escaping.
	b := make([]byte, 0, len(data)+len(id)+len(typ)+80)
	b = append(b, `{"id":"`...)
	b = append(b, id...)
	b = append(b, `","type":"`...)
	b = append(b, typ...)
	b = append(b, `","timestamp":"`...)
	b = occurred.UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","data":`...)
	b = append(b, data...)
	b = append(b, '}')
	return b
}

// marshalData returns data as a JSON object.
func marshalData(data any) ([]byte, error) {
	var b []byte
	switch v := data.(type) {
	case nil:
		return []byte("{}"), nil
	case json.RawMessage:
		if v == nil {
			return []byte("{}"), nil
		}
		if !json.Valid(v) {
			return nil, fmt.Errorf("%w: data is not valid JSON", ErrInvalidEvent)
		}
		b = v
	default:
		var err error
		if b, err = json.Marshal(data); err != nil {
			return nil, fmt.Errorf("%w: data does not marshal to JSON: %v", ErrInvalidEvent, err)
		}
	}
	if t := bytes.TrimLeft(b, " \t\r\n"); len(t) == 0 || t[0] != '{' {
		return nil, fmt.Errorf("%w: data must be a JSON object, got %s", ErrInvalidEvent, jsonKind(t))
	}
	return b, nil
}

func jsonKind(b []byte) string {
	if len(b) == 0 {
		return "nothing"
	}
	switch b[0] {
	case '[':
		return "an array"
	case '"':
		return "a string"
	case 'n':
		return "null"
	case 't', 'f':
		return "a boolean"
	}
	return "a number"
}

// validateEventType checks an event type: dot-separated segments of ASCII
// letters, digits, '_' and '-'.
func validateEventType(t string) error {
	if t == "" {
		return fmt.Errorf("%w: event type is required", ErrInvalidEvent)
	}
	if len(t) > MaxEventTypeLength {
		return fmt.Errorf("%w: event type is %d bytes long; at most %d", ErrInvalidEvent, len(t), MaxEventTypeLength)
	}
	for _, seg := range strings.Split(t, ".") {
		if seg == "" {
			return fmt.Errorf("%w: event type %q has an empty segment", ErrInvalidEvent, t)
		}
		for i := 0; i < len(seg); i++ {
			if !isTypeChar(seg[i]) {
				return fmt.Errorf("%w: event type %q: character %q not allowed (letters, digits, '_', '-' and '.')", ErrInvalidEvent, t, rune(seg[i]))
			}
		}
	}
	return nil
}

func isTypeChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}

// validateEventID allows visible ASCII other than quotes and backslashes:
// the ID travels in an HTTP header and unescaped in the JSON payload.
func validateEventID(id string) error {
	if len(id) > MaxEventIDLength {
		return fmt.Errorf("%w: event ID is %d bytes long; at most %d", ErrInvalidEvent, len(id), MaxEventIDLength)
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; c <= ' ' || c > '~' || c == '"' || c == '\\' {
			return fmt.Errorf("%w: event ID %s: character at %d not allowed (visible ASCII other than '\"' and '\\')", ErrInvalidEvent, strconv.QuoteToASCII(id), i)
		}
	}
	return nil
}

// validateTenant allows any UTF-8 text without control characters.
func validateTenant(t string) error {
	if len(t) > MaxTenantLength {
		return fmt.Errorf("tenant is %d bytes long; at most %d", len(t), MaxTenantLength)
	}
	if !utf8.ValidString(t) {
		return fmt.Errorf("tenant is not valid UTF-8")
	}
	for _, r := range t {
		if unicode.IsControl(r) {
			return fmt.Errorf("tenant %s contains a control character", strconv.QuoteToASCII(t))
		}
	}
	return nil
}
