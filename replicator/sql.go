package replicator

import (
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/haven-dr/haven/proto/havenpb"
)

// Statements name tables with ONLY: a change on the source touched exactly
// the table it names, never its inheritance children. A partitioned table
// (a group published via the partition root) is named without ONLY: with
// it, UPDATE and DELETE would reach no row at all.

// tableRef names a table in an UPDATE, DELETE or TRUNCATE.
func tableRef(qualified string, partitioned bool) string {
	if partitioned {
		return qualified
	}
	return "ONLY " + qualified
}

// statement is one parameterised SQL text for a shape of change: the same
// table, operation, set of sent columns and (for REPLICA IDENTITY FULL)
// pattern of NULLs in the old row share it, and so share a prepared
// statement. Its key and parameters are computed for every change; its
// text only for a shape not prepared yet.
type statement struct {
	key    string
	sql    func() string
	params [][]byte
	// matchesRow is set for UPDATE and DELETE: affecting no row means the DR
	// copy has drifted from the primary.
	matchesRow bool
	// rows renders the statement for n rows of this shape at once (see
	// runs.go); nil where the shape has no multi-row form. Its UPDATE and
	// DELETE return the ordinal (from 1) of each row they found.
	rows func(n int) string
	// setColumns are the columns an UPDATE writes.
	setColumns []string
}

// relationKey identifies a relation's shape: a changed table gets new
// statements.
func relationKey(rel *havenpb.Relation) string {
	var b strings.Builder
	b.WriteString(pgx.Identifier{rel.Schema, rel.Name}.Sanitize())
	b.WriteByte('(')
	for _, c := range rel.Columns {
		b.WriteString(pgx.Identifier{c.Name}.Sanitize())
		b.WriteByte(' ')
		b.WriteString(c.Type)
		if c.Key {
			b.WriteString(" key")
		}
		b.WriteByte(',')
	}
	b.WriteByte(')')
	b.WriteString(rel.ReplicaIdentity)
	return b.String()
}

// knownRelation is a relation seen before, with its key.
type knownRelation struct {
	rel *havenpb.Relation
	key string
}

// shapeOf copies what sameShape compares, so that a cached relation does
// not keep the message it was decoded from in memory (see wire.Decode).
func shapeOf(r *havenpb.Relation) *havenpb.Relation {
	c := &havenpb.Relation{Schema: strings.Clone(r.Schema), Name: strings.Clone(r.Name), ReplicaIdentity: strings.Clone(r.ReplicaIdentity),
		Columns: make([]*havenpb.Column, len(r.Columns))}
	for i, col := range r.Columns {
		c.Columns[i] = &havenpb.Column{Name: strings.Clone(col.Name), Type: strings.Clone(col.Type), Key: col.Key}
	}
	return c
}

// sameShape reports whether two descriptions give the same relationKey,
// without building it.
func sameShape(a, b *havenpb.Relation) bool {
	if a.Schema != b.Schema || a.Name != b.Name || a.ReplicaIdentity != b.ReplicaIdentity || len(a.Columns) != len(b.Columns) {
		return false
	}
	for i, c := range a.Columns {
		d := b.Columns[i]
		if c.Name != d.Name || c.Type != d.Type || c.Key != d.Key {
			return false
		}
	}
	return true
}

// searchPathDependent are the reg* types, whose text form depends on the
// session's search_path (the agent prints them schema-qualified): they are
// matched by value (an OID comparison) instead.
var searchPathDependent = map[uint32]bool{
	24: true, 2202: true, 2203: true, 2204: true, 2205: true, 2206: true, // regproc … regtype
	3734: true, 3769: true, 4089: true, 4096: true, 4191: true, // regconfig, regdictionary, regnamespace, regrole, regcollation
}

func value(d *havenpb.Datum) []byte {
	if d.Kind == havenpb.DatumKind_DATUM_NULL {
		return nil
	}
	if d.Text == nil {
		return []byte{}
	}
	return d.Text
}

// buildStatement renders the parameters of one row change, and the SQL of
// its shape.
func buildStatement(rel *havenpb.Relation, relKey string, partitioned bool, ch *havenpb.Change) (statement, error) {
	switch ch.Op {
	case havenpb.Op_OP_INSERT:
		return insertStatement(rel, relKey, ch.New), nil
	case havenpb.Op_OP_UPSERT:
		return upsertStatement(rel, relKey, ch.New), nil
	case havenpb.Op_OP_UPDATE:
		return updateStatement(rel, relKey, partitioned, ch)
	case havenpb.Op_OP_DELETE:
		return deleteStatement(rel, relKey, partitioned, ch.Old)
	default:
		return statement{}, fmt.Errorf("no row statement for op %s", ch.Op)
	}
}

func qualifiedName(rel *havenpb.Relation) string {
	return pgx.Identifier{rel.Schema, rel.Name}.Sanitize()
}

func insertStatement(rel *havenpb.Relation, relKey string, row *havenpb.Row) statement {
	params := make([][]byte, 0, len(row.Values))
	mask := make([]byte, len(row.Values))
	for i, d := range row.Values {
		if d.Kind == havenpb.DatumKind_DATUM_UNCHANGED_TOAST {
			mask[i] = 'u'
			continue
		}
		mask[i] = 'v'
		params = append(params, value(d))
	}
	return statement{
		key: relKey + "|I|" + string(mask),
		sql: func() string {
			var cols, places []string
			for i, m := range mask {
				if m == 'v' {
					cols = append(cols, pgx.Identifier{rel.Columns[i].Name}.Sanitize())
					places = append(places, fmt.Sprintf("$%d", len(places)+1))
				}
			}
			// The source's value of a GENERATED ALWAYS identity column is
			// the value: DR must not draw its own.
			return fmt.Sprintf("INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE VALUES (%s)", qualifiedName(rel), strings.Join(cols, ", "), strings.Join(places, ", "))
		},
		params: params,
		rows: func(n int) string {
			var cols []string
			for i, m := range mask {
				if m == 'v' {
					cols = append(cols, pgx.Identifier{rel.Columns[i].Name}.Sanitize())
				}
			}
			var b strings.Builder
			fmt.Fprintf(&b, "INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE VALUES ", qualifiedName(rel), strings.Join(cols, ", "))
			p := 0
			for r := range n {
				if r > 0 {
					b.WriteString(", ")
				}
				b.WriteByte('(')
				for c := range cols {
					if c > 0 {
						b.WriteString(", ")
					}
					p++
					fmt.Fprintf(&b, "$%d", p)
				}
				b.WriteByte(')')
			}
			return b.String()
		},
	}
}

// identityParams appends the parameters that find the row a change refers
// to (its identity columns; for REPLICA IDENTITY FULL, every column) and
// returns them with the pattern of NULLs among them.
func identityParams(rel *havenpb.Relation, identity *havenpb.Row, params [][]byte) ([][]byte, string, error) {
	mask := make([]byte, 0, len(rel.Columns))
	for i, c := range rel.Columns {
		if !c.Key {
			continue
		}
		switch d := identity.Values[i]; d.Kind {
		case havenpb.DatumKind_DATUM_NULL:
			if rel.ReplicaIdentity != "f" {
				return nil, "", fmt.Errorf("key column %q of %s is NULL in a change", c.Name, qualifiedName(rel))
			}
			mask = append(mask, 'n')
		case havenpb.DatumKind_DATUM_TEXT:
			params = append(params, value(d))
			mask = append(mask, 'v')
		default:
			return nil, "", fmt.Errorf("key column %q of %s has no value in a change", c.Name, qualifiedName(rel))
		}
	}
	if len(mask) == 0 {
		return nil, "", fmt.Errorf("%s has no identity columns: updates and deletes cannot find their row", qualifiedName(rel))
	}
	return params, string(mask), nil
}

// whereIdentity matches the row of identityParams' mask, its parameters
// numbered from after the first n: by the identity columns, or, for
// REPLICA IDENTITY FULL, by every column and exactly one row even where
// the table holds duplicates.
func whereIdentity(rel *havenpb.Relation, table, mask string, n int) string {
	var conds []string
	k := 0
	for _, c := range rel.Columns {
		if !c.Key {
			continue
		}
		col := pgx.Identifier{c.Name}.Sanitize()
		m := mask[k]
		k++
		if m == 'n' {
			conds = append(conds, col+" IS NULL")
			continue
		}
		n++
		switch {
		case rel.ReplicaIdentity == "f" && !searchPathDependent[c.TypeOid]:
			// The old row is the whole row image: match its text form
			// exactly, through the type's output function. That works for
			// types without an equality operator (json, point, xml) and
			// tells apart values that = calls equal (1.0 and 1.00, citext's
			// 'A' and 'a'), so the row the source changed is the row DR
			// changes. (A cast to text would trim char(n).)
			conds = append(conds, fmt.Sprintf("format('%%s', %s) = $%d::text", col, n))
		case searchPathDependent[c.TypeOid]:
			// reg* = reg* resolves to oid = oid: name the type, or the
			// parameter would be read as a bare OID.
			conds = append(conds, fmt.Sprintf("%s = $%d::%s", col, n, c.Type))
		default:
			conds = append(conds, fmt.Sprintf("%s = $%d", col, n))
		}
	}
	where := strings.Join(conds, " AND ")
	if rel.ReplicaIdentity == "f" {
		// ctid alone is unique only within one table: a partitioned table
		// holds rows of several.
		where = fmt.Sprintf("(tableoid, ctid) = (SELECT tableoid, ctid FROM %s WHERE %s LIMIT 1)", table, where)
	}
	return where
}

func updateStatement(rel *havenpb.Relation, relKey string, partitioned bool, ch *havenpb.Change) (statement, error) {
	params := make([][]byte, 0, len(rel.Columns)+2)
	setMask := make([]byte, len(rel.Columns))
	for i, d := range ch.New.Values {
		switch {
		case d.Kind == havenpb.DatumKind_DATUM_UNCHANGED_TOAST:
			// Not sent: DR keeps what it has.
			setMask[i] = 'u'
		case ch.Old == nil && rel.Columns[i].Key:
			// The key did not change (no old key was sent): leave it alone,
			// which also keeps GENERATED ALWAYS identity keys updatable.
			setMask[i] = 'k'
		default:
			setMask[i] = 'v'
			params = append(params, value(d))
		}
	}
	sets := len(params)
	identity := ch.Old
	if identity == nil {
		// The key did not change: the new row carries it.
		identity = ch.New
	}
	params, whereMask, err := identityParams(rel, identity, params)
	if err != nil {
		return statement{}, err
	}
	if sets == 0 {
		// Nothing but unchanged TOAST values: there is nothing to write, but
		// the row must still exist.
		return statement{
			key: relKey + "|U0|" + whereMask,
			sql: func() string {
				table := tableRef(qualifiedName(rel), partitioned)
				return fmt.Sprintf("SELECT 1 FROM %s WHERE %s", table, whereIdentity(rel, table, whereMask, 0))
			},
			params:     params,
			matchesRow: true,
		}, nil
	}
	var setColumns []*havenpb.Column
	for i, m := range setMask {
		if m == 'v' {
			setColumns = append(setColumns, rel.Columns[i])
		}
	}
	st := statement{
		key: relKey + "|U|" + string(setMask) + "|" + whereMask,
		sql: func() string {
			var set []string
			for i, m := range setMask {
				if m == 'v' {
					set = append(set, fmt.Sprintf("%s = $%d", pgx.Identifier{rel.Columns[i].Name}.Sanitize(), len(set)+1))
				}
			}
			table := tableRef(qualifiedName(rel), partitioned)
			return fmt.Sprintf("UPDATE %s SET %s WHERE %s", table, strings.Join(set, ", "), whereIdentity(rel, table, whereMask, sets))
		},
		params:     params,
		matchesRow: true,
	}
	for _, c := range setColumns {
		st.setColumns = append(st.setColumns, c.Name)
	}
	if ch.Old == nil && keyedIdentity(rel) {
		st.rows = func(n int) string {
			set := make([]string, len(setColumns))
			for i, c := range setColumns {
				set[i] = fmt.Sprintf("%s = haven_v.p%d", pgx.Identifier{c.Name}.Sanitize(), i+1)
			}
			return fmt.Sprintf("UPDATE %s AS haven_t SET %s FROM %s RETURNING haven_v.n",
				tableRef(qualifiedName(rel), partitioned), strings.Join(set, ", "), joinRows(rel, setColumns, n))
		}
	}
	return st, nil
}

// keyedIdentity: rows are found by a key (primary key or unique index),
// not by their whole image.
func keyedIdentity(rel *havenpb.Relation) bool {
	return rel.ReplicaIdentity == "d" || rel.ReplicaIdentity == "i"
}

// joinRows renders a VALUES list of n rows, each the values of cols then
// the key columns then the row's ordinal, as haven_v(p1, …, n), joined to
// the target table haven_t by key. The first key column is also matched
// with = ANY of the listed keys, so that the planner finds the rows through
// the key's index rather than scanning the table to hash-join it.
func joinRows(rel *havenpb.Relation, cols []*havenpb.Column, n int) string {
	var keys []*havenpb.Column
	for _, c := range rel.Columns {
		if c.Key {
			keys = append(keys, c)
		}
	}
	all := append(append([]*havenpb.Column{}, cols...), keys...)
	var b strings.Builder
	b.WriteString("(VALUES ")
	p := 0
	firstKey := make([]string, n)
	for r := range n {
		if r > 0 {
			b.WriteString(", ")
		}
		b.WriteByte('(')
		for i, c := range all {
			p++
			// The type is as the source's format_type() printed it, schema
			// qualified (wire.TypeNameSearchPath).
			fmt.Fprintf(&b, "$%d::%s, ", p, c.Type)
			if i == len(cols) {
				firstKey[r] = fmt.Sprintf("$%d", p)
			}
		}
		fmt.Fprintf(&b, "%d)", r+1)
	}
	b.WriteString(") AS haven_v(")
	for i := range all {
		fmt.Fprintf(&b, "p%d, ", i+1)
	}
	b.WriteString("n) WHERE ")
	for i, c := range keys {
		if i > 0 {
			b.WriteString(" AND ")
		}
		fmt.Fprintf(&b, "haven_t.%s = haven_v.p%d", pgx.Identifier{c.Name}.Sanitize(), len(cols)+i+1)
	}
	fmt.Fprintf(&b, " AND haven_t.%s = ANY (ARRAY[%s])", pgx.Identifier{keys[0].Name}.Sanitize(), strings.Join(firstKey, ", "))
	return b.String()
}

func deleteStatement(rel *havenpb.Relation, relKey string, partitioned bool, old *havenpb.Row) (statement, error) {
	params, mask, err := identityParams(rel, old, nil)
	if err != nil {
		return statement{}, err
	}
	st := statement{
		key: relKey + "|D|" + mask,
		sql: func() string {
			table := tableRef(qualifiedName(rel), partitioned)
			return fmt.Sprintf("DELETE FROM %s WHERE %s", table, whereIdentity(rel, table, mask, 0))
		},
		params:     params,
		matchesRow: true,
	}
	if keyedIdentity(rel) {
		st.rows = func(n int) string {
			return fmt.Sprintf("DELETE FROM %s AS haven_t USING %s RETURNING haven_v.n", tableRef(qualifiedName(rel), partitioned), joinRows(rel, nil, n))
		}
	}
	return st, nil
}

// truncateSQL renders one TRUNCATE of every relation the source truncated
// together. The source lists every table it emptied, CASCADE included, so
// each is truncated ONLY (but for partitioned tables) and without CASCADE:
// tables on DR that the source did not empty (DR children, DR-only tables
// with foreign keys) keep their rows, as PostgreSQL's own subscriber does
// it. RESTART IDENTITY carries over.
func truncateSQL(rels []*havenpb.Relation, partitioned []bool, ch *havenpb.Change) string {
	names := make([]string, len(rels))
	for i, r := range rels {
		names[i] = tableRef(pgx.Identifier{r.Schema, r.Name}.Sanitize(), partitioned[i])
	}
	sql := "TRUNCATE " + strings.Join(names, ", ")
	if ch.TruncateRestartIdentity {
		sql += " RESTART IDENTITY"
	}
	return sql
}

// copyText renders rows in COPY's text format: tab-separated, \N for NULL,
// backslash escapes for the characters COPY treats specially.
func copyText(buf []byte, rows []*havenpb.Row) []byte {
	for _, row := range rows {
		for i, d := range row.Values {
			if i > 0 {
				buf = append(buf, '\t')
			}
			if d.Kind == havenpb.DatumKind_DATUM_NULL {
				buf = append(buf, '\\', 'N')
				continue
			}
			for _, c := range d.Text {
				switch c {
				case '\\':
					buf = append(buf, '\\', '\\')
				case '\n':
					buf = append(buf, '\\', 'n')
				case '\r':
					buf = append(buf, '\\', 'r')
				case '\t':
					buf = append(buf, '\\', 't')
				default:
					buf = append(buf, c)
				}
			}
		}
		buf = append(buf, '\n')
	}
	return buf
}
