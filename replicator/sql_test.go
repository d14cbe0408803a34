package replicator

import (
	"bytes"
	"math/rand/v2"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/haven-dr/haven/proto/havenpb"
)

func sqlTestText(s string) *havenpb.Datum {
	return &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT, Text: []byte(s)}
}

func sqlTestNull() *havenpb.Datum { return &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_NULL} }

func sqlTestToast() *havenpb.Datum {
	return &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_UNCHANGED_TOAST}
}

func sqlTestRow(values ...*havenpb.Datum) *havenpb.Row { return &havenpb.Row{Values: values} }

// sqlTestOrders has names that need quoting: upper case, spaces, quotes.
func sqlTestOrders() *havenpb.Relation {
	return &havenpb.Relation{Id: 16390, Schema: `Sales "EU"`, Name: "Order Items", ReplicaIdentity: "d",
		Columns: []*havenpb.Column{
			{Name: "Id", Type: "bigint", Key: true, NotNull: true},
			{Name: "unit price", Type: "numeric(12,2)"},
			{Name: `note "x"`, Type: "text"},
		}}
}

const sqlTestOrdersTable = `"Sales ""EU"""."Order Items"`

// sqlTestLog has no primary key: REPLICA IDENTITY FULL marks every column
// as part of the identity.
func sqlTestLog() *havenpb.Relation {
	return &havenpb.Relation{Id: 16400, Schema: "public", Name: "log", ReplicaIdentity: "f",
		Columns: []*havenpb.Column{
			{Name: "at", Type: "timestamp with time zone", Key: true},
			{Name: "level", Type: "text", Key: true},
			{Name: "message", Type: "text", Key: true},
		}}
}

var sqlTestPlaceholder = regexp.MustCompile(`\$([0-9]+)`)

// sqlTestCheckPlaceholders checks that the SQL uses exactly $1…$n for n
// parameters, each once.
func sqlTestCheckPlaceholders(t *testing.T, st statement) {
	t.Helper()
	var seen []int
	for _, m := range sqlTestPlaceholder.FindAllStringSubmatch(st.sql(), -1) {
		n, err := strconv.Atoi(m[1])
		if err != nil {
			t.Fatal(err)
		}
		seen = append(seen, n)
	}
	slices.Sort(seen)
	want := make([]int, len(st.params))
	for i := range want {
		want[i] = i + 1
	}
	if !slices.Equal(seen, want) {
		t.Errorf("%q has placeholders %v for %d parameters", st.sql(), seen, len(st.params))
	}
}

// sqlTestParams renders parameters for comparison; NULL is <nil>, unlike
// the empty string.
func sqlTestParams(params [][]byte) []string {
	out := make([]string, len(params))
	for i, p := range params {
		if p == nil {
			out[i] = "<nil>"
		} else {
			out[i] = strconv.Quote(string(p))
		}
	}
	return out
}

func sqlTestWantParams(params ...string) []string {
	out := make([]string, len(params))
	for i, p := range params {
		if p == "<nil>" {
			out[i] = p
		} else {
			out[i] = strconv.Quote(p)
		}
	}
	return out
}

func TestBuildStatement(t *testing.T) {
	orders := sqlTestOrders()
	log := sqlTestLog()
	tests := []struct {
		name       string
		rel        *havenpb.Relation
		change     *havenpb.Change
		sql        string
		params     []string // "<nil>" is NULL
		matchesRow bool
	}{
		{
			name:   "insert",
			rel:    orders,
			change: &havenpb.Change{Op: havenpb.Op_OP_INSERT, New: sqlTestRow(sqlTestText("1"), sqlTestText("12.50"), sqlTestText("it's"))},
			sql:    `INSERT INTO "Sales ""EU"""."Order Items" ("Id", "unit price", "note ""x""") OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3)`,
			params: sqlTestWantParams("1", "12.50", "it's"),
		},
		{
			name:   "insert with NULL and empty text",
			rel:    orders,
			change: &havenpb.Change{Op: havenpb.Op_OP_INSERT, New: sqlTestRow(sqlTestText("1"), sqlTestNull(), &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT})},
			sql:    `INSERT INTO "Sales ""EU"""."Order Items" ("Id", "unit price", "note ""x""") OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3)`,
			params: sqlTestWantParams("1", "<nil>", ""),
		},
		{
			name:   "insert with injection attempt in a value",
			rel:    orders,
			change: &havenpb.Change{Op: havenpb.Op_OP_INSERT, New: sqlTestRow(sqlTestText("1"), sqlTestText("1); DROP TABLE x; --"), sqlTestText(`"; --`))},
			sql:    `INSERT INTO "Sales ""EU"""."Order Items" ("Id", "unit price", "note ""x""") OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3)`,
			params: sqlTestWantParams("1", "1); DROP TABLE x; --", `"; --`),
		},
		{
			name:   "upsert of a backfilled row replaces the DR row with its key",
			rel:    orders,
			change: &havenpb.Change{Op: havenpb.Op_OP_UPSERT, New: sqlTestRow(sqlTestText("1"), sqlTestText("12.50"), sqlTestNull())},
			sql: `INSERT INTO "Sales ""EU"""."Order Items" ("Id", "unit price", "note ""x""") OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3)` +
				` ON CONFLICT ("Id") DO UPDATE SET "unit price" = EXCLUDED."unit price", "note ""x""" = EXCLUDED."note ""x"""`,
			params: sqlTestWantParams("1", "12.50", "<nil>"),
		},
		{
			name:       "update, key unchanged: old row absent, new row's key finds the row, the key is not set",
			rel:        orders,
			change:     &havenpb.Change{Op: havenpb.Op_OP_UPDATE, New: sqlTestRow(sqlTestText("7"), sqlTestText("3.00"), sqlTestNull())},
			sql:        `UPDATE ONLY "Sales ""EU"""."Order Items" SET "unit price" = $1, "note ""x""" = $2 WHERE "Id" = $3`,
			params:     sqlTestWantParams("3.00", "<nil>", "7"),
			matchesRow: true,
		},
		{
			name: "update, key changed: old row's key finds the row",
			rel:  orders,
			change: &havenpb.Change{Op: havenpb.Op_OP_UPDATE,
				Old: sqlTestRow(sqlTestText("7"), sqlTestNull(), sqlTestNull()),
				New: sqlTestRow(sqlTestText("8"), sqlTestText("3.00"), sqlTestText("n"))},
			sql:        `UPDATE ONLY "Sales ""EU"""."Order Items" SET "Id" = $1, "unit price" = $2, "note ""x""" = $3 WHERE "Id" = $4`,
			params:     sqlTestWantParams("8", "3.00", "n", "7"),
			matchesRow: true,
		},
		{
			name:       "update with unchanged TOAST: the column is not set",
			rel:        orders,
			change:     &havenpb.Change{Op: havenpb.Op_OP_UPDATE, New: sqlTestRow(sqlTestText("7"), sqlTestText("3.00"), sqlTestToast())},
			sql:        `UPDATE ONLY "Sales ""EU"""."Order Items" SET "unit price" = $1 WHERE "Id" = $2`,
			params:     sqlTestWantParams("3.00", "7"),
			matchesRow: true,
		},
		{
			name:       "update where every non-key column is unchanged TOAST still checks the row exists",
			rel:        orders,
			change:     &havenpb.Change{Op: havenpb.Op_OP_UPDATE, New: sqlTestRow(sqlTestText("7"), sqlTestToast(), sqlTestToast())},
			sql:        `SELECT 1 FROM ONLY "Sales ""EU"""."Order Items" WHERE "Id" = $1`,
			params:     sqlTestWantParams("7"),
			matchesRow: true,
		},
		{
			name: "update where every column is unchanged TOAST still checks the row exists",
			rel:  log,
			change: &havenpb.Change{Op: havenpb.Op_OP_UPDATE,
				Old: sqlTestRow(sqlTestText("2025-01-01 00:00:00+00"), sqlTestNull(), sqlTestText("boot")),
				New: sqlTestRow(sqlTestToast(), sqlTestToast(), sqlTestToast())},
			sql:        `SELECT 1 FROM ONLY "public"."log" WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM ONLY "public"."log" WHERE format('%s', "at") = $1::text AND "level" IS NULL AND format('%s', "message") = $2::text LIMIT 1)`,
			params:     sqlTestWantParams("2025-01-01 00:00:00+00", "boot"),
			matchesRow: true,
		},
		{
			name: "update, REPLICA IDENTITY FULL: NULL matched by IS NULL, one row by ctid",
			rel:  log,
			change: &havenpb.Change{Op: havenpb.Op_OP_UPDATE,
				Old: sqlTestRow(sqlTestText("2025-01-01 00:00:00+00"), sqlTestNull(), sqlTestText("boot")),
				New: sqlTestRow(sqlTestText("2025-01-01 00:00:00+00"), sqlTestText("info"), sqlTestText("boot"))},
			sql: `UPDATE ONLY "public"."log" SET "at" = $1, "level" = $2, "message" = $3 ` +
				`WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM ONLY "public"."log" WHERE format('%s', "at") = $4::text AND "level" IS NULL AND format('%s', "message") = $5::text LIMIT 1)`,
			params:     sqlTestWantParams("2025-01-01 00:00:00+00", "info", "boot", "2025-01-01 00:00:00+00", "boot"),
			matchesRow: true,
		},
		{
			name:       "delete",
			rel:        orders,
			change:     &havenpb.Change{Op: havenpb.Op_OP_DELETE, Old: sqlTestRow(sqlTestText("7"), sqlTestNull(), sqlTestNull())},
			sql:        `DELETE FROM ONLY "Sales ""EU"""."Order Items" WHERE "Id" = $1`,
			params:     sqlTestWantParams("7"),
			matchesRow: true,
		},
		{
			name:       "delete, REPLICA IDENTITY FULL",
			rel:        log,
			change:     &havenpb.Change{Op: havenpb.Op_OP_DELETE, Old: sqlTestRow(sqlTestNull(), sqlTestText("warn"), sqlTestText(""))},
			sql:        `DELETE FROM ONLY "public"."log" WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM ONLY "public"."log" WHERE "at" IS NULL AND format('%s', "level") = $1::text AND format('%s', "message") = $2::text LIMIT 1)`,
			params:     sqlTestWantParams("warn", ""),
			matchesRow: true,
		},
		{
			name:       "delete, REPLICA IDENTITY FULL, all NULL",
			rel:        log,
			change:     &havenpb.Change{Op: havenpb.Op_OP_DELETE, Old: sqlTestRow(sqlTestNull(), sqlTestNull(), sqlTestNull())},
			sql:        `DELETE FROM ONLY "public"."log" WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM ONLY "public"."log" WHERE "at" IS NULL AND "level" IS NULL AND "message" IS NULL LIMIT 1)`,
			params:     []string{},
			matchesRow: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.change.RelationId = tt.rel.Id
			st, err := newBuilder().build(tt.rel, relationKey(tt.rel), false, tt.change)
			if err != nil {
				t.Fatalf("buildStatement: %v", err)
			}
			if st.sql() != tt.sql {
				t.Errorf("sql\n got %s\nwant %s", st.sql(), tt.sql)
			}
			if got := sqlTestParams(st.params); !slices.Equal(got, tt.params) {
				t.Errorf("params = %v, want %v", got, tt.params)
			}
			if st.matchesRow != tt.matchesRow {
				t.Errorf("matchesRow = %v, want %v", st.matchesRow, tt.matchesRow)
			}
			if !strings.HasPrefix(st.key, relationKey(tt.rel)) {
				t.Errorf("key %q does not start with the relation's key", st.key)
			}
			sqlTestCheckPlaceholders(t, st)
		})
	}
}

func TestBuildStatementErrors(t *testing.T) {
	orders := sqlTestOrders()
	indexed := sqlTestOrders()
	indexed.ReplicaIdentity = "i"
	keyless := sqlTestOrders()
	keyless.ReplicaIdentity = "n"
	for _, c := range keyless.Columns {
		c.Key = false
	}
	tests := []struct {
		name   string
		rel    *havenpb.Relation
		change *havenpb.Change
		want   string // in the message
	}{
		{"NULL key, identity default, delete", orders,
			&havenpb.Change{Op: havenpb.Op_OP_DELETE, Old: sqlTestRow(sqlTestNull(), sqlTestNull(), sqlTestNull())}, `"Id"`},
		{"NULL key, identity default, update", orders,
			&havenpb.Change{Op: havenpb.Op_OP_UPDATE, New: sqlTestRow(sqlTestNull(), sqlTestText("1"), sqlTestText("x"))}, "NULL"},
		{"NULL key, identity index", indexed,
			&havenpb.Change{Op: havenpb.Op_OP_DELETE, Old: sqlTestRow(sqlTestNull(), sqlTestNull(), sqlTestNull())}, "NULL"},
		{"unchanged TOAST key", orders,
			&havenpb.Change{Op: havenpb.Op_OP_UPDATE, New: sqlTestRow(sqlTestToast(), sqlTestText("1"), sqlTestText("x"))}, `"Id"`},
		{"no key columns, delete", keyless,
			&havenpb.Change{Op: havenpb.Op_OP_DELETE, Old: sqlTestRow(sqlTestText("1"), sqlTestNull(), sqlTestNull())}, "identity"},
		{"no key columns, update", keyless,
			&havenpb.Change{Op: havenpb.Op_OP_UPDATE, New: sqlTestRow(sqlTestText("1"), sqlTestNull(), sqlTestNull())}, "identity"},
		{"truncate is no row statement", orders,
			&havenpb.Change{Op: havenpb.Op_OP_TRUNCATE, TruncateRelationIds: []uint32{16390}}, "OP_TRUNCATE"},
		{"unspecified op", orders,
			&havenpb.Change{Op: havenpb.Op_OP_UNSPECIFIED, New: sqlTestRow(sqlTestText("1"), sqlTestNull(), sqlTestNull())}, "op"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.change.RelationId = tt.rel.Id
			st, err := newBuilder().build(tt.rel, relationKey(tt.rel), false, tt.change)
			if err == nil {
				t.Fatalf("buildStatement = %q, want an error", st.sql())
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not mention %q", err, tt.want)
			}
			if strings.Contains(tt.name, "key") && !strings.Contains(err.Error(), sqlTestOrdersTable) {
				t.Errorf("error %q does not name the table", err)
			}
		})
	}
}

// Statements are prepared once per key, so two changes share a key exactly
// when they share the SQL.
func TestStatementKeys(t *testing.T) {
	orders := sqlTestOrders()
	key := relationKey(orders)
	build := func(ch *havenpb.Change) statement {
		t.Helper()
		ch.RelationId = orders.Id
		st, err := newBuilder().build(orders, key, false, ch)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	sent := build(&havenpb.Change{Op: havenpb.Op_OP_UPDATE, New: sqlTestRow(sqlTestText("1"), sqlTestText("2"), sqlTestText("long"))})
	toast := build(&havenpb.Change{Op: havenpb.Op_OP_UPDATE, New: sqlTestRow(sqlTestText("1"), sqlTestText("2"), sqlTestToast())})
	if sent.key == toast.key {
		t.Errorf("an update that sends a column and one that leaves it unchanged share key %q", sent.key)
	}
	otherValues := build(&havenpb.Change{Op: havenpb.Op_OP_UPDATE, New: sqlTestRow(sqlTestText("9"), sqlTestNull(), sqlTestText(""))})
	if sent.key != otherValues.key {
		t.Errorf("updates of the same shape have keys %q and %q", sent.key, otherValues.key)
	}
	insert := build(&havenpb.Change{Op: havenpb.Op_OP_INSERT, New: sqlTestRow(sqlTestText("1"), sqlTestText("2"), sqlTestText("3"))})
	del := build(&havenpb.Change{Op: havenpb.Op_OP_DELETE, Old: sqlTestRow(sqlTestText("1"), sqlTestNull(), sqlTestNull())})
	if len(map[string]bool{sent.key: true, insert.key: true, del.key: true}) != 3 {
		t.Errorf("insert, update and delete share keys: %q %q %q", insert.key, sent.key, del.key)
	}
}

// A property over random change shapes: same key, same SQL.
func TestStatementKeyDeterminesSQL(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	rels := []*havenpb.Relation{sqlTestOrders(), sqlTestLog()}
	datum := func(allowToast bool) *havenpb.Datum {
		switch rng.IntN(4) {
		case 0:
			return sqlTestNull()
		case 1:
			if allowToast {
				return sqlTestToast()
			}
		}
		return sqlTestText(strconv.Itoa(rng.IntN(100)))
	}
	sqlByKey := map[string]string{}
	built := 0
	for range 5000 {
		rel := rels[rng.IntN(len(rels))]
		row := func(allowToast bool) *havenpb.Row {
			r := &havenpb.Row{}
			for range rel.Columns {
				r.Values = append(r.Values, datum(allowToast))
			}
			return r
		}
		ch := &havenpb.Change{RelationId: rel.Id}
		switch rng.IntN(3) {
		case 0:
			ch.Op, ch.New = havenpb.Op_OP_INSERT, row(false)
		case 1:
			ch.Op, ch.New = havenpb.Op_OP_UPDATE, row(true)
			if rng.IntN(2) == 0 {
				ch.Old = row(false)
			}
		default:
			ch.Op, ch.Old = havenpb.Op_OP_DELETE, row(false)
		}
		st, err := newBuilder().build(rel, relationKey(rel), false, ch)
		if err != nil {
			continue // NULL or TOAST keys: covered by TestBuildStatementErrors
		}
		built++
		sqlTestCheckPlaceholders(t, st)
		if prev, ok := sqlByKey[st.key]; ok && prev != st.sql() {
			t.Fatalf("key %q names two statements:\n%s\n%s", st.key, prev, st.sql())
		}
		sqlByKey[st.key] = st.sql()
	}
	if built < 1000 || len(sqlByKey) < 20 {
		t.Fatalf("only %d statements of %d shapes built", built, len(sqlByKey))
	}
}

func TestRelationKey(t *testing.T) {
	base := sqlTestOrders
	if a, b := relationKey(base()), relationKey(base()); a != b {
		t.Fatal("relationKey is not deterministic")
	}
	variants := map[string]func(r *havenpb.Relation){
		"schema":           func(r *havenpb.Relation) { r.Schema = "public" },
		"name":             func(r *havenpb.Relation) { r.Name = "orders" },
		"column name":      func(r *havenpb.Relation) { r.Columns[1].Name = "price" },
		"column type":      func(r *havenpb.Relation) { r.Columns[1].Type = "numeric(14,2)" },
		"key flag":         func(r *havenpb.Relation) { r.Columns[1].Key = true },
		"column order":     func(r *havenpb.Relation) { r.Columns[1], r.Columns[2] = r.Columns[2], r.Columns[1] },
		"added column":     func(r *havenpb.Relation) { r.Columns = append(r.Columns, &havenpb.Column{Name: "extra", Type: "text"}) },
		"dropped column":   func(r *havenpb.Relation) { r.Columns = r.Columns[:2] },
		"replica identity": func(r *havenpb.Relation) { r.ReplicaIdentity = "f" },
	}
	seen := map[string]string{relationKey(base()): "base"}
	for name, mutate := range variants {
		r := base()
		mutate(r)
		key := relationKey(r)
		if prev, ok := seen[key]; ok {
			t.Errorf("%s and %s share relation key %q", name, prev, key)
		}
		seen[key] = name
	}
}

// Tables whose names contain dots ("sales.eu"."orders" and
// "sales"."eu.orders") must not share a key: applier.prepare caches
// prepared statements by it, so a shared key would write one table's rows
// into the other.
func TestRelationKeyIsInjective(t *testing.T) {
	cols := func() []*havenpb.Column {
		return []*havenpb.Column{{Name: "id", Type: "bigint", Key: true}, {Name: "v", Type: "text"}}
	}
	tests := []struct {
		name string
		a, b *havenpb.Relation
	}{
		{"dot in schema vs dot in table name",
			&havenpb.Relation{Schema: "sales.eu", Name: "orders", Columns: cols(), ReplicaIdentity: "d"},
			&havenpb.Relation{Schema: "sales", Name: "eu.orders", Columns: cols(), ReplicaIdentity: "d"}},
		{"dot before the table name",
			&havenpb.Relation{Schema: "a.b", Name: "c.d", Columns: cols(), ReplicaIdentity: "f"},
			&havenpb.Relation{Schema: "a", Name: "b.c.d", Columns: cols(), ReplicaIdentity: "f"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ka, kb := relationKey(tt.a), relationKey(tt.b)
			if ka != kb {
				return
			}
			t.Errorf("tables %q.%q and %q.%q share relation key %q", tt.a.Schema, tt.a.Name, tt.b.Schema, tt.b.Name, ka)
			ch := func(rel *havenpb.Relation) statement {
				values := make([]*havenpb.Datum, len(rel.Columns))
				for i := range values {
					values[i] = sqlTestText("1")
				}
				st, err := newBuilder().build(rel, relationKey(rel), false, &havenpb.Change{Op: havenpb.Op_OP_INSERT, New: sqlTestRow(values...)})
				if err != nil {
					t.Fatal(err)
				}
				return st
			}
			if sa, sb := ch(tt.a), ch(tt.b); sa.key == sb.key && sa.sql() != sb.sql() {
				t.Errorf("statement key %q names both\n%s\n%s", sa.key, sa.sql(), sb.sql())
			}
		})
	}
}

func TestTruncateSQL(t *testing.T) {
	orders := sqlTestOrders()
	log := sqlTestLog()
	tests := []struct {
		name   string
		rels   []*havenpb.Relation
		change *havenpb.Change
		want   string
	}{
		{"one table", []*havenpb.Relation{log}, &havenpb.Change{}, `TRUNCATE ONLY "public"."log"`},
		{"quoted names", []*havenpb.Relation{orders}, &havenpb.Change{}, `TRUNCATE ONLY ` + sqlTestOrdersTable},
		{"several tables", []*havenpb.Relation{orders, log}, &havenpb.Change{}, `TRUNCATE ONLY ` + sqlTestOrdersTable + `, ONLY "public"."log"`},
		{"restart identity", []*havenpb.Relation{log}, &havenpb.Change{TruncateRestartIdentity: true}, `TRUNCATE ONLY "public"."log" RESTART IDENTITY`},
		{"cascade is not replayed: the source listed every table it emptied", []*havenpb.Relation{log}, &havenpb.Change{TruncateCascade: true}, `TRUNCATE ONLY "public"."log"`},
		{"restart identity and cascade", []*havenpb.Relation{orders, log},
			&havenpb.Change{TruncateRestartIdentity: true, TruncateCascade: true},
			`TRUNCATE ONLY ` + sqlTestOrdersTable + `, ONLY "public"."log" RESTART IDENTITY`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.change.Op = havenpb.Op_OP_TRUNCATE
			if got := truncateSQL(tt.rels, make([]bool, len(tt.rels)), tt.change); got != tt.want {
				t.Errorf("got  %s\nwant %s", got, tt.want)
			}
		})
	}
}

func TestCopyText(t *testing.T) {
	tests := []struct {
		name string
		rows []*havenpb.Row
		want string
	}{
		{"no rows", nil, ""},
		{"plain", []*havenpb.Row{sqlTestRow(sqlTestText("1"), sqlTestText("a b"))}, "1\ta b\n"},
		{"NULL and empty text", []*havenpb.Row{sqlTestRow(sqlTestNull(), sqlTestText(""), &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT})}, "\\N\t\t\n"},
		{"the text \\N", []*havenpb.Row{sqlTestRow(sqlTestText(`\N`))}, "\\\\N\n"},
		{"escapes", []*havenpb.Row{sqlTestRow(sqlTestText("a\\b\nc\rd\te"))}, "a\\\\b\\nc\\rd\\te\n"},
		{"bytea hex text", []*havenpb.Row{sqlTestRow(sqlTestText(`\x00ff`))}, "\\\\x00ff\n"},
		{"non-UTF-8 bytes", []*havenpb.Row{sqlTestRow(&havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT, Text: []byte{0xff, 0xfe}})}, "\xff\xfe\n"},
		{"a lone dot", []*havenpb.Row{sqlTestRow(sqlTestText(`.`))}, ".\n"},
		{"several rows", []*havenpb.Row{sqlTestRow(sqlTestText("1")), sqlTestRow(sqlTestNull())}, "1\n\\N\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := string(copyText(nil, tt.rows)); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
	// copyText appends.
	if got := string(copyText([]byte("head\n"), []*havenpb.Row{sqlTestRow(sqlTestText("x"))})); got != "head\nx\n" {
		t.Errorf("copyText appended %q", got)
	}
}

// sqlTestParseCopy reads COPY text format the way PostgreSQL's COPY FROM
// does for the escapes copyText writes.
func sqlTestParseCopy(t *testing.T, input []byte) [][]*havenpb.Datum {
	t.Helper()
	if len(input) > 0 && input[len(input)-1] != '\n' {
		t.Fatalf("COPY text %q does not end its last row", input)
	}
	var rows [][]*havenpb.Datum
	for _, line := range bytes.SplitAfter(input, []byte{'\n'}) {
		if len(line) == 0 {
			continue
		}
		if bytes.Equal(line, []byte("\\.\n")) {
			t.Fatalf("COPY text has an end-of-data line inside it")
		}
		var row []*havenpb.Datum
		for field := range bytes.SplitSeq(line[:len(line)-1], []byte{'\t'}) {
			if string(field) == `\N` {
				row = append(row, sqlTestNull())
				continue
			}
			var text []byte
			for i := 0; i < len(field); i++ {
				if field[i] != '\\' {
					text = append(text, field[i])
					continue
				}
				i++
				if i == len(field) {
					t.Fatalf("COPY field %q ends with a lone backslash", field)
				}
				switch field[i] {
				case 'n':
					text = append(text, '\n')
				case 'r':
					text = append(text, '\r')
				case 't':
					text = append(text, '\t')
				case '\\':
					text = append(text, '\\')
				default:
					t.Fatalf("COPY field %q has escape \\%c that copyText does not write", field, field[i])
				}
			}
			row = append(row, &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT, Text: text})
		}
		rows = append(rows, row)
	}
	return rows
}

func TestCopyTextRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	const special = "\\\n\r\tN.x0"
	const columns = 4
	var rows []*havenpb.Row
	for range 3000 {
		row := &havenpb.Row{}
		for range columns {
			if rng.IntN(6) == 0 {
				row.Values = append(row.Values, sqlTestNull())
				continue
			}
			text := make([]byte, rng.IntN(16))
			for i := range text {
				if rng.IntN(2) == 0 {
					text[i] = special[rng.IntN(len(special))]
				} else {
					text[i] = byte(1 + rng.IntN(255))
				}
			}
			row.Values = append(row.Values, &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT, Text: text})
		}
		rows = append(rows, row)
	}
	rows = append(rows, sqlTestRow(sqlTestText(`\N`), sqlTestText(`\`), sqlTestText("\\."), sqlTestText("")))

	got := sqlTestParseCopy(t, copyText(nil, rows))
	if len(got) != len(rows) {
		t.Fatalf("%d rows back, want %d", len(got), len(rows))
	}
	for i, row := range rows {
		if len(got[i]) != columns {
			t.Fatalf("row %d: %d values back, want %d", i, len(got[i]), columns)
		}
		for j, want := range row.Values {
			d := got[i][j]
			if d.Kind != want.Kind || !bytes.Equal(d.Text, want.Text) {
				t.Fatalf("row %d value %d: got %v %q, want %v %q", i, j, d.Kind, d.Text, want.Kind, want.Text)
			}
		}
	}
}

func TestPartitionedTablesAreNamedWithoutOnly(t *testing.T) {
	rel := &havenpb.Relation{Id: 1, Schema: "public", Name: "events", ReplicaIdentity: "d", Columns: []*havenpb.Column{
		{Name: "id", Type: "bigint", Key: true}, {Name: "body", Type: "text"}}}
	st, err := newBuilder().build(rel, relationKey(rel), true, &havenpb.Change{Op: havenpb.Op_OP_DELETE, RelationId: 1,
		Old: sqlTestRow(sqlTestText("1"), sqlTestNull())})
	if err != nil {
		t.Fatal(err)
	}
	if want := `DELETE FROM "public"."events" WHERE "id" = $1`; st.sql() != want {
		t.Errorf("got %s, want %s (ONLY on a partitioned table reaches no row)", st.sql(), want)
	}
	if got, want := truncateSQL([]*havenpb.Relation{rel, rel}, []bool{true, false}, &havenpb.Change{}), `TRUNCATE "public"."events", ONLY "public"."events"`; got != want {
		t.Errorf("got %s, want %s", got, want)
	}
}

func TestIdentityTextNamesTheKey(t *testing.T) {
	rel := &havenpb.Relation{Schema: "public", Name: "t", Columns: []*havenpb.Column{
		{Name: "id", Type: "bigint", Key: true}, {Name: "region", Type: "text", Key: true}, {Name: "v", Type: "text"}}}
	ch := &havenpb.Change{Op: havenpb.Op_OP_DELETE, Old: sqlTestRow(sqlTestText("7"), sqlTestText(strings.Repeat("x", 100)), sqlTestNull())}
	got := identityText(rel, ch)
	if want := "id=7, region=" + strings.Repeat("x", 64) + "…"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}
