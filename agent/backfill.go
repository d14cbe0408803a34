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
	"github.com/nats-io/nats.go/jetstream"

	"github.com/haven-dr/haven/proto/havenpb"
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
// Progress lives in the HAVEN_STATE bucket, written only after JetStream
// acknowledged the chunk: a restart goes on from the last chunk in the stream.

// backfillPrefix is the logical-message prefix of a group's backfill
// messages; ddlCaptureSQL writes it too.
func backfillPrefix(group string) string { return "haven.backfill." + group }

// backfillKey is a table's backfill state in the state bucket.
func backfillKey(group string, oid uint32) string {
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
	// After is the key of the last row read in key order ("" before the
	// first chunk); Exhausted is set once a chunk came back short.
	After     string `json:"after,omitempty"`
	Exhausted bool   `json:"exhausted,omitempty"`
	// Retry holds keys to read again.
	Retry  []string `json:"retry,omitempty"`
	Copied int64    `json:"copied"`
}

// backfillChunk is a chunk of rows handed from the worker to the streamer.
type backfillChunk struct {
	rel  *havenpb.Relation
	rows []*havenpb.Row
	done chan backfillResult
}

// backfillResult is what became of a chunk, once JetStream has it.
type backfillResult struct {
	published int
	dirty     []string // keys left out, to read again
}

// backfillHub is what the worker and the streamer share.
type backfillHub struct {
	mu     sync.Mutex
	chunks map[string]*backfillChunk
	ends   map[uint32]chan struct{}
	wake   chan struct{} // a backfill began
}

func newBackfillHub() *backfillHub {
	return &backfillHub{chunks: map[string]*backfillChunk{}, ends: map[uint32]chan struct{}{}, wake: make(chan struct{}, 1)}
}

func (h *backfillHub) take(id string) *backfillChunk {
	h.mu.Lock()
	defer h.mu.Unlock()
	c := h.chunks[id]
	delete(h.chunks, id)
	return c
}

func (h *backfillHub) takeEnd(oid uint32) chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	c := h.ends[oid]
	delete(h.ends, oid)
	return c
}

// keyText joins a row's key values into one comparable string, or reports
// false when a key value did not come (an unchanged TOASTed key).
func keyText(rel *havenpb.Relation, row *havenpb.Row) (string, bool) {
	var b strings.Builder
	for i, c := range rel.Columns {
		if !c.Key {
			continue
		}
		if i >= len(row.Values) || row.Values[i].Kind != havenpb.DatumKind_DATUM_TEXT {
			return "", false
		}
		b.Write(row.Values[i].Text)
		b.WriteByte(0)
	}
	return b.String(), true
}

// splitKey undoes keyText.
func splitKey(key string) []string { return strings.Split(strings.TrimSuffix(key, "\x00"), "\x00") }

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
	whole map[uint32]bool // truncated, or a key that did not come
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
	if !st.backfilling[rel.Id] {
		return
	}
	t := st.txn
	if t.touched == nil {
		t.touched = &touched{xid: t.xid}
	}
	for _, row := range []*havenpb.Row{ch.Old, ch.New} {
		if row != nil {
			key, ok := keyText(rel, row)
			t.touched.add(rel.Id, key, ok)
		}
	}
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
		Schema: b.Schema, Name: b.Name, SchemaSql: b.SchemaSQL}}
	publishing, err := st.addChange(ctx, nil, ch)
	if err != nil {
		return err
	}
	if publishing {
		state := backfillState{OID: b.OID, Schema: b.Schema, Name: b.Name, BeganLSN: uint64(st.txn.commitLSN)}
		if err := st.putBackfill(ctx, state); err != nil {
			return err
		}
		st.log.Info().Str("table", b.Schema+"."+b.Name).Stringer("commit_lsn", st.txn.commitLSN).
			Msg("table joined the group with rows in it: backfilling them while the stream goes on")
		select {
		case st.hub.wake <- struct{}{}:
		default:
		}
	} else if _, err := st.state.Get(ctx, backfillKey(st.cfg.Group, b.OID)); err != nil {
		// Published before a restart and finished since.
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil
		}
		return fmt.Errorf("read backfill state of %s.%s: %w", b.Schema, b.Name, err)
	}
	st.backfilling[b.OID] = true
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
	dirty := map[string]bool{}
	whole := false
	kept := st.touched[:0]
	for _, t := range st.touched {
		if snap.sees(t.xid) {
			continue // visible to this and every later snapshot
		}
		kept = append(kept, t)
		for k := range t.keys[oid] {
			dirty[k] = true
		}
		whole = whole || t.whole[oid]
	}
	st.touched = kept
	result := backfillResult{}
	for _, row := range chunk.rows {
		key, _ := keyText(chunk.rel, row)
		if whole || dirty[key] {
			result.dirty = append(result.dirty, key)
			continue
		}
		if _, err := st.addChange(ctx, []*havenpb.Relation{chunk.rel}, &havenpb.Change{Op: havenpb.Op_OP_UPSERT, RelationId: oid, New: row}); err != nil {
			return err
		}
		result.published++
	}
	st.txn.onPublished = append(st.txn.onPublished, func() { chunk.done <- result })
	return nil
}

// endBackfill publishes END; the worker forgets the backfill once JetStream
// has it.
func (st *streamer) endBackfill(ctx context.Context, b *backfillTable) error {
	ch := &havenpb.Change{Op: havenpb.Op_OP_BACKFILL, Backfill: &havenpb.Backfill{Phase: havenpb.Backfill_PHASE_END, Schema: b.Schema, Name: b.Name}}
	if _, err := st.addChange(ctx, nil, ch); err != nil {
		return err
	}
	delete(st.backfilling, b.OID)
	if len(st.backfilling) == 0 {
		st.touched = nil
	}
	if done := st.hub.takeEnd(b.OID); done != nil {
		st.txn.onPublished = append(st.txn.onPublished, func() { close(done) })
	}
	return nil
}

func (s *session) putBackfill(ctx context.Context, state backfillState) error {
	value, err := json.Marshal(state)
	if err != nil {
		return err
	}
	if _, err := s.state.Put(ctx, backfillKey(s.cfg.Group, state.OID), value); err != nil {
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
// time, until ctx ends; a failure ends the session through fail.
func (s *session) runBackfills(ctx context.Context, fail func(error)) {
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	for {
		states, err := s.backfills(ctx)
		s.metrics.backfilling.Set(float64(len(states)))
		if err == nil && len(states) > 0 && conn == nil {
			conn, err = s.connectSource(ctx)
		}
		for _, state := range states {
			if err != nil {
				break
			}
			err = s.backfillTable(ctx, conn, state)
		}
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			fail(fmt.Errorf("backfill: %w", err))
			return
		}
		if len(states) > 0 {
			continue // one may have begun meanwhile
		}
		select {
		case <-ctx.Done():
			return
		case <-s.hub.wake:
		}
	}
}

// backfillTable copies one table's rows, from where its state says.
func (s *session) backfillTable(ctx context.Context, conn *pgx.Conn, state backfillState) error {
	log := s.log.With().Str("table", state.Schema+"."+state.Name).Logger()
	if err := waitForCommitting(ctx, conn); err != nil {
		return err
	}
	started := time.Now()
	for !state.Exhausted || len(state.Retry) > 0 {
		t, err := s.backfillTarget(ctx, conn, state.OID)
		if err != nil {
			return err
		}
		if t == nil {
			log.Warn().Msg("table dropped during its backfill; ending it")
			break
		}
		if !t.hasKey || t.replicaIdentity == "f" {
			return needsOperator("table %s lost the primary key its backfill copies by (or has REPLICA IDENTITY FULL): restore it, or re-seed the group", t.qualified())
		}
		state.Schema, state.Name = t.schema, t.name // renamed meanwhile?
		retry := state.Retry[:min(len(state.Retry), s.cfg.BackfillChunkRows)]
		chunk, rows, err := s.readChunk(ctx, conn, *t, state.After, retry)
		if err != nil {
			return err
		}
		var result backfillResult
		select {
		case result = <-chunk.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		if len(retry) > 0 {
			state.Retry = append(state.Retry[len(retry):], result.dirty...)
		} else {
			if len(rows) > 0 {
				state.After, _ = keyText(chunk.rel, rows[len(rows)-1])
			}
			state.Exhausted = len(rows) < s.cfg.BackfillChunkRows
			state.Retry = append(state.Retry, result.dirty...)
		}
		state.Copied += int64(result.published)
		s.metrics.backfillRows.Add(float64(result.published))
		if err := s.putBackfill(ctx, state); err != nil {
			return err
		}
	}
	if err := s.endBackfillIn(ctx, conn, state); err != nil {
		return err
	}
	log.Info().Int64("rows", state.Copied).Dur("took", time.Since(started)).Msg("backfill complete: the table is replicated in full")
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
func (s *session) readChunk(ctx context.Context, conn *pgx.Conn, t table, after string, retry []string) (*backfillChunk, []*havenpb.Row, error) {
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
	var rows []*havenpb.Row
	parser := &copyRowParser{columns: len(rel.Columns), onRow: func(values []*havenpb.Datum) error {
		rows = append(rows, &havenpb.Row{Values: values})
		return nil
	}}
	if _, err := tx.Conn().PgConn().CopyTo(ctx, parser, chunkQuery(rel, t, after, retry, s.cfg.BackfillChunkRows)); err != nil {
		return nil, nil, fmt.Errorf("read a chunk of %s: %w", t.qualified(), err)
	}
	if err := parser.finish(); err != nil {
		return nil, nil, err
	}
	id := rand.Text()
	chunk := &backfillChunk{rel: rel, rows: rows, done: make(chan backfillResult, 1)}
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
func chunkQuery(rel *havenpb.Relation, t table, after string, retry []string, limit int) string {
	var cols, keyCols, keyTypes []string
	for _, c := range rel.Columns {
		ident := pgx.Identifier{c.Name}.Sanitize()
		cols = append(cols, ident)
		if c.Key {
			keyCols = append(keyCols, ident)
			keyTypes = append(keyTypes, c.Type)
		}
	}
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
	case after != "":
		query += fmt.Sprintf(" WHERE %s > %s ORDER BY %s LIMIT %d", keys, literals(after), strings.Join(keyCols, ", "), limit)
	default:
		query += fmt.Sprintf(" ORDER BY %s LIMIT %d", strings.Join(keyCols, ", "), limit)
	}
	return "COPY (" + query + ") TO STDOUT"
}

// endBackfillIn emits END and forgets the backfill once JetStream has it.
func (s *session) endBackfillIn(ctx context.Context, conn *pgx.Conn, state backfillState) error {
	done := make(chan struct{})
	s.hub.mu.Lock()
	s.hub.ends[state.OID] = done
	s.hub.mu.Unlock()
	content, err := json.Marshal(backfillMessage{End: &backfillTable{OID: state.OID, Schema: state.Schema, Name: state.Name}})
	if err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, `SELECT pg_logical_emit_message(true, $1, $2::text)`, backfillPrefix(s.cfg.Group), string(content)); err != nil {
		s.hub.takeEnd(state.OID)
		return fmt.Errorf("emit the end of the backfill of %s.%s: %w", state.Schema, state.Name, err)
	}
	select {
	case <-done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if err := s.state.Delete(ctx, backfillKey(s.cfg.Group, state.OID)); err != nil {
		return fmt.Errorf("forget the backfill of %s.%s: %w", state.Schema, state.Name, err)
	}
	return nil
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
		if !t.hasKey || t.replicaIdentity == "f" {
			refused = append(refused, name)
			continue
		}
		content, err := json.Marshal(backfillMessage{Begin: &backfillTable{OID: t.oid, Schema: t.schema, Name: t.name,
			SchemaSQL: s.schemaScript(ctx, "--table="+t.qualified())}})
		if err != nil {
			return nil, err
		}
		err = pgx.BeginFunc(ctx, s.ctrl, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "ALTER PUBLICATION "+pgx.Identifier{PublicationName(s.cfg.Group)}.Sanitize()+" ADD TABLE "+t.qualified()); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `SELECT pg_logical_emit_message(true, $1, $2::text)`, backfillPrefix(s.cfg.Group), string(content))
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("add %s to the group: %w", name, err)
		}
		s.log.Info().Str("table", name).Msg("table added to the group's publication; its rows are backfilled while the stream goes on")
	}
	return refused, nil
}
