package agent

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// A backfill copies the rows of a table that joined a running group while
// the stream goes on (a table created with rows, given a key later, or added
// to --tables), without locking it beyond a moment per chunk:
//
//  1. The table joins the publication and a BEGIN message is emitted in the
//     same transaction. From there on its changes are streamed; the standby
//     empties its copy at BEGIN and, until END, lets an update or delete miss
//     a row it does not have yet.
//  2. The worker reads the table in key order, a chunk at a time, each in a
//     REPEATABLE READ transaction that records its snapshot and ends with a
//     watermark message. The streamer decodes that watermark at the
//     transaction's place in commit order and publishes the chunk's rows there
//     as upserts, except rows whose key a transaction the snapshot did not see
//     has changed before the watermark: the row read would be older than DR's
//     state at that point. Those keys are read again in a later chunk.
//  3. When every key is copied, an END message closes the backfill.
//
// Exactness rests on the snapshot's list of running transactions: a row read
// under it holds the effect of every transaction it sees and of none other.
// The streamer remembers, from BEGIN on, the keys each decoded transaction
// touched; one a snapshot did not see has its keys left out of that chunk.
// Transactions decoded before the streamer started remembering (before BEGIN,
// or before a restart) are all visible to every later snapshot once none of
// them is still committing: the worker waits for that before its first chunk.
//
// Keys are taken by the key the streamer knows: read when BEGIN is decoded,
// then the key of each chunk. The first may be wrong: BEGIN is decoded as
// soon as its commit record is flushed, and the catalog read then may not
// show that transaction yet (a synchronous standby keeps it invisible until
// it answers), so the streamer may know no key at all. A row an unseen
// transaction updated under another key than the chunk's may have moved
// anywhere unrecorded: the copy starts again from the table's start.
//
// Progress lives in the HAVEN_STATE bucket, written only after JetStream
// acknowledged the chunk: a restart goes on from the last chunk in the stream.

// backfillPrefix is the logical-message prefix of a group's backfill
// messages; ddlCaptureSQL writes it too.
func backfillPrefix(group string) string { return "haven.backfill." + group }

// backfillStateKey is a table's backfill state in the state bucket.
func backfillStateKey(group string, oid uint32) string {
	return "backfill." + group + "." + strconv.FormatUint(uint64(oid), 10)
}

// backfillMessage is the content of a backfill logical message: one of its
// fields is set.
type backfillMessage struct {
	Begin *backfillTable `json:"begin,omitempty"`
	// Rows names a chunk the worker read; Snapshot is the snapshot it was
	// read under (pg_current_snapshot()).
	Rows     string         `json:"rows,omitempty"`
	Snapshot string         `json:"snapshot,omitempty"`
	End      *backfillTable `json:"end,omitempty"`
}

type backfillTable struct {
	OID       uint32 `json:"oid"`
	Schema    string `json:"schema"`
	Name      string `json:"name"`
	SchemaSQL string `json:"schema_sql,omitempty"`
}

// backfillState is a backfill's progress, JSON in the state bucket.
type backfillState struct {
	OID      uint32 `json:"oid"`
	Schema   string `json:"schema"`
	Name     string `json:"name"`
	BeganLSN uint64 `json:"began_lsn"`
	// Xid is the transaction that began it (0: recorded by an older agent).
	Xid uint32 `json:"xid,omitempty"`
	// After is the key of the last row read in key order ("" before the
	// first chunk); Exhausted is set once a chunk came back short.
	After     string `json:"after,omitempty"`
	Exhausted bool   `json:"exhausted,omitempty"`
	// Until is the largest key when the first chunk was read: rows with a
	// key past it were inserted since, so they come with the stream (or,
	// moved there by an update, are read again).
	Until string `json:"until,omitempty"`
	// Retry holds keys to read again.
	Retry  []string `json:"retry,omitempty"`
	Copied int64    `json:"copied"`
	// Key is what After and Retry are keys of.
	Key backfillKey `json:"key"`
}

// backfillChunk is a chunk of rows handed from the worker to the streamer.
type backfillChunk struct {
	rel       *havenpb.Relation
	key       backfillKey
	restarted bool     // the first chunk by a changed key
	until     string   // the copy's bound
	retry     []string // the keys asked for again, if it is such a chunk
	rows      []*havenpb.Row
	done      chan backfillResult
}

// backfillResult is what became of a chunk, once JetStream has it.
type backfillResult struct {
	published int
	dirty     []string // keys left out, to read again
	restart   bool     // rows may have moved unrecorded: read from the start
}

// backfillHub is what the worker and the streamer share.
type backfillHub struct {
	mu     sync.Mutex
	chunks map[string]*backfillChunk
	ends   map[uint32]chan bool // true: END published; false: refused, rows moved meanwhile
	wake   chan struct{}        // a backfill began
}

func newBackfillHub() *backfillHub {
	return &backfillHub{chunks: map[string]*backfillChunk{}, ends: map[uint32]chan bool{}, wake: make(chan struct{}, 1)}
}

func (h *backfillHub) take(id string) *backfillChunk {
	h.mu.Lock()
	defer h.mu.Unlock()
	c := h.chunks[id]
	delete(h.chunks, id)
	return c
}

func (h *backfillHub) takeEnd(oid uint32) chan bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	c := h.ends[oid]
	delete(h.ends, oid)
	return c
}

// backfillKey is what a backfill copies a table by: its primary key (or
// replica identity index) columns in index order, whatever the table's
// replica identity.
type backfillKey struct {
	Columns []string `json:"columns"`
	Types   []string `json:"types"`
	// Def identifies the key's definition (columns, types, collations): a
	// backfill whose key changed reads the table again from its start.
	Def string `json:"def"`
}

// keyText joins the values of a row's key columns into one comparable
// string, or reports false when one did not come (an unchanged TOASTed
// value, or a column the row lacks).
func keyText(rel *havenpb.Relation, columns []string, row *havenpb.Row) (string, bool) {
	if len(columns) == 0 {
		return "", false
	}
	var b strings.Builder
	for _, name := range columns {
		i := slices.IndexFunc(rel.Columns, func(c *havenpb.Column) bool { return c.Name == name })
		if i < 0 || i >= len(row.Values) || row.Values[i].Kind != havenpb.DatumKind_DATUM_TEXT {
			return "", false
		}
		b.Write(row.Values[i].Text)
		b.WriteByte(0)
	}
	return b.String(), true
}

// splitKey undoes keyText.
func splitKey(key string) []string { return strings.Split(strings.TrimSuffix(key, "\x00"), "\x00") }

// keyQuery reads a table's backfill key.
const keyQuery = `
SELECT coalesce(array_agg(a.attname::text ORDER BY k.ord), '{}'), coalesce(array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord), '{}'),
       coalesce(string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || coalesce(co.collname, ''), ', ' ORDER BY k.ord), '')
FROM (SELECT i.indrelid, i.indkey FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
      WHERE i.indrelid = $1 AND i.indimmediate AND (i.indisprimary OR (c.relreplident = 'i' AND i.indisreplident))
      ORDER BY i.indisprimary DESC LIMIT 1) i,
     unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = $1 AND a.attnum = k.attnum
LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 0`

func readKey(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, oid uint32) (backfillKey, error) {
	var k backfillKey
	if err := q.QueryRow(ctx, keyQuery, oid).Scan(&k.Columns, &k.Types, &k.Def); err != nil {
		return k, fmt.Errorf("read the key of table %d: %w", oid, err)
	}
	return k, nil
}

// pgSnapshot is pg_current_snapshot() reduced to 32-bit transaction ids,
// which is what pgoutput reports.
type pgSnapshot struct {
	xmin, xmax uint32
	running    map[uint32]bool
}

func parseSnapshot(s string) (pgSnapshot, error) {
	parts := strings.Split(s, ":")
	if len(parts) != 3 {
		return pgSnapshot{}, fmt.Errorf("snapshot %q: want xmin:xmax:xip", s)
	}
	xid := func(v string) (uint32, error) {
		n, err := strconv.ParseUint(v, 10, 64)
		return uint32(n), err
	}
	var snap pgSnapshot
	var err error
	if snap.xmin, err = xid(parts[0]); err != nil {
		return pgSnapshot{}, fmt.Errorf("snapshot %q: %w", s, err)
	}
	if snap.xmax, err = xid(parts[1]); err != nil {
		return pgSnapshot{}, fmt.Errorf("snapshot %q: %w", s, err)
	}
	snap.running = map[uint32]bool{}
	if parts[2] != "" {
		for _, v := range strings.Split(parts[2], ",") {
			x, err := xid(v)
			if err != nil {
				return pgSnapshot{}, fmt.Errorf("snapshot %q: %w", s, err)
			}
			snap.running[x] = true
		}
	}
	return snap, nil
}

// precedes compares transaction ids as PostgreSQL does, modulo 2^32.
func precedes(a, b uint32) bool { return int32(a-b) < 0 }

// sees reports whether a committed transaction is visible in the snapshot.
func (s pgSnapshot) sees(xid uint32) bool {
	return precedes(xid, s.xmin) || (precedes(xid, s.xmax) && !s.running[xid])
}

// touched is what one decoded transaction changed in backfilled tables.
type touched struct {
	xid   uint32
	keys  map[uint32]map[string]bool
	whole map[uint32]bool   // truncated, or a key that did not come
	def   map[uint32]string // the key definition the keys were taken by
	// updated: an update, which may have moved a row to another key.
	updated map[uint32]bool
	// moved are keys rows took by an update of their key: a row moved to
	// a key already copied is read again.
	moved map[uint32][]string
}

func (t *touched) add(oid uint32, key string, ok bool) {
	if !ok {
		if t.whole == nil {
			t.whole = map[uint32]bool{}
		}
		t.whole[oid] = true
		return
	}
	if t.keys == nil {
		t.keys = map[uint32]map[string]bool{}
	}
	if t.keys[oid] == nil {
		t.keys[oid] = map[string]bool{}
	}
	t.keys[oid][key] = true
}

// noteTouched records the keys a change touches in a table being
// backfilled.
func (st *streamer) noteTouched(rel *havenpb.Relation, ch *havenpb.Change) {
	key, ok := st.backfilling[rel.Id]
	if !ok {
		return
	}
	t := st.txn
	if t.touched == nil {
		t.touched = &touched{xid: t.xid}
	}
	if t.touched.def == nil {
		t.touched.def = map[uint32]string{}
	}
	t.touched.def[rel.Id] = key.Def
	if ch.Op == havenpb.Op_OP_UPDATE {
		if t.touched.updated == nil {
			t.touched.updated = map[uint32]bool{}
		}
		t.touched.updated[rel.Id] = true
	}
	var oldKey, newKey string
	var oldOK, newOK bool
	if ch.Old != nil {
		oldKey, oldOK = keyText(rel, key.Columns, ch.Old)
		t.touched.add(rel.Id, oldKey, oldOK)
	}
	if ch.New != nil {
		newKey, newOK = keyText(rel, key.Columns, ch.New)
		t.touched.add(rel.Id, newKey, newOK)
	}
	if ch.Op == havenpb.Op_OP_UPDATE && ch.Old != nil && newOK && (!oldOK || oldKey != newKey) {
		if t.touched.moved == nil {
			t.touched.moved = map[uint32][]string{}
		}
		t.touched.moved[rel.Id] = append(t.touched.moved[rel.Id], newKey)
	}
}

// movedKey is where the streamer records keys that rows moved to in a
// table being backfilled; the worker adds them to the keys to read again.
func movedKey(group string, oid uint32) string { return backfillStateKey(group, oid) + ".moved" }

// movedKeys are keys rows moved to, by the key definition they were taken
// by: the JSON value at movedKey. (Before definitions were recorded it was
// a list, read as keys of the copy's definition, "".)
type movedKeys map[string][]string

func parseMoved(value []byte) (movedKeys, error) {
	moved := movedKeys{}
	if err := json.Unmarshal(value, &moved); err != nil {
		var list []string
		if json.Unmarshal(value, &list) != nil {
			return nil, err
		}
		moved[""] = list
	}
	return moved, nil
}

// saveMoved records the keys updates moved rows to, before the
// transactions that moved them can be confirmed: a row moved into the part
// of the table already copied would otherwise never be read.
func (st *streamer) saveMoved(ctx context.Context) error {
	for oid, keys := range st.moved {
		name := movedKey(st.cfg.Group, oid)
		for {
			moved := movedKeys{}
			var rev uint64
			entry, err := st.state.Get(ctx, name)
			switch {
			case errors.Is(err, jetstream.ErrKeyNotFound):
			case err != nil:
				return fmt.Errorf("read %s: %w", name, err)
			default:
				if moved, err = parseMoved(entry.Value()); err != nil {
					return fmt.Errorf("%s holds %q: %w", name, entry.Value(), err)
				}
				rev = entry.Revision()
			}
			for def, k := range keys {
				moved[def] = append(moved[def], k...)
			}
			value, err := json.Marshal(moved)
			if err != nil {
				return err
			}
			if rev == 0 {
				_, err = st.state.Create(ctx, name, value)
			} else {
				_, err = st.state.Update(ctx, name, value, rev)
			}
			if err == nil {
				break
			}
			if !errors.Is(err, jetstream.ErrKeyExists) && !strings.Contains(err.Error(), "wrong last sequence") {
				return fmt.Errorf("record moved keys in %s: %w", name, err)
			}
		}
		delete(st.moved, oid)
	}
	return nil
}

// onBackfillMessage handles a backfill message decoded in a transaction.
func (st *streamer) onBackfillMessage(ctx context.Context, content []byte) error {
	var m backfillMessage
	if err := json.Unmarshal(content, &m); err != nil {
		// Ignoring it could leave a table's rows behind.
		return needsOperator("backfill message %q in transaction %d is malformed (%v): it was not written by this version of haven; "+
			"if something else emits messages with prefix %q, stop it", content, st.txn.xid, err, backfillPrefix(st.cfg.Group))
	}
	switch {
	case m.Begin != nil:
		return st.beginBackfill(ctx, m.Begin)
	case m.Rows != "":
		return st.backfillRows(ctx, m.Rows, m.Snapshot)
	case m.End != nil:
		return st.endBackfill(ctx, m.End)
	}
	return nil
}

// beginBackfill publishes BEGIN and records the backfill in the state
// bucket before it can be confirmed: a restart finds and continues it.
func (st *streamer) beginBackfill(ctx context.Context, b *backfillTable) error {
	ch := &havenpb.Change{Op: havenpb.Op_OP_BACKFILL, Backfill: &havenpb.Backfill{Phase: havenpb.Backfill_PHASE_BEGIN,
		Schema: b.Schema, Name: b.Name, SchemaSql: b.SchemaSQL, SourceOid: b.OID}}
	publishing, err := st.addChange(ctx, nil, ch)
	if err != nil {
		return err
	}
	if publishing {
		state := backfillState{OID: b.OID, Schema: b.Schema, Name: b.Name, BeganLSN: uint64(st.txn.commitLSN), Xid: st.txn.xid}
		if err := st.putBackfill(ctx, state); err != nil {
			return err
		}
		st.log.Info().Str("table", b.Schema+"."+b.Name).Stringer("commit_lsn", st.txn.commitLSN).
			Msg("table joined the group with rows in it: backfilling them while the stream goes on")
		select {
		case st.hub.wake <- struct{}{}:
		default:
		}
	} else if _, err := st.state.Get(ctx, backfillStateKey(st.cfg.Group, b.OID)); err != nil {
		// Published before a restart and finished since.
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil
		}
		return fmt.Errorf("read backfill state of %s.%s: %w", b.Schema, b.Name, err)
	}
	if err := waitVisible(ctx, st.ctrl, st.txn.xid); err != nil {
		return err
	}
	key, err := readKey(ctx, st.ctrl, b.OID)
	if err != nil {
		return err
	}
	st.backfilling[b.OID] = key
	st.published[b.OID] = false
	return nil
}

// backfillRows publishes a chunk at its watermark: every row but those a
// transaction its snapshot did not see has changed.
func (st *streamer) backfillRows(ctx context.Context, id, snapshot string) error {
	chunk := st.hub.take(id)
	if chunk == nil {
		// Read by an earlier session: the worker reads it again.
		return nil
	}
	snap, err := parseSnapshot(snapshot)
	if err != nil {
		return err
	}
	oid := chunk.rel.Id
	st.backfilling[oid] = chunk.key
	dirty := map[string]bool{}
	whole := false
	result := backfillResult{}
	kept := st.touched[:0]
	for _, t := range st.touched {
		if snap.sees(t.xid) {
			continue // visible to this and every later snapshot
		}
		kept = append(kept, t)
		for k := range t.keys[oid] {
			dirty[k] = true
		}
		// Keys taken by another key definition say nothing of these, nor
		// of where its updates moved rows.
		other := t.def[oid] != chunk.key.Def
		whole = whole || t.whole[oid] || (t.def[oid] != "" && other)
		result.restart = result.restart || (t.updated[oid] && other)
	}
	st.touched = kept
	for _, row := range chunk.rows {
		key, _ := keyText(chunk.rel, chunk.key.Columns, row)
		if whole || dirty[key] {
			result.dirty = append(result.dirty, key)
			continue
		}
		if _, err := st.addChange(ctx, []*havenpb.Relation{chunk.rel}, &havenpb.Change{Op: havenpb.Op_OP_UPSERT, RelationId: oid, New: row}); err != nil {
			return err
		}
		result.published++
	}
	// A key asked for again that an unseen transaction changed (moved a
	// row to it, say) may be missing from the rows: ask again.
	for _, key := range chunk.retry {
		if (whole || dirty[key]) && !slices.Contains(result.dirty, key) {
			result.dirty = append(result.dirty, key)
		}
	}
	st.txn.onPublished = append(st.txn.onPublished, func() { chunk.done <- result })
	return nil
}

// endBackfill publishes END; the worker forgets the backfill once JetStream
// has it.
func (st *streamer) endBackfill(ctx context.Context, b *backfillTable) error {
	// Rows an update moved, in a transaction before this one, to a key the
	// worker has not read yet: not the end.
	pending := false
	for _, keys := range st.moved[b.OID] {
		pending = pending || len(keys) > 0
	}
	if !pending {
		entry, err := st.state.Get(ctx, movedKey(st.cfg.Group, b.OID))
		switch {
		case errors.Is(err, jetstream.ErrKeyNotFound):
		case err != nil:
			return fmt.Errorf("read moved keys of %s.%s: %w", b.Schema, b.Name, err)
		default:
			moved, err := parseMoved(entry.Value())
			if err != nil {
				return fmt.Errorf("%s holds %q: %w", movedKey(st.cfg.Group, b.OID), entry.Value(), err)
			}
			for _, keys := range moved {
				pending = pending || len(keys) > 0
			}
		}
	}
	if pending {
		if done := st.hub.takeEnd(b.OID); done != nil {
			done <- false
		}
		return nil
	}
	ch := &havenpb.Change{Op: havenpb.Op_OP_BACKFILL, Backfill: &havenpb.Backfill{Phase: havenpb.Backfill_PHASE_END, Schema: b.Schema, Name: b.Name, SourceOid: b.OID}}
	if _, err := st.addChange(ctx, nil, ch); err != nil {
		return err
	}
	delete(st.backfilling, b.OID)
	if len(st.backfilling) == 0 {
		st.touched = nil
	}
	if done := st.hub.takeEnd(b.OID); done != nil {
		st.txn.onPublished = append(st.txn.onPublished, func() { done <- true })
	}
	return nil
}

func (s *session) putBackfill(ctx context.Context, state backfillState) error {
	value, err := json.Marshal(state)
	if err != nil {
		return err
	}
	if _, err := s.state.Put(ctx, backfillStateKey(s.cfg.Group, state.OID), value); err != nil {
		return fmt.Errorf("record backfill state of %s.%s: %w", state.Schema, state.Name, err)
	}
	return nil
}

// backfills lists the group's unfinished backfills.
func (s *session) backfills(ctx context.Context) ([]backfillState, error) {
	lister, err := s.state.ListKeysFiltered(ctx, "backfill."+s.cfg.Group+".*")
	if err != nil {
		return nil, fmt.Errorf("list backfills: %w", err)
	}
	defer func() { _ = lister.Stop() }()
	var states []backfillState
	for key := range lister.Keys() {
		entry, err := s.state.Get(ctx, key)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", key, err)
		}
		var st backfillState
		if err := json.Unmarshal(entry.Value(), &st); err != nil {
			return nil, fmt.Errorf("%s in bucket %s holds %q: %w", key, entry.Bucket(), entry.Value(), err)
		}
		states = append(states, st)
	}
	return states, nil
}

// runBackfills copies the rows of every table in a backfill, one table at a
// time, until ctx ends; a failure ends the session through fail. A table
// the agent may not read holds only its own backfill (heldBackfill), which
// is tried again every heldRecheck.
func (s *session) runBackfills(ctx context.Context, fail func(error)) {
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	said := map[uint32]string{} // why each held backfill waits, as logged
	for {
		states, err := s.backfills(ctx)
		s.metrics.backfilling.Set(float64(len(states)))
		if err == nil && len(states) > 0 && conn == nil {
			conn, err = s.connectSource(ctx)
		}
		held := 0
		for _, state := range states {
			if err != nil {
				break
			}
			err = s.backfillTable(ctx, conn, state)
			var h *heldBackfill
			switch {
			case errors.As(err, &h):
				held, err = held+1, nil
				if why := h.Error(); said[state.OID] != why {
					said[state.OID] = why
					s.log.Error().Str("table", state.Schema+"."+state.Name).Dur("recheck", heldRecheck).Msg(why)
				}
			case err == nil && said[state.OID] != "":
				delete(said, state.OID)
				s.log.Info().Str("table", state.Schema+"."+state.Name).Msg("the agent may read the table now: its backfill ran")
			}
		}
		s.metrics.backfillsHeld.Set(float64(held))
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			fail(fmt.Errorf("backfill: %w", err))
			return
		}
		if len(states) > held {
			continue // one may have begun meanwhile
		}
		var recheck <-chan time.Time
		if held > 0 {
			recheck = time.After(heldRecheck)
		}
		select {
		case <-ctx.Done():
			return
		case <-s.hub.wake:
		case <-recheck:
		}
	}
}

// heldRecheck is how often a held backfill looks again whether the agent
// may read its table.
const heldRecheck = 5 * time.Second

// heldBackfill: the agent's role may not read every row of the table, so
// its backfill waits for a grant; the stream and other backfills go on.
type heldBackfill struct{ why *unreadable }

func (h *heldBackfill) Error() string {
	return fmt.Sprintf("a table's backfill waits, while the stream goes on: %s", h.why)
}

// backfillTable copies one table's rows, from where its state says.
func (s *session) backfillTable(ctx context.Context, conn *pgx.Conn, state backfillState) error {
	log := s.log.With().Str("table", state.Schema+"."+state.Name).Logger()
	u, err := unreadableTables(ctx, conn, []uint32{state.OID})
	if err != nil {
		return err
	}
	if u != nil {
		return &heldBackfill{u}
	}
	if err := waitVisible(ctx, conn, state.Xid); err != nil {
		return err
	}
	if err := waitForCommitting(ctx, conn); err != nil {
		return err
	}
	for {
		if err := s.takeMoved(ctx, &state); err != nil {
			return err
		}
		t, err := s.backfillTarget(ctx, conn, state.OID)
		if err != nil {
			return err
		}
		if t == nil {
			log.Warn().Msg("table dropped during its backfill; ending it")
			break
		}
		state.Schema, state.Name = t.schema, t.name // renamed meanwhile?
		if state.Exhausted && len(state.Retry) == 0 {
			ended, err := s.endBackfillIn(ctx, conn, state)
			if err != nil || ended {
				return err
			}
			continue // rows moved meanwhile: read them first
		}
		// Keys to read again go by their key, a thousand at a time at least.
		retry := state.Retry[:min(len(state.Retry), max(s.cfg.BackfillChunkRows, 1000))]
		chunk, rows, err := s.readChunk(ctx, conn, *t, state, retry)
		if err != nil {
			return err
		}
		if chunk.restarted {
			// A new key (another type, order or column): what was read by
			// the old one says nothing of the new one's order. Read again.
			log.Warn().Str("was", state.Key.Def).Str("now", chunk.key.Def).Msg("the table's key changed during its backfill: reading it again from its start")
			state.After, state.Exhausted, state.Retry = "", false, nil
		}
		state.Key, state.Until = chunk.key, chunk.until
		var result backfillResult
		select {
		case result = <-chunk.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		switch {
		case result.restart:
			log.Info().Str("key", chunk.key.Def).Msg("rows were updated under another key than the copy's while a chunk was read, so where they moved is unknown: reading the table again from its start")
			state.After, state.Until, state.Exhausted, state.Retry = "", "", false, nil
		case len(retry) > 0 && !chunk.restarted:
			state.Retry = append(state.Retry[len(retry):], result.dirty...)
		default:
			if len(rows) > 0 {
				state.After, _ = keyText(chunk.rel, chunk.key.Columns, rows[len(rows)-1])
			}
			state.Exhausted = len(rows) < s.cfg.BackfillChunkRows || chunk.until == ""
			state.Retry = append(state.Retry, result.dirty...)
		}
		state.Copied += int64(result.published)
		s.metrics.backfillRows.Add(float64(result.published))
		if err := s.putBackfill(ctx, state); err != nil {
			return err
		}
	}
	_, err = s.endBackfillIn(ctx, conn, state)
	return err
}

// takeMoved moves the keys the streamer recorded as moved into the keys
// to read again, saving them there before forgetting them. Only keys taken
// by the copy's key count: a row moved under another key is read by a copy
// from the table's start that sees the move, or one restarted for it. And
// until the first chunk, nothing is taken: that chunk reads from the start.
func (s *session) takeMoved(ctx context.Context, state *backfillState) error {
	if state.Key.Def == "" {
		return nil
	}
	name := movedKey(s.cfg.Group, state.OID)
	entry, err := s.state.Get(ctx, name)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", name, err)
	}
	moved, err := parseMoved(entry.Value())
	if err != nil {
		return fmt.Errorf("%s holds %q: %w", name, entry.Value(), err)
	}
	state.Retry = append(state.Retry, moved[state.Key.Def]...)
	state.Retry = append(state.Retry, moved[""]...)
	if err := s.putBackfill(ctx, *state); err != nil {
		return err
	}
	// Only what was read: keys added meanwhile stay for the next round.
	if err := s.state.Delete(ctx, name, jetstream.LastRevision(entry.Revision())); err != nil && !strings.Contains(err.Error(), "wrong last sequence") {
		return fmt.Errorf("clear %s: %w", name, err)
	}
	return nil
}

// backfillTarget looks a table up by OID (nil: it is gone).
func (s *session) backfillTarget(ctx context.Context, conn *pgx.Conn, oid uint32) (*table, error) {
	rows, err := conn.Query(ctx, `SELECT `+tableColumns+` FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1`, oid)
	if err != nil {
		return nil, fmt.Errorf("look up table %d: %w", oid, err)
	}
	tables, err := scanTables(rows)
	if err != nil || len(tables) == 0 {
		return nil, err
	}
	return &tables[0], nil
}

// waitVisible waits until transaction xid (32 bits, as pgoutput names it;
// 0: none) is visible to new snapshots. Decoding reads a transaction once
// its commit record is on disk, a moment before other sessions see what it
// did (before even pg_xact_status says it committed): a table it created
// is not there yet for them.
func waitVisible(ctx context.Context, conn *pgx.Conn, xid uint32) error {
	for xid != 0 {
		var visible bool
		if err := conn.QueryRow(ctx, visibleSQL, int64(xid), nil).Scan(&visible); err != nil {
			return fmt.Errorf("wait for transaction %d to be visible: %w", xid, err)
		}
		if visible {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
	return nil
}

// visibleSQL says whether a 32-bit transaction id $1 that has committed is
// visible to snapshot $2 (NULL: a new one); its epoch is the snapshot's
// xmax's, or the one before when $1 is past xmax's low 32 bits.
const visibleSQL = `SELECT pg_visible_in_snapshot(((((m.x >> 32) - CASE WHEN $1::bigint > (m.x & 4294967295) THEN 1 ELSE 0 END) << 32) | $1::bigint)::text::xid8, s)
	FROM coalesce($2::text::pg_snapshot, pg_current_snapshot()) s, LATERAL (SELECT pg_snapshot_xmax(s)::text::bigint) m(x)`

// waitForCommitting waits until every transaction that has committed but
// is still invisible to new snapshots (its commit record is written but it
// has not finished, such as one waiting for a synchronous standby) has
// become visible: from then on, every transaction decoded so far is visible
// to every snapshot. Transactions that commit meanwhile do not count: they
// are decoded later, and remembered.
func waitForCommitting(ctx context.Context, conn *pgx.Conn) error {
	var committing []string
	if err := conn.QueryRow(ctx, `SELECT coalesce(array_agg(x::text), '{}') FROM pg_snapshot_xip(pg_current_snapshot()) x WHERE pg_xact_status(x) = 'committed'`).
		Scan(&committing); err != nil {
		return fmt.Errorf("look for committing transactions: %w", err)
	}
	for len(committing) > 0 {
		var still int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_snapshot_xip(pg_current_snapshot()) x WHERE x::text = ANY($1)`, committing).
			Scan(&still); err != nil {
			return fmt.Errorf("look for committing transactions: %w", err)
		}
		if still == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}

// readChunk reads the next rows of t in key order after after (or the rows
// with the keys in retry), hands them to the streamer and emits their
// watermark, all in one transaction: the table cannot change shape between
// the read and the watermark.
func (s *session) readChunk(ctx context.Context, conn *pgx.Conn, t table, state backfillState, retry []string) (*backfillChunk, []*havenpb.Row, error) {
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	if err != nil {
		return nil, nil, fmt.Errorf("begin backfill chunk: %w", err)
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	// The lock first: the snapshot is taken by the next statement, after any
	// rewrite of the table that was running has finished (a rewrite is not
	// visible to older snapshots).
	if _, err := tx.Exec(ctx, "LOCK TABLE "+t.qualified()+" IN ACCESS SHARE MODE"); err != nil {
		return nil, nil, fmt.Errorf("lock %s: %w", t.qualified(), err)
	}
	var snapshot string
	var oid *uint32
	if err := tx.QueryRow(ctx, `SELECT pg_current_snapshot()::text, to_regclass($1)::oid`, t.qualified()).Scan(&snapshot, &oid); err != nil {
		return nil, nil, fmt.Errorf("take the chunk's snapshot: %w", err)
	}
	if oid == nil || *oid != t.oid {
		return nil, nil, fmt.Errorf("table %s was renamed or replaced while being locked; retrying", t.qualified())
	}
	rels, err := describeTables(ctx, tx, []table{t})
	if err != nil {
		return nil, nil, err
	}
	rel := rels[0]
	key, err := readKey(ctx, tx, t.oid)
	if err != nil {
		return nil, nil, err
	}
	if len(key.Columns) == 0 {
		return nil, nil, needsOperator("table %s has no primary key (or replica identity index) to copy its rows by, and its backfill is not finished: "+
			"add a primary key, or re-seed the group", t.qualified())
	}
	// The upserts find DR's row by the copy's key, whatever the table's
	// replica identity (FULL marks every column).
	for _, c := range rel.Columns {
		c.Key = slices.Contains(key.Columns, c.Name)
	}
	rel.ReplicaIdentity = "d"
	after, until := state.After, state.Until
	restarted := state.Key.Def != "" && key.Def != state.Key.Def
	if restarted {
		// Keys of another definition: start over.
		after, until, retry = "", "", nil
	}
	if until == "" && after == "" && len(retry) == 0 {
		// The first chunk: where the table ends now bounds the copy.
		if until, err = lastKey(ctx, tx, t, key); err != nil {
			return nil, nil, err
		}
	}
	var rows []*havenpb.Row
	parser := &copyRowParser{columns: len(rel.Columns), onRow: func(values []*havenpb.Datum) error {
		rows = append(rows, &havenpb.Row{Values: values})
		return nil
	}}
	if _, err := tx.Conn().PgConn().CopyTo(ctx, parser, chunkQuery(rel, key, t, after, until, retry, s.cfg.BackfillChunkRows)); err != nil {
		return nil, nil, fmt.Errorf("read a chunk of %s: %w", t.qualified(), err)
	}
	if err := parser.finish(); err != nil {
		return nil, nil, err
	}
	id := rand.Text()
	chunk := &backfillChunk{rel: rel, key: key, restarted: restarted, until: until, retry: retry, rows: rows, done: make(chan backfillResult, 1)}
	s.hub.mu.Lock()
	s.hub.chunks[id] = chunk
	s.hub.mu.Unlock()
	content, err := json.Marshal(backfillMessage{Rows: id, Snapshot: snapshot})
	if err == nil {
		_, err = tx.Exec(ctx, `SELECT pg_logical_emit_message(true, $1, $2::text)`, backfillPrefix(s.cfg.Group), string(content))
	}
	if err == nil {
		err = tx.Commit(ctx)
	}
	if err != nil {
		s.hub.take(id)
		return nil, nil, fmt.Errorf("emit the watermark of a chunk of %s: %w", t.qualified(), err)
	}
	return chunk, rows, nil
}

// chunkQuery selects up to limit rows after the key after, in key order,
// or the rows with the keys in retry. Key values are literals cast to
// their column's type: the key order is the table's own.
func chunkQuery(rel *havenpb.Relation, key backfillKey, t table, after, until string, retry []string, limit int) string {
	var cols, keyCols []string
	for _, c := range rel.Columns {
		cols = append(cols, pgx.Identifier{c.Name}.Sanitize())
	}
	for _, c := range key.Columns {
		keyCols = append(keyCols, pgx.Identifier{c}.Sanitize())
	}
	keyTypes := key.Types
	literals := func(key string) string {
		values := splitKey(key)
		parts := make([]string, len(values))
		for i, v := range values {
			parts[i] = quoteLiteral(v) + "::" + keyTypes[i]
		}
		return "(" + strings.Join(parts, ", ") + ")"
	}
	from := "ONLY " + t.qualified()
	if t.partitioned {
		from = t.qualified()
	}
	keys := "(" + strings.Join(keyCols, ", ") + ")"
	query := fmt.Sprintf("SELECT %s FROM %s", strings.Join(cols, ", "), from)
	switch {
	case len(retry) > 0:
		list := make([]string, len(retry))
		for i, k := range retry {
			list[i] = literals(k)
		}
		query += fmt.Sprintf(" WHERE %s IN (%s)", keys, strings.Join(list, ", "))
	default:
		var conds []string
		if after != "" {
			conds = append(conds, fmt.Sprintf("%s > %s", keys, literals(after)))
		}
		if until != "" {
			conds = append(conds, fmt.Sprintf("%s <= %s", keys, literals(until)))
		}
		if len(conds) > 0 {
			query += " WHERE " + strings.Join(conds, " AND ")
		}
		query += fmt.Sprintf(" ORDER BY %s LIMIT %d", strings.Join(keyCols, ", "), limit)
	}
	return "COPY (" + query + ") TO STDOUT"
}

// lastKey reads the table's largest key in the caller's snapshot ("" for
// an empty table).
func lastKey(ctx context.Context, tx pgx.Tx, t table, key backfillKey) (string, error) {
	cols := make([]string, len(key.Columns))
	for i, c := range key.Columns {
		cols[i] = pgx.Identifier{c}.Sanitize() + "::text"
	}
	desc := make([]string, len(key.Columns))
	for i, c := range key.Columns {
		desc[i] = pgx.Identifier{c}.Sanitize() + " DESC"
	}
	from := "ONLY " + t.qualified()
	if t.partitioned {
		from = t.qualified()
	}
	var values []string
	err := tx.QueryRow(ctx, fmt.Sprintf("SELECT ARRAY[%s] FROM %s ORDER BY %s LIMIT 1", strings.Join(cols, ", "), from, strings.Join(desc, ", "))).Scan(&values)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read the last key of %s: %w", t.qualified(), err)
	}
	return strings.Join(values, "\x00") + "\x00", nil
}

// endBackfillIn emits END and forgets the backfill once JetStream has it.
func (s *session) endBackfillIn(ctx context.Context, conn *pgx.Conn, state backfillState) (bool, error) {
	done := make(chan bool, 1)
	s.hub.mu.Lock()
	s.hub.ends[state.OID] = done
	s.hub.mu.Unlock()
	content, err := json.Marshal(backfillMessage{End: &backfillTable{OID: state.OID, Schema: state.Schema, Name: state.Name}})
	if err != nil {
		return false, err
	}
	if _, err := conn.Exec(ctx, `SELECT pg_logical_emit_message(true, $1, $2::text)`, backfillPrefix(s.cfg.Group), string(content)); err != nil {
		s.hub.takeEnd(state.OID)
		return false, fmt.Errorf("emit the end of the backfill of %s.%s: %w", state.Schema, state.Name, err)
	}
	var ended bool
	select {
	case ended = <-done:
	case <-ctx.Done():
		return false, ctx.Err()
	}
	if !ended {
		return false, nil
	}
	if err := s.state.Delete(ctx, backfillStateKey(s.cfg.Group, state.OID)); err != nil {
		return false, fmt.Errorf("forget the backfill of %s.%s: %w", state.Schema, state.Name, err)
	}
	s.log.Info().Str("table", state.Schema+"."+state.Name).Int64("rows", state.Copied).Msg("backfill complete: the table is replicated in full")
	return true, nil
}

// backfillMissing adds the selected tables that the group's publication
// lacks (--tables grew, or tables were made while no agent captured DDL),
// each in a transaction with its backfill's BEGIN, so their rows follow by
// backfill. It returns those it cannot backfill: no key to copy them by.
func (s *session) backfillMissing(ctx context.Context, selected []table, missing []string) ([]string, error) {
	var refused []string
	for _, name := range missing {
		i := slices.IndexFunc(selected, func(t table) bool { return t.schema+"."+t.name == name })
		if i < 0 {
			continue
		}
		t := selected[i]
		key, err := readKey(ctx, s.ctrl, t.oid)
		if err != nil {
			return nil, err
		}
		if len(key.Columns) == 0 {
			refused = append(refused, name)
			continue
		}
		content, err := json.Marshal(backfillMessage{Begin: &backfillTable{OID: t.oid, Schema: t.schema, Name: t.name,
			SchemaSQL: s.schemaScript(ctx, "--table="+t.qualified())}})
		if err != nil {
			return nil, err
		}
		err = pgx.BeginFunc(ctx, s.ctrl, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "ALTER PUBLICATION "+pgx.Identifier{wire.PublicationName(s.cfg.Group)}.Sanitize()+" ADD TABLE "+t.qualified()); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `SELECT pg_logical_emit_message(true, $1, $2::text)`, backfillPrefix(s.cfg.Group), string(content))
			return err
		})
		if err != nil {
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) && pgErr.Code == "42501" {
				return nil, needsOperator("add %s to publication %q: %v: %s", name, wire.PublicationName(s.cfg.Group), err, s.addTableFix(ctx, t))
			}
			return nil, fmt.Errorf("add %s to the group: %w", name, err)
		}
		s.log.Info().Str("table", name).Msg("table added to the group's publication; its rows are backfilled while the stream goes on")
	}
	return refused, nil
}

// addTableFix says what lets the agent's role add a table to its group's
// publication: owning both (or being a member of their owners), or being
// a superuser.
func (s *session) addTableFix(ctx context.Context, t table) string {
	var role, tableOwner, pubOwner string
	var ownsTable, ownsPub bool
	err := s.ctrl.QueryRow(ctx, `SELECT quote_ident(current_user), c.relowner::regrole::text, pg_has_role(c.relowner, 'USAGE'),
			p.pubowner::regrole::text, pg_has_role(p.pubowner, 'USAGE')
		FROM pg_class c, pg_publication p WHERE c.oid = $1 AND p.pubname = $2`, t.oid, wire.PublicationName(s.cfg.Group)).
		Scan(&role, &tableOwner, &ownsTable, &pubOwner, &ownsPub)
	if err != nil {
		return "adding a table takes owning it and the publication, or being a superuser"
	}
	var fixes []string
	if !ownsPub {
		fixes = append(fixes, fmt.Sprintf("the publication belongs to %s: as a superuser, run what haven agent --print-ddl-capture prints (it hands the publication to %s)", pubOwner, role))
	}
	if !ownsTable {
		fixes = append(fixes, fmt.Sprintf("the table belongs to %s: GRANT %s TO %s", tableOwner, tableOwner, role))
	}
	return strings.Join(append(fixes, "or run the agent as a superuser"), "; ")
}
