package replicator

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/haven-dr/haven/proto/havenpb"
)

// Runs: row changes of one table that commute with each other wait
// together and go to DR as one multi-row statement (an INSERT of many
// VALUES, an UPDATE or DELETE joined to a VALUES list), which costs the DR
// server a fraction of one statement per row.
//
// Changes of a table commute when they touch different rows, so a change
// whose row a waiting change also touches sends that change's run first;
// every change that cannot wait (a key update, an upsert, a table without
// a key) sends all of the table's runs first. Waiting changes of different
// tables commute too: DR apply runs with session_replication_role =
// replica, so foreign keys are not checked. Within a table, deletes go out
// before inserts: a row deleted on the source may have made room for a row
// with the same unique values inserted after. Updates wait only when they
// change no column of a DR unique or exclusion index other than the key
// (one multi-row UPDATE that swaps two rows' unique values fails on row
// order, which a source that ran them one by one did not see), so they
// commute with every other waiting change and go out on their own.

// maxRunRows bounds the rows of one multi-row statement (PostgreSQL takes
// at most 65535 parameters).
const maxRunRows = 128

// run is the waiting changes of one table and one statement shape.
type run struct {
	shape   *shape
	perRow  int // parameters per row
	params  [][]byte
	changes []*havenpb.Change
	keys    []string // the rows its changes touch, where they have a key
	// tolerateMissing: the table is being backfilled.
	tolerateMissing bool
}

func (r *run) rows() int { return len(r.changes) }

// tableRuns is what waits for one table (one relation shape).
type tableRuns struct {
	rel  *havenpb.Relation
	keys map[string]*run // the run of each row a waiting change touches
	runs []*run
}

// rowKey is the text of a row's identity columns, or false when the table
// has no key or the row lacks a value for one.
func rowKey(rel *havenpb.Relation, row *havenpb.Row) (string, bool) {
	if row == nil || (rel.ReplicaIdentity != "d" && rel.ReplicaIdentity != "i") {
		return "", false
	}
	var b strings.Builder
	n := 0
	for i, c := range rel.Columns {
		if !c.Key {
			continue
		}
		if i >= len(row.Values) || row.Values[i].Kind != havenpb.DatumKind_DATUM_TEXT {
			return "", false
		}
		if n > 0 {
			b.WriteByte(0) // text values never hold NUL
		}
		b.Write(row.Values[i].Text)
		n++
	}
	return b.String(), n > 0
}

// waitable says whether a change may wait in a run, and the identity of
// its row ("" for an insert into a table without a key, whose runs every
// other change of the table sends first).
func (a *applier) waitable(ctx context.Context, rel *havenpb.Relation, relKey string, ch *havenpb.Change, st statement) (key string, ok bool, err error) {
	if st.rows == nil || len(st.params) == 0 {
		return "", false, nil
	}
	switch ch.Op {
	case havenpb.Op_OP_INSERT:
		key, _ = rowKey(rel, ch.New)
		return key, true, nil
	case havenpb.Op_OP_DELETE:
		key, ok = rowKey(rel, ch.Old)
		return key, ok, nil
	case havenpb.Op_OP_UPDATE:
		if ch.Old != nil || a.partitioned[relKey] {
			return "", false, nil
		}
		if key, ok = rowKey(rel, ch.New); !ok {
			return "", false, nil
		}
		unique, err := a.uniqueColumns(ctx, rel, a.targetOID[relKey])
		if err != nil {
			return "", false, err
		}
		for _, c := range st.setColumns {
			if unique[c] || unique["*"] {
				return "", false, nil
			}
		}
		return key, true, nil
	}
	return "", false, nil
}

// wait queues a change in its table's runs; false when it cannot wait (the
// table's runs were sent first, and it is to be sent on its own).
func (a *applier) wait(ctx context.Context, rel *havenpb.Relation, relKey string, ch *havenpb.Change, st statement) (bool, error) {
	key, ok, err := a.waitable(ctx, rel, relKey, ch, st)
	if err != nil {
		return false, err
	}
	if !ok {
		return false, a.sendRuns(ctx, relKey)
	}
	t := a.runs[relKey]
	if t == nil {
		t = &tableRuns{rel: rel, keys: map[string]*run{}}
		a.runs[relKey] = t
	} else if r := t.keys[key]; r != nil {
		if err := a.sendRun(ctx, t, r); err != nil {
			return false, err
		}
	}
	var r *run
	for _, candidate := range t.runs {
		if candidate.shape == st.shape {
			r = candidate
			break
		}
	}
	if r == nil {
		// Room for a few rows up front: runs often grow to many.
		r = &run{shape: st.shape, perRow: len(st.params), tolerateMissing: a.backfilling[a.targetOID[relKey]] != "",
			params: make([][]byte, 0, 16*len(st.params)), changes: make([]*havenpb.Change, 0, 16)}
		t.runs = append(t.runs, r)
	}
	r.params = append(r.params, st.params...)
	r.changes = append(r.changes, ch)
	if key != "" {
		t.keys[key] = r
		r.keys = append(r.keys, key)
	}
	if r.rows() >= min(maxRunRows, 65535/r.perRow) {
		return true, a.sendRun(ctx, t, r)
	}
	return true, nil
}

// sendRun queues one run of a table in the batch, after the table's
// deletes when it inserts. The table's other runs go on waiting: their
// changes touch other rows, and commute with the run's.
func (a *applier) sendRun(ctx context.Context, t *tableRuns, r *run) error {
	if r.changes[0].Op == havenpb.Op_OP_INSERT {
		for _, d := range slices.Clone(t.runs) {
			if d.changes[0].Op == havenpb.Op_OP_DELETE {
				if err := a.sendRun(ctx, t, d); err != nil {
					return err
				}
			}
		}
	}
	t.runs = slices.DeleteFunc(t.runs, func(w *run) bool { return w == r })
	for _, key := range r.keys {
		delete(t.keys, key)
	}
	return a.queueRun(ctx, t.rel, r)
}

// sendRuns queues the runs of one table in the batch: deletes, updates,
// then inserts.
func (a *applier) sendRuns(ctx context.Context, relKey string) error {
	t := a.runs[relKey]
	if t == nil {
		return nil
	}
	delete(a.runs, relKey)
	for _, op := range []havenpb.Op{havenpb.Op_OP_DELETE, havenpb.Op_OP_UPDATE, havenpb.Op_OP_INSERT} {
		for _, r := range t.runs {
			if r.changes[0].Op != op {
				continue
			}
			if err := a.queueRun(ctx, t.rel, r); err != nil {
				return err
			}
		}
	}
	return nil
}

// sendAllRuns queues every waiting change in the batch.
func (a *applier) sendAllRuns(ctx context.Context) error {
	for relKey := range a.runs {
		if err := a.sendRuns(ctx, relKey); err != nil {
			return err
		}
	}
	return nil
}

// queueRun queues one run as statements of power-of-two sizes, so that a
// shape needs few prepared statements.
func (a *applier) queueRun(ctx context.Context, rel *havenpb.Relation, r *run) error {
	most := min(maxRunRows, 65535/r.perRow)
	for done := 0; done < r.rows(); {
		size := 1
		for size*2 <= min(r.rows()-done, most) {
			size *= 2
		}
		key, sql := r.shape.key, r.shape.sql
		if size > 1 {
			key = r.shape.key + "#" + strconv.Itoa(size)
			sql = func() string { return r.shape.rows(size) }
		}
		p, err := a.prepare(ctx, key, sql)
		if err != nil {
			return err
		}
		a.queuePrepared(p, r.params[done*r.perRow:(done+size)*r.perRow], batchEntry{matchesRow: r.shape.matchesRow, insertsRows: r.shape.insertsRows, tolerateMissing: r.tolerateMissing,
			table: rel.Schema + "." + rel.Name, rel: rel, changes: r.changes[done : done+size]})
		a.batchRows += size
		done += size
	}
	return nil
}

// uniqueColumns names the columns of a DR table whose update could clash
// with another row's: those of its unique and exclusion indexes other than
// the key's ("*" for all of them when an index has expressions or a
// predicate, or a generated column: the stream does not carry it, and it
// changes with the columns it is computed from). Cached per table until
// DDL is replayed.
func (a *applier) uniqueColumns(ctx context.Context, rel *havenpb.Relation, oid uint32) (map[string]bool, error) {
	if cols, ok := a.unique[oid]; ok {
		return cols, nil
	}
	if err := a.settle(); err != nil {
		return nil, err
	}
	rows, err := a.conn.Query(ctx, `SELECT i.indexprs IS NOT NULL OR i.indpred IS NOT NULL
			OR EXISTS (SELECT FROM pg_attribute WHERE attrelid = i.indrelid AND attnum = ANY(i.indkey) AND attgenerated <> ''),
		ARRAY(SELECT attname::text FROM pg_attribute WHERE attrelid = i.indrelid AND attnum = ANY(i.indkey) AND attnum > 0 ORDER BY attname)
		FROM pg_index i WHERE i.indrelid = $1 AND (i.indisunique OR i.indisexclusion)`, oid)
	if err != nil {
		return nil, fmt.Errorf("read the unique indexes of %s.%s on DR: %w", rel.Schema, rel.Name, err)
	}
	defer rows.Close()
	var key []string
	for _, c := range rel.Columns {
		if c.Key {
			key = append(key, c.Name)
		}
	}
	cols := map[string]bool{}
	for rows.Next() {
		var partial bool
		var names []string
		if err := rows.Scan(&partial, &names); err != nil {
			return nil, fmt.Errorf("read the unique indexes of %s.%s on DR: %w", rel.Schema, rel.Name, err)
		}
		if partial {
			cols["*"] = true
			continue
		}
		if sameSet(names, key) {
			continue
		}
		for _, n := range names {
			cols[n] = true
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read the unique indexes of %s.%s on DR: %w", rel.Schema, rel.Name, err)
	}
	a.unique[oid] = cols
	return cols, nil
}

func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	in := make(map[string]bool, len(a))
	for _, s := range a {
		in[s] = true
	}
	for _, s := range b {
		if !in[s] {
			return false
		}
	}
	return true
}
