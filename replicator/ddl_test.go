package replicator

import (
	"reflect"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestSplitStatements(t *testing.T) {
	for _, tc := range []struct {
		name, text string
		want       []string
	}{
		{"one", "CREATE TABLE t (id int)", []string{"CREATE TABLE t (id int)"}},
		{"several with blanks", " CREATE TABLE a (x int);; \n ALTER TABLE a ADD b int ; ", []string{"CREATE TABLE a (x int)", "ALTER TABLE a ADD b int"}},
		{"semicolon in a string", "INSERT INTO t VALUES ('a;b'); DROP TABLE t", []string{"INSERT INTO t VALUES ('a;b')", "DROP TABLE t"}},
		{"doubled quote", "COMMENT ON TABLE t IS 'it''s; fine'; SELECT 1", []string{"COMMENT ON TABLE t IS 'it''s; fine'", "SELECT 1"}},
		{"E string with escaped quote", `SELECT E'a\';b'; SELECT 2`, []string{`SELECT E'a\';b'`, "SELECT 2"}},
		{"quoted identifier", `CREATE TABLE "we;ird" (x int); SELECT 1`, []string{`CREATE TABLE "we;ird" (x int)`, "SELECT 1"}},
		{"dollar quotes", "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql; DO $body$ BEGIN PERFORM 1; END $body$",
			[]string{"CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql", "DO $body$ BEGIN PERFORM 1; END $body$"}},
		{"positional parameter is not a dollar quote", "PREPARE p AS SELECT $1; SELECT 2", []string{"PREPARE p AS SELECT $1", "SELECT 2"}},
		{"comments", "-- a; comment\nCREATE TABLE a (x int); /* b; /* nested; */ c */ DROP TABLE b; -- trailing;",
			[]string{"-- a; comment\nCREATE TABLE a (x int)", "/* b; /* nested; */ c */ DROP TABLE b"}},
		{"only comments", "-- nothing; here\n/* ; */", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := splitStatements(tc.text); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("splitStatements(%q)\n got %q\nwant %q", tc.text, got, tc.want)
			}
		})
	}
}

func TestReplayableStatements(t *testing.T) {
	got := replayableStatements(`BEGIN; SET search_path TO sales; CREATE TABLE leads (id int); INSERT INTO leads VALUES (1);
		WITH x AS (DELETE FROM leads RETURNING *) SELECT 1; UPDATE leads SET id = 2; (SELECT 1);
		create index concurrently leads_id on leads (id); DROP INDEX CONCURRENTLY IF EXISTS old_idx;
		ALTER TABLE leads ADD COLUMN who text; DO $$ BEGIN CREATE TYPE t AS ENUM ('a'); END $$; COMMIT`)
	want := []string{"SET LOCAL search_path TO sales", "CREATE TABLE leads (id int)", "create index leads_id on leads (id)", "DROP INDEX IF EXISTS old_idx",
		"ALTER TABLE leads ADD COLUMN who text", "DO $$ BEGIN CREATE TYPE t AS ENUM ('a'); END $$"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("replayable statements\n got %q\nwant %q", got, want)
	}
	if got := replayableStatements("SELECT my_migration()"); len(got) != 0 {
		t.Errorf("a SELECT is not replayed, got %q", got)
	}
}

func TestSplitStatementsKeepsBodies(t *testing.T) {
	for _, tc := range []struct {
		name, text string
		want       []string
	}{
		{"BEGIN ATOMIC", "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END; DROP TABLE x",
			[]string{"CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END", "DROP TABLE x"}},
		{"rule with several actions", "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); INSERT INTO b VALUES (2)); SELECT 1",
			[]string{"CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); INSERT INTO b VALUES (2))", "SELECT 1"}},
		{"CASE inside BEGIN ATOMIC", "CREATE FUNCTION g(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN x > 0 THEN 1 END; SELECT 2; END; SELECT 3",
			[]string{"CREATE FUNCTION g(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN x > 0 THEN 1 END; SELECT 2; END", "SELECT 3"}},
		{"a column named end is no END", "CREATE TABLE t (begin_at int, end_at int); CREATE TABLE u (x int)",
			[]string{"CREATE TABLE t (begin_at int, end_at int)", "CREATE TABLE u (x int)"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := splitStatements(tc.text); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("splitStatements(%q)\n got %q\nwant %q", tc.text, got, tc.want)
			}
		})
	}
	got := replayableStatements("-- add an index\nCREATE INDEX CONCURRENTLY i ON t (x); ALTER TABLE p DETACH PARTITION p1 CONCURRENTLY")
	want := []string{"CREATE INDEX i ON t (x)", "ALTER TABLE p DETACH PARTITION p1"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("replayable statements\n got %q\nwant %q", got, want)
	}
}

func TestAlreadyAppliedOnlyForSingleActions(t *testing.T) {
	dup := &pgconn.PgError{Code: "42701", Message: `column "a" of relation "t" already exists`}
	if !alreadyApplied(dup, "ALTER TABLE t ADD COLUMN a int") {
		t.Error("a single ADD COLUMN already in effect should pass")
	}
	if alreadyApplied(dup, "ALTER TABLE t ADD COLUMN a int, ADD COLUMN b int") {
		t.Error("with two actions, one in effect says nothing of the other: it must stop")
	}
	missing := &pgconn.PgError{Code: "42704", Message: `constraint "old" does not exist`}
	if alreadyApplied(missing, "ALTER TABLE t DROP CONSTRAINT old, ADD CONSTRAINT u UNIQUE (email)") {
		t.Error("a DROP that finds nothing must not hide the ADD next to it")
	}
	if !alreadyApplied(&pgconn.PgError{Code: "42P01"}, "DROP TABLE gone") {
		t.Error("dropping what is gone should pass")
	}
	if alreadyApplied(&pgconn.PgError{Code: "42P01"}, "ALTER TABLE gone ADD COLUMN x int") {
		t.Error("altering a missing table is not 'already applied'")
	}
}

func TestSearchPathSwitchesAreReplayed(t *testing.T) {
	got := replayableStatements("SET search_path = a; CREATE TABLE log (id int); SET SESSION search_path TO b; DROP TABLE t; RESET search_path; CREATE TABLE x (i int)")
	want := []string{"SET LOCAL search_path = a", "CREATE TABLE log (id int)", "SET LOCAL search_path TO b", "DROP TABLE t",
		"SET LOCAL search_path TO DEFAULT", "CREATE TABLE x (i int)"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %q\nwant %q", got, want)
	}
}

func TestTableFromQuery(t *testing.T) {
	for _, tc := range []struct {
		name, st, table, noData string
	}{
		{"query", "CREATE TABLE deals AS SELECT g AS id FROM generate_series(1, 5) g", "deals",
			"CREATE TABLE deals AS SELECT g AS id FROM generate_series(1, 5) g\nWITH NO DATA"},
		{"qualified, columns, options", "create unlogged table if not exists \"My Sales\".\"Q 1\" (a, b) WITH (fillfactor = 70)\n\tas\nVALUES (1, 'AS')",
			`"My Sales"."Q 1"`, "create unlogged table if not exists \"My Sales\".\"Q 1\" (a, b) WITH (fillfactor = 70)\n\tas\nVALUES (1, 'AS')\nWITH NO DATA"},
		{"with data", "CREATE TEMP TABLE t AS TABLE src WITH DATA", "t", "CREATE TEMP TABLE t AS TABLE src\nWITH NO DATA"},
		{"with no data", "CREATE TABLE s.t AS EXECUTE q (1)  WITH NO  DATA ", "s.t", "CREATE TABLE s.t AS EXECUTE q (1)\nWITH NO DATA"},
		{"trailing comment", "CREATE TABLE t AS SELECT 1 -- one", "t", "CREATE TABLE t AS SELECT 1\nWITH NO DATA"},
		{"comments after WITH DATA", "CREATE TABLE t AS SELECT 1 WITH DATA /* keep */ -- c", "t", "CREATE TABLE t AS SELECT 1\nWITH NO DATA"},
		{"quoted name in a schema", `CREATE TABLE app."Report" AS SELECT 1`, `app."Report"`, "CREATE TABLE app.\"Report\" AS SELECT 1\nWITH NO DATA"},
		{"query in parentheses", "CREATE TABLE t AS(SELECT 1)", "t", "CREATE TABLE t AS(SELECT 1)\nWITH NO DATA"},
		{"plain table", "CREATE TABLE t (id int GENERATED ALWAYS AS IDENTITY, note text DEFAULT 'x AS y')", "", ""},
		{"quoted AS", `CREATE TABLE "x AS y" (id int)`, "", ""},
		{"partition", "CREATE TABLE p1 PARTITION OF p FOR VALUES IN (1)", "", ""},
		{"not a table", "CREATE VIEW v AS SELECT 1", "", ""},
	} {
		table, noData, ok := tableFromQuery(tc.st)
		if ok != (tc.table != "") || table != tc.table || noData != tc.noData {
			t.Errorf("%s: tableFromQuery(%q) = %q, %q, %v; want %q, %q", tc.name, tc.st, table, noData, ok, tc.table, tc.noData)
		}
	}
}
