package replicator

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/haven-dr/haven/internal/natstest"
	"github.com/haven-dr/haven/internal/pgtest"
	"github.com/haven-dr/haven/proto/havenpb"
)

var (
	peopleRelation = &havenpb.Relation{Id: 16401, Schema: "public", Name: "people", ReplicaIdentity: "d", Columns: []*havenpb.Column{
		{Name: "id", Type: "bigint", TypeOid: 20, TypeModifier: -1, Key: true, NotNull: true},
		{Name: "email", Type: "text", TypeOid: 25, TypeModifier: -1},
	}}
	dealsRelation = &havenpb.Relation{Id: 16402, Schema: "crm", Name: "deals", ReplicaIdentity: "d", Columns: []*havenpb.Column{
		{Name: "region", Type: "character(2)", TypeOid: 1042, TypeModifier: 6, Key: true, NotNull: true},
		{Name: "id", Type: "integer", TypeOid: 23, TypeModifier: -1, Key: true, NotNull: true},
		{Name: "stage", Type: "crm.stage", TypeOid: 90001, TypeModifier: -1},
		{Name: "amount", Type: "numeric(12,2)", TypeOid: 1700, TypeModifier: 786438},
		{Name: "tags", Type: "text[]", TypeOid: 1009, TypeModifier: -1},
	}}
	// handlesRelation: DR's table also has a generated column, unique,
	// which the stream does not carry.
	handlesRelation = &havenpb.Relation{Id: 16403, Schema: "public", Name: "handles", ReplicaIdentity: "d", Columns: []*havenpb.Column{
		{Name: "id", Type: "bigint", TypeOid: 20, TypeModifier: -1, Key: true, NotNull: true},
		{Name: "handle", Type: "text", TypeOid: 25, TypeModifier: -1},
	}}
)

func row(values ...string) *havenpb.Row {
	r := &havenpb.Row{}
	for _, v := range values {
		if v == "NULL" {
			r.Values = append(r.Values, &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_NULL})
		} else {
			r.Values = append(r.Values, text(v))
		}
	}
	return r
}

func change(op havenpb.Op, rel *havenpb.Relation, oldRow, newRow *havenpb.Row) *havenpb.Change {
	return &havenpb.Change{Op: op, RelationId: rel.Id, Old: oldRow, New: newRow}
}

// TestRunsApplyInTheSourcesOrder: changes batched into multi-row
// statements leave DR exactly as applying them one by one would, for a
// random mix of inserts, updates and deletes that keep touching the same
// rows, for composite keys of several types, and for updates that move
// values of a unique column DR has between rows or frees them for inserts.
func TestRunsApplyInTheSourcesOrder(t *testing.T) {
	pg := pgtest.New(t)
	ns := natstest.New(t)
	const group = "runs"
	if err := pg.CreateDatabase(t.Context(), group); err != nil {
		t.Fatal(err)
	}
	if err := pg.Exec(t.Context(), group, `CREATE TABLE items (id bigint PRIMARY KEY, note text);
		CREATE TABLE people (id bigint PRIMARY KEY, email text UNIQUE);
		CREATE SCHEMA crm; CREATE TYPE crm.stage AS ENUM ('lead', 'won', 'lost');
		CREATE TABLE crm.deals (region char(2), id int, stage crm.stage, amount numeric(12,2), tags text[], PRIMARY KEY (region, id));
		CREATE TABLE handles (id bigint PRIMARY KEY, handle text, folded text GENERATED ALWAYS AS (lower(handle)) STORED UNIQUE)`); err != nil {
		t.Fatal(err)
	}
	f := newFeed(t, ns, group)
	begin := chunk(group, havenpb.Kind_KIND_SNAPSHOT_BEGIN, 0x1000)
	begin.Relations = []*havenpb.Relation{itemsRelation, peopleRelation, dealsRelation, handlesRelation}
	f.publish(begin)
	f.publish(chunk(group, havenpb.Kind_KIND_SNAPSHOT_END, 0x1000))

	lsn := uint64(0x2000)
	publish := func(changes ...*havenpb.Change) {
		c := chunk(group, havenpb.Kind_KIND_TRANSACTION, lsn)
		c.Xid = uint32(lsn)
		c.Relations = []*havenpb.Relation{itemsRelation, peopleRelation, dealsRelation, handlesRelation}
		c.Changes = changes
		f.publish(c)
		lsn += 0x100
	}

	// items: random changes over few keys, so that they keep meeting rows
	// that waiting changes touch; model holds what DR must end with.
	rng := rand.New(rand.NewPCG(1, 2))
	model := map[int]string{}
	for txn := range 400 {
		var changes []*havenpb.Change
		for n := range 1 + rng.IntN(8) {
			id := 1 + rng.IntN(60)
			note := fmt.Sprintf("t%d.%d", txn, n)
			key := strconv.Itoa(id)
			_, present := model[id]
			switch {
			case !present:
				changes = append(changes, change(havenpb.Op_OP_INSERT, itemsRelation, nil, row(key, note)))
				model[id] = note
			case rng.IntN(3) == 0:
				changes = append(changes, change(havenpb.Op_OP_DELETE, itemsRelation, row(key, "NULL"), nil))
				delete(model, id)
			default:
				changes = append(changes, change(havenpb.Op_OP_UPDATE, itemsRelation, nil, row(key, note)))
				model[id] = note
			}
		}
		publish(changes...)
	}
	// More rows than one statement takes: 128 + 128 + 32 + 8 + 4 + 1.
	var many []*havenpb.Change
	for id := 1000; id < 1301; id++ {
		many = append(many, change(havenpb.Op_OP_INSERT, itemsRelation, nil, row(strconv.Itoa(id), "many")))
		model[id] = "many"
	}
	publish(many...)

	// people: a rotation of unique emails, valid only one row at a time.
	emails := map[int]string{}
	var people []*havenpb.Change
	for id := 1; id <= 5; id++ {
		emails[id] = fmt.Sprintf("p%d@example.com", id)
		people = append(people, change(havenpb.Op_OP_INSERT, peopleRelation, nil, row(strconv.Itoa(id), emails[id])))
	}
	publish(people...)
	people = []*havenpb.Change{change(havenpb.Op_OP_UPDATE, peopleRelation, nil, row("5", "moving"))}
	for id := 4; id >= 1; id-- {
		people = append(people, change(havenpb.Op_OP_UPDATE, peopleRelation, nil, row(strconv.Itoa(id), emails[id+1])))
	}
	people = append(people, change(havenpb.Op_OP_UPDATE, peopleRelation, nil, row("5", emails[1])))
	publish(people...)
	// An email freed by a delete and taken by an insert whose run goes out
	// before the transaction ends (the row is deleted again): the delete
	// must reach DR first.
	publish(change(havenpb.Op_OP_DELETE, peopleRelation, row("1", "NULL"), nil),
		change(havenpb.Op_OP_INSERT, peopleRelation, nil, row("6", emails[2])),
		change(havenpb.Op_OP_DELETE, peopleRelation, row("6", "NULL"), nil),
		change(havenpb.Op_OP_INSERT, peopleRelation, nil, row("7", emails[2])))

	// handles: an update that takes the generated unique value a delete
	// frees must follow the delete, also when the update's row is touched
	// again before the transaction ends.
	publish(change(havenpb.Op_OP_INSERT, handlesRelation, nil, row("1", "a")),
		change(havenpb.Op_OP_INSERT, handlesRelation, nil, row("2", "B")))
	publish(change(havenpb.Op_OP_DELETE, handlesRelation, row("2", "NULL"), nil),
		change(havenpb.Op_OP_UPDATE, handlesRelation, nil, row("1", "b")),
		change(havenpb.Op_OP_UPDATE, handlesRelation, nil, row("1", "c")))

	// crm.deals: composite keys of char(2) and int, an enum of another
	// schema, numeric and arrays, updated and deleted in runs.
	var deals []*havenpb.Change
	for id := range 20 {
		deals = append(deals, change(havenpb.Op_OP_INSERT, dealsRelation, nil, row("eu", strconv.Itoa(id), "lead", "10.50", `{a,"b c"}`)),
			change(havenpb.Op_OP_INSERT, dealsRelation, nil, row("us", strconv.Itoa(id), "lead", "1.00", "NULL")))
	}
	publish(deals...)
	deals = nil
	for id := range 20 {
		if id%2 == 0 {
			deals = append(deals, change(havenpb.Op_OP_UPDATE, dealsRelation, nil, row("eu", strconv.Itoa(id), "won", "99.99", "{}")))
		} else {
			deals = append(deals, change(havenpb.Op_OP_DELETE, dealsRelation, row("us", strconv.Itoa(id), "NULL", "NULL", "NULL"), nil))
		}
	}
	publish(deals...)

	s, _, _ := startStandby(t, pg.URL(group), ns.URL(), group)
	dr, err := pgx.Connect(t.Context(), pg.URL(group))
	if err != nil {
		t.Fatal(err)
	}
	defer dr.Close(context.Background())
	waitFor(t, 60*time.Second, "the last deals change on DR", func() bool {
		if err := s.Healthy(); err != nil && strings.Contains(err.Error(), "apply stopped") {
			t.Fatal(err)
		}
		var n int
		_ = dr.QueryRow(t.Context(), `SELECT count(*) FROM crm.deals WHERE stage = 'won'`).Scan(&n)
		return n == 10
	})

	var want []string
	for id, note := range model {
		want = append(want, fmt.Sprintf("%d:%s", id, note))
	}
	slices.Sort(want)
	got := notes(t, pg.URL(group))
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("items on DR differ from the source's sequence:\n got %d rows %.300v\nwant %d rows %.300v", len(got), got, len(want), want)
	}
	var rotated string
	if err := pgxQueryRow(t, pg.URL(group), `SELECT string_agg(id || '=' || email, ' ' ORDER BY id) FROM people`).Scan(&rotated); err != nil {
		t.Fatal(err)
	}
	if want := "2=p3@example.com 3=p4@example.com 4=p5@example.com 5=p1@example.com 7=p2@example.com"; rotated != want {
		t.Errorf("people on DR: %s, want %s", rotated, want)
	}
	var handles string
	if err := pgxQueryRow(t, pg.URL(group), `SELECT string_agg(id || '=' || handle, ' ' ORDER BY id) FROM handles`).Scan(&handles); err != nil {
		t.Fatal(err)
	}
	if handles != "1=c" {
		t.Errorf("handles on DR: %s, want 1=c", handles)
	}
	var dealsText string
	if err := pgxQueryRow(t, pg.URL(group), `SELECT string_agg(format('%s/%s/%s/%s/%s', region, id, stage, amount, tags), ' ' ORDER BY region, id)
		FROM crm.deals WHERE id < 4`).Scan(&dealsText); err != nil {
		t.Fatal(err)
	}
	if want := `eu/0/won/99.99/{} eu/1/lead/10.50/{a,"b c"} eu/2/won/99.99/{} eu/3/lead/10.50/{a,"b c"} us/0/lead/1.00/ us/2/lead/1.00/`; dealsText != want {
		t.Errorf("crm.deals on DR:\n got %s\nwant %s", dealsText, want)
	}
}

// TestDriftInARunNamesTheMissingRow: an update batched with others that
// finds no row on DR is reported by its own key, once.
func TestDriftInARunNamesTheMissingRow(t *testing.T) {
	pg := pgtest.New(t)
	ns := natstest.New(t)
	const group = "drift"
	if err := pg.CreateDatabase(t.Context(), group); err != nil {
		t.Fatal(err)
	}
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	var rows []*havenpb.Change
	for id := 10; id < 50; id++ {
		rows = append(rows, insert(strconv.Itoa(id), "before"))
	}
	f.publish(f.txn(0x3000, rows...))
	_, logs, reg := startStandby(t, pg.URL(group), ns.URL(), group)
	waitFor(t, 30*time.Second, "the rows on DR", func() bool { return len(notes(t, pg.URL(group))) == 42 })
	if err := pgxQueryRow(t, pg.URL(group)+"&default_transaction_read_only=off", `DELETE FROM items WHERE id = 33 RETURNING 1`).Scan(new(int)); err != nil {
		t.Fatal(err)
	}
	var updates []*havenpb.Change
	for id := 10; id < 50; id++ {
		updates = append(updates, change(havenpb.Op_OP_UPDATE, itemsRelation, nil, row(strconv.Itoa(id), "after")))
	}
	f.publish(f.txn(0x4000, updates...))
	dr, err := pgx.Connect(t.Context(), pg.URL(group))
	if err != nil {
		t.Fatal(err)
	}
	defer dr.Close(context.Background())
	waitFor(t, 30*time.Second, "the updates on DR", func() bool {
		var n int
		_ = dr.QueryRow(t.Context(), `SELECT count(*) FROM items WHERE note = 'after'`).Scan(&n)
		return n == 39
	})
	waitFor(t, 10*time.Second, "the drift to be counted", func() bool { return metric(reg, "haven_standby_missing_rows_total") > 0 })
	if got := metric(reg, "haven_standby_missing_rows_total"); got != 1 {
		t.Errorf("conflicts counted: %v, want 1", got)
	}
	if !strings.Contains(logs.String(), `"key":"id=33"`) || logs.Count("found no row on DR") != 1 {
		t.Errorf("want one drift report naming id=33, logs:\n%s", logs.String())
	}
}

// TestACommitThatFailsIsNamedExactly: a group's COMMIT is sent without
// waiting for it; when DR refuses it (a deferred constraint trigger that
// fires during apply), nothing of the group stays, apply stops at exactly
// the transaction that broke it, and what came before is applied. With one
// transaction per group, the groups behind the refused one are ready to go
// at once, and the next one's statements go behind the COMMIT: none may
// commit, whatever learns of the refusal first (the next batch; a catalog
// read for a heartbeat's new sequence; a transaction the agent publishes
// again from its start).
func TestACommitThatFailsIsNamedExactly(t *testing.T) {
	pg := pgtest.New(t)
	ns := natstest.New(t)
	after := map[string]func(f *feed){
		"transactions": func(f *feed) {
			for i := range 20 {
				f.publish(f.txn(0x6000+uint64(i), insert(strconv.Itoa(13+i), "after")))
			}
		},
		"a heartbeat with a new sequence": func(f *feed) {
			c := f.txn(0x6000, insert("13", "after"))
			c.Heartbeat = &havenpb.Heartbeat{EmittedAtUs: time.Now().UnixMicro(), WalLsn: 0x6000,
				Sequences: []*havenpb.SequenceValue{{Schema: "public", Name: "s1", LastValue: 5}}}
			f.publish(c)
		},
		"a transaction published again": func(f *feed) {
			first := f.txn(0x6000, insert("13", "after"))
			first.LastChunk = false
			f.publish(first)
			f.publish(f.txn(0x6000, insert("13", "after"), insert("14", "after")))
		},
	}
	n := 0
	for _, perGroup := range []int{DefaultConfig().GroupChanges, 1} {
		for what, publish := range after {
			if perGroup != 1 && what != "transactions" {
				continue
			}
			n++
			group := "deferred" + strconv.Itoa(n)
			if err := pg.CreateDatabase(t.Context(), group); err != nil {
				t.Fatal(err)
			}
			// (Deferred unique constraints would not do: their check is a trigger,
			// and apply runs with session_replication_role = replica.)
			if err := pg.Exec(t.Context(), group, `CREATE TABLE items (id bigint PRIMARY KEY, note text);
				CREATE SEQUENCE s1;
				CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
				BEGIN IF NEW.note = 'refused' THEN RAISE EXCEPTION 'refused at commit'; END IF; RETURN NULL; END $$;
				CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON items DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse();
				ALTER TABLE items ENABLE ALWAYS TRIGGER refuse`); err != nil {
				t.Fatal(err)
			}
			f := newFeed(t, ns, group)
			f.snapshotAndTxn()
			f.publish(f.txn(0x3000, insert("10", "a")))
			f.publish(f.txn(0x4000, insert("11", "b")))
			bad := f.publish(f.txn(0x5000, insert("12", "refused"))) // DR refuses it only at COMMIT
			publish(f)

			s, _, reg := startStandby(t, pg.URL(group), ns.URL(), group, func(c *Config) { c.GroupChanges = perGroup })
			waitBlockedAt(t, s, reg, bad)
			got := notes(t, pg.URL(group))
			if want := []string{"1:from the snapshot", "2:first transaction", "10:a", "11:b"}; !slices.Equal(got, want) {
				t.Errorf("%d changes per group, then %s: DR holds %v, want %v: the transactions before the refused one, and nothing after",
					perGroup, what, got, want)
			}
		}
	}
}
