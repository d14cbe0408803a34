package e2e

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// typeCase is a column of the type matrix and the values it cycles through,
// edge values included; each value is an SQL literal.
type typeCase struct {
	column, typ string
	values      []string
}

var typeMatrix = []typeCase{
	{"c_bool", "boolean", []string{"true", "false"}},
	{"c_int2", "smallint", []string{"'-32768'", "32767", "0"}},
	{"c_int4", "integer", []string{"'-2147483648'", "2147483647"}},
	{"c_int8", "bigint", []string{"'-9223372036854775808'", "9223372036854775807"}},
	{"c_numeric", "numeric", []string{"'0'", "'-1.50'", "'123456789012345678901234567890.123456789012345678901234567890'", "'NaN'", "'1e-300'"}},
	{"c_numeric_scaled", "numeric(12,2)", []string{"'9999999999.99'", "'-0.01'", "'1.00'"}},
	{"c_float4", "real", []string{"'Infinity'", "'-Infinity'", "'NaN'", "'1.17549435e-38'", "'3.4028235e+38'", "'-0'", "'0.1'"}},
	{"c_float8", "double precision", []string{"'Infinity'", "'NaN'", "'2.2250738585072014e-308'", "'1.7976931348623157e+308'", "'0.1'", "'-0'"}},
	{"c_money", "money", []string{"'-92233720368547758.08'", "'92233720368547758.07'", "'12.34'"}},
	{"c_char", "char(5)", []string{"'ab'", "'abcde'", "' '"}},
	{"c_varchar", "varchar(10)", []string{"'ünïcödé'", "''", "'tab\there'"}},
	{"c_text", "text", []string{`E'line1\nline2\r\n\ttab \\ backslash'`, "'quote''s \"double\"'", "'NULL'", `'\N'`}},
	{"c_qchar", `"char"`, []string{"'a'", "'Z'"}},
	{"c_name", "name", []string{"'pg_class'", "'Mixed Case'"}},
	{"c_bytea", "bytea", []string{`'\x00ff10'`, `'\x'`, `decode(repeat('ab', 5000), 'hex')`}},
	{"c_date", "date", []string{"'infinity'", "'-infinity'", "'4713-01-01 BC'", "'5874897-12-31'", "'2024-02-29'"}},
	{"c_time", "time", []string{"'00:00'", "'23:59:59.999999'", "'24:00:00'"}},
	{"c_timetz", "timetz", []string{"'12:00:00+14'", "'00:00:00-12:34'", "'23:59:59.999999+00'"}},
	{"c_timestamp", "timestamp", []string{"'infinity'", "'-infinity'", "'4713-01-01 00:00:00 BC'", "'294276-12-31 23:59:59.999999'", "'2000-01-01 12:34:56.789'"}},
	{"c_timestamptz", "timestamptz", []string{"'infinity'", "'-infinity'", "'4713-01-01 00:00:00+00 BC'", "'2024-03-31 02:30:00+02'", "'1999-12-31 23:59:59.999999-08'"}},
	{"c_interval", "interval", []string{"'1 year 2 mons 3 days 04:05:06.789'", "'-178000000 years'", "'P1Y2M3DT4H5M6S'", "'0'"}},
	{"c_json", "json", []string{`'{"a": [1, 2, {"b": null}],   "dup": 1, "dup": 2}'`, `'[]'`, `'"ünï"'`}},
	{"c_jsonb", "jsonb", []string{`'{"a": 1, "b": [true, null, "x"], "n": 1.000}'`, `'{}'`, `'[{"deep": {"er": [1e100]}}]'`}},
	{"c_uuid", "uuid", []string{"'00000000-0000-0000-0000-000000000000'", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"}},
	{"c_inet", "inet", []string{"'192.168.0.1/24'", "'::1'", "'2001:db8::1/64'"}},
	{"c_cidr", "cidr", []string{"'10.0.0.0/8'", "'2001:db8::/32'"}},
	{"c_macaddr", "macaddr", []string{"'08:00:2b:01:02:03'"}},
	{"c_macaddr8", "macaddr8", []string{"'08:00:2b:01:02:03:04:05'"}},
	{"c_bit", "bit(8)", []string{"B'10101010'", "B'00000000'"}},
	{"c_varbit", "varbit", []string{"B'1'", "B''", "B'1010101010101010101'"}},
	{"c_tsvector", "tsvector", []string{"'a fat:1 cat:2A,3B'", "''"}},
	{"c_tsquery", "tsquery", []string{"'fat & (rat | !cat)'", "'super:*'"}},
	{"c_xml", "xml", []string{"'<a x=\"1\">text &amp; more</a>'", "'just text'"}},
	{"c_point", "point", []string{"'(1.5,-2)'", "'(0,0)'"}},
	{"c_line", "line", []string{"'{1,2,3}'"}},
	{"c_lseg", "lseg", []string{"'[(0,0),(1,1)]'"}},
	{"c_box", "box", []string{"'(1,1),(0,0)'"}},
	{"c_path", "path", []string{"'[(0,0),(1,1),(2,0)]'", "'((0,0),(1,1))'"}},
	{"c_polygon", "polygon", []string{"'((0,0),(1,1),(1,0))'"}},
	{"c_circle", "circle", []string{"'<(0,0),5>'"}},
	{"c_oid", "oid", []string{"0", "4294967295"}},
	{"c_regtype", "regtype", []string{"'integer'", "'mood'"}},
	{"c_pg_lsn", "pg_lsn", []string{"'0/0'", "'FFFFFFFF/FFFFFFFF'"}},
	{"c_text_array", "text[]", []string{`'{"a,b","c\"d",NULL,"","NULL","x y"}'`, "'{}'", `ARRAY['{braces}', 'back\slash']`}},
	{"c_int_matrix", "int[][]", []string{"'{{1,2},{3,NULL}}'", "'[0:1]={7,8}'", "'{{{1}},{{2}}}'"}},
	{"c_jsonb_array", "jsonb[]", []string{`ARRAY['{"a":1}'::jsonb, NULL]`}},
	{"c_int4range", "int4range", []string{"'[1,10)'", "'empty'", "'(,5]'"}},
	{"c_numrange", "numrange", []string{"'[1.5,2.25]'", "'(,)'"}},
	{"c_tstzrange", "tstzrange", []string{"'[2024-01-01 00:00+00,infinity)'"}},
	{"c_daterange", "daterange", []string{"'[2024-01-01,2024-12-31]'"}},
	{"c_int4multirange", "int4multirange", []string{"'{[1,3),[5,7)}'", "'{}'"}},
	{"c_enum", "mood", []string{"'sad'", "'happy'", "'it''s complicated'"}},
	{"c_enum_array", "mood[]", []string{"'{sad,happy}'"}},
	{"c_domain", "posint", []string{"1", "2147483647"}},
	{"c_composite", "address", []string{`'("main st, 1",12345,)'`, "'(,,)'", `ROW('quote"d', NULL, '{a,b}')`}},
	{"c_citext", "citext", []string{"'MixedCase'", "'mixedcase'"}},
	{"c_hstore", "hstore", []string{`'a=>1, "b c"=>NULL, "quote\"d"=>"x"'`, "''"}},
}

const typeSetup = `
CREATE EXTENSION IF NOT EXISTS citext;
CREATE EXTENSION IF NOT EXISTS hstore;
CREATE TYPE mood AS ENUM ('sad', 'happy', 'it''s complicated');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TYPE address AS (street text, zip int, tags text[]);`

// builtinMatrix is typeMatrix without the types made after initdb and the
// reg* types: a table of only these travels in COPY's binary format.
var builtinMatrix = func() (m []typeCase) {
	for _, c := range typeMatrix {
		switch c.typ {
		case "mood", "mood[]", "posint", "address", "citext", "hstore", "regtype":
		default:
			m = append(m, c)
		}
	}
	return m
}()

func typeTableSQL(name, identity string, matrix []typeCase) string {
	cols := make([]string, len(matrix))
	for i, c := range matrix {
		cols[i] = c.column + " " + c.typ
	}
	key := "id int PRIMARY KEY, "
	if identity == "full" {
		key = "id int, "
	}
	sql := fmt.Sprintf("CREATE TABLE %s (%s%s);", name, key, strings.Join(cols, ", "))
	if identity == "full" {
		sql += fmt.Sprintf(" ALTER TABLE %s REPLICA IDENTITY FULL;", name)
	}
	return sql
}

// typeRowsSQL inserts rows first..last; row i takes value (i+shift) of every
// column's list, and every seventh row is all NULL.
func typeRowsSQL(table string, first, last, shift int, matrix []typeCase) string {
	var rows []string
	for i := first; i <= last; i++ {
		vals := []string{fmt.Sprint(i)}
		for _, c := range matrix {
			if i%7 == 0 {
				vals = append(vals, "NULL")
			} else {
				vals = append(vals, c.values[(i+shift)%len(c.values)]+"::"+c.typ)
			}
		}
		rows = append(rows, "("+strings.Join(vals, ", ")+")")
	}
	return fmt.Sprintf("INSERT INTO %s VALUES %s;", table, strings.Join(rows, ",\n"))
}

// TestEveryTypeRoundTrips inserts, updates and deletes every built-in type
// (and enums, domains, composites, citext, hstore), edge values included,
// through the snapshot and through the stream, in a table keyed by a primary
// key and in one with REPLICA IDENTITY FULL (which also holds duplicate
// rows), and compares both sides row by row. The snapshot copies a table of
// only built-in types in COPY's binary format, and the others, and a table
// of regclass values (an OID in binary, another object's on DR), as text.
func TestEveryTypeRoundTrips(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, typeSetup)
	mustExec(t, primary, typeTableSQL("types_pk", "pk", typeMatrix))
	mustExec(t, primary, typeTableSQL("types_full", "full", typeMatrix))
	mustExec(t, primary, typeTableSQL("types_builtin", "pk", builtinMatrix))
	mustExec(t, primary, `CREATE TABLE marker (id bigint PRIMARY KEY)`)
	mustExec(t, primary, `CREATE TABLE regs (id int PRIMARY KEY, c regclass)`)
	mustExec(t, primary, typeRowsSQL("types_pk", 1, 20, 0, typeMatrix))
	mustExec(t, primary, typeRowsSQL("types_full", 1, 20, 0, typeMatrix))
	mustExec(t, primary, typeRowsSQL("types_full", 1, 3, 0, typeMatrix)) // duplicates of rows 1-3
	mustExec(t, primary, typeRowsSQL("types_builtin", 1, 20, 0, builtinMatrix))
	mustExec(t, primary, `INSERT INTO regs VALUES (1, 'regs'), (2, 'marker'), (3, 'pg_class')`)

	agent := startHaven(t, "agent", s.agentArgs()...)
	startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	tables := map[string]string{"types_pk": "t::text", "types_full": "t::text", "types_builtin": "t::text", "marker": "id", "regs": "t::text"}
	assertEqual(t, primary, dr, tables)
	var sourceOID, drOID uint32
	if err := errors.Join(primary.QueryRow(t.Context(), `SELECT 'regs'::regclass::oid`).Scan(&sourceOID),
		dr.QueryRow(t.Context(), `SELECT 'regs'::regclass::oid`).Scan(&drOID)); err != nil {
		t.Fatal(err)
	}
	if sourceOID == drOID {
		t.Errorf("table regs has OID %d on both sides: the regclass values cannot tell a binary copy from a text one", drOID)
	}
	for table, format := range map[string]string{"types_builtin": "binary", "types_pk": "text", "types_full": "text", "regs": "text"} {
		if !copiedAs(agent.output(), "public."+table, format) {
			t.Errorf("the snapshot did not copy %s in COPY's %s format:\n%s", table, format, tail(agent.output(), 20))
		}
	}

	// Through the stream: new rows, then every column of every row rewritten
	// with another row's values, then some rows deleted (one copy of a
	// duplicate only).
	mustExec(t, primary, typeRowsSQL("types_pk", 21, 40, 1, typeMatrix))
	mustExec(t, primary, typeRowsSQL("types_full", 21, 40, 1, typeMatrix))
	sets := make([]string, len(typeMatrix))
	for i, c := range typeMatrix {
		sets[i] = fmt.Sprintf("%[1]s = o.%[1]s", c.column)
	}
	for _, table := range []string{"types_pk", "types_full"} {
		mustExec(t, primary, fmt.Sprintf(`UPDATE %[1]s t SET %[2]s FROM %[1]s o WHERE o.id = t.id %% 40 + 1 AND t.id > 3`, table, strings.Join(sets, ", ")))
		mustExec(t, primary, fmt.Sprintf(`DELETE FROM %s WHERE id %% 5 = 0`, table))
	}
	mustExec(t, primary, `DELETE FROM types_full WHERE ctid = (SELECT min(ctid) FROM types_full WHERE id = 2)`)
	mustExec(t, primary, `UPDATE types_full SET c_text = 'changed one copy' WHERE ctid = (SELECT min(ctid) FROM types_full WHERE id = 1)`)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	assertEqual(t, primary, dr, tables)
}

// copiedAs says whether an agent's log has table copied in format.
func copiedAs(log, table, format string) bool {
	for line := range strings.SplitSeq(log, "\n") {
		if strings.Contains(line, `"table copied"`) && strings.Contains(line, `"table":"`+table+`"`) && strings.Contains(line, `"format":"`+format+`"`) {
			return true
		}
	}
	return false
}
