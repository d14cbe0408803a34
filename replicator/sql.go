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

// shape is what the changes of one table, operation and pattern of sent
// columns (and, for REPLICA IDENTITY FULL, of NULLs in the old row) share:
// one parameterised SQL text, and so one prepared statement.
type shape struct {
	key string
	sql func() string
	// matchesRow is set for UPDATE and DELETE: affecting no row means the DR
	// copy has drifted from the primary.
	matchesRow bool
	// insertsRows is set for INSERT: affecting fewer rows than it carries
	// means a DR trigger or rule dropped some.
	insertsRows bool
	// rows renders the statement for n rows of this shape at once (see
	// runs.go); nil where the shape has no multi-row form. Its UPDATE and
	// DELETE return the ordinal (from 1) of each row they found.
	rows func(n int) string
	// setColumns are the columns an UPDATE writes.
	setColumns []string
}

// statement is one change's shape and parameters.
type statement struct {
	*shape
	params [][]byte
}

// builder renders the statements of row changes. A shape is built once
// per session; for every change, only its shape key and parameters are
// computed, into buffers that the next change reuses: a statement's params
// are valid until the next build.
type builder struct {
	shapes map[string]*shape
	key    []byte
	params [][]byte
}

func newBuilder() *builder { return &builder{shapes: map[string]*shape{}} }

// lookup finds the shape of the key built in b.key.
func (b *builder) lookup() (*shape, bool) {
	s, ok := b.shapes[string(b.key)]
	return s, ok
}

// keep stores a new shape under the key built in b.key.
func (b *builder) keep(s *shape) *shape {
	s.key = string(b.key)
	b.shapes[s.key] = s
	return s
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
	// last is the description it was last found in: chunks of one
	// wire.Decoder share descriptions, and that one needs no comparing.
	// (The Decoder's descriptions are copies: last keeps no payload.)
	last *havenpb.Relation
}

// shapeOf copies what sameShape compares and statements use, so that a
// cached relation or shape does not keep the message it was decoded from
// in memory (see wire.Decode).
func shapeOf(r *havenpb.Relation) *havenpb.Relation {
	c := &havenpb.Relation{Schema: strings.Clone(r.Schema), Name: strings.Clone(r.Name), ReplicaIdentity: strings.Clone(r.ReplicaIdentity),
		Columns: make([]*havenpb.Column, len(r.Columns))}
	for i, col := range r.Columns {
		c.Columns[i] = &havenpb.Column{Name: strings.Clone(col.Name), Type: strings.Clone(col.Type), TypeOid: col.TypeOid, Key: col.Key}
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

// build renders the parameters of one row change, and finds or builds
// the SQL of its shape.
func (b *builder) build(rel *havenpb.Relation, relKey string, partitioned bool, ch *havenpb.Change) (statement, error) {
	b.key = append(b.key[:0], relKey...)
	b.params = b.params[:0]
	switch ch.Op {
	case havenpb.Op_OP_INSERT:
		return b.insert(rel, ch.New, "|I|", insertShape), nil
	case havenpb.Op_OP_UPSERT:
		return b.insert(rel, ch.New, "|B|", upsertShape), nil
	case havenpb.Op_OP_UPDATE:
		return b.update(rel, partitioned, ch)
	case havenpb.Op_OP_DELETE:
		return b.delete(rel, partitioned, ch.Old)
	default:
		return statement{}, fmt.Errorf("no row statement for op %s", ch.Op)
	}
}

func qualifiedName(rel *havenpb.Relation) string {
	return pgx.Identifier{rel.Schema, rel.Name}.Sanitize()
}

// insert renders an insert (or a backfill's upsert) of the sent columns:
// an unchanged TOAST value (of a backfilled row) is left to DR.
func (b *builder) insert(rel *havenpb.Relation, row *havenpb.Row, op string, build func(rel *havenpb.Relation, mask string) *shape) statement {
	b.key = append(b.key, op...)
	at := len(b.key)
	for _, d := range row.Values {
		if d.Kind == havenpb.DatumKind_DATUM_UNCHANGED_TOAST {
			b.key = append(b.key, 'u')
			continue
		}
		b.key = append(b.key, 'v')
		b.params = append(b.params, value(d))
	}
	s, ok := b.lookup()
	if !ok {
		s = b.keep(build(shapeOf(rel), string(b.key[at:])))
	}
	return statement{shape: s, params: b.params}
}

// sentColumns names the columns a mask of 'v' (sent) and others marks as
// sent.
func sentColumns(rel *havenpb.Relation, mask string) []string {
	var cols []string
	for i, m := range []byte(mask) {
		if m == 'v' {
			cols = append(cols, pgx.Identifier{rel.Columns[i].Name}.Sanitize())
		}
	}
	return cols
}

func insertShape(rel *havenpb.Relation, mask string) *shape {
	cols := strings.Join(sentColumns(rel, mask), ", ")
	n := strings.Count(mask, "v")
	return &shape{
		insertsRows: true,
		sql: func() string {
			places := make([]string, n)
			for i := range places {
				places[i] = fmt.Sprintf("$%d", i+1)
			}
			// The source's value of a GENERATED ALWAYS identity column is
			// the value: DR must not draw its own.
			return fmt.Sprintf("INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE VALUES (%s)", qualifiedName(rel), cols, strings.Join(places, ", "))
		},
		rows: func(rows int) string {
			var b strings.Builder
			fmt.Fprintf(&b, "INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE VALUES ", qualifiedName(rel), cols)
			p := 0
			for r := range rows {
				if r > 0 {
					b.WriteString(", ")
				}
				b.WriteByte('(')
				for c := range n {
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

// identity appends the parameters that find the row a change refers to
// (its identity columns; for REPLICA IDENTITY FULL, every column), and the
// pattern of NULLs among them to the shape key.
func (b *builder) identity(rel *havenpb.Relation, identity *havenpb.Row) error {
	at := len(b.key)
	for i, c := range rel.Columns {
		if !c.Key {
			continue
		}
		switch d := identity.Values[i]; d.Kind {
		case havenpb.DatumKind_DATUM_NULL:
			if rel.ReplicaIdentity != "f" {
				return fmt.Errorf("key column %q of %s is NULL in a change", c.Name, qualifiedName(rel))
			}
			b.key = append(b.key, 'n')
		case havenpb.DatumKind_DATUM_TEXT:
			b.params = append(b.params, value(d))
			b.key = append(b.key, 'v')
		default:
			return fmt.Errorf("key column %q of %s has no value in a change", c.Name, qualifiedName(rel))
		}
	}
	if len(b.key) == at {
		return fmt.Errorf("%s has no identity columns: updates and deletes cannot find their row", qualifiedName(rel))
	}
	return nil
}

// whereIdentity matches the row of identity's mask, its parameters
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

// tableKey appends an operation and whether the DR table is partitioned
// (which its SQL names differently) to the shape key.
func (b *builder) tableKey(op string, partitioned bool) {
	b.key = append(b.key, op...)
	if partitioned {
		b.key = append(b.key, 'p')
	}
	b.key = append(b.key, '|')
}

func (b *builder) update(rel *havenpb.Relation, partitioned bool, ch *havenpb.Change) (statement, error) {
	b.tableKey("|U", partitioned)
	at := len(b.key)
	for i, d := range ch.New.Values {
		switch {
		case d.Kind == havenpb.DatumKind_DATUM_UNCHANGED_TOAST:
			// Not sent: DR keeps what it has.
			b.key = append(b.key, 'u')
		case ch.Old == nil && rel.Columns[i].Key:
			// The key did not change (no old key was sent): leave it alone,
			// which also keeps GENERATED ALWAYS identity keys updatable.
			b.key = append(b.key, 'k')
		default:
			b.key = append(b.key, 'v')
			b.params = append(b.params, value(d))
		}
	}
	sets := len(b.params)
	b.key = append(b.key, '|')
	identity := ch.Old
	if identity == nil {
		// The key did not change: the new row carries it.
		identity = ch.New
	}
	if err := b.identity(rel, identity); err != nil {
		return statement{}, err
	}
	s, ok := b.lookup()
	if !ok {
		setMask, whereMask, _ := strings.Cut(string(b.key[at:]), "|")
		s = b.keep(updateShape(shapeOf(rel), partitioned, setMask, whereMask, sets, ch.Old == nil))
	}
	return statement{shape: s, params: b.params}, nil
}

// updateShape: sets of the setMask's columns, then the row found by the
// whereMask's identity; keyUnchanged when the source sent no old key.
func updateShape(rel *havenpb.Relation, partitioned bool, setMask, whereMask string, sets int, keyUnchanged bool) *shape {
	table := tableRef(qualifiedName(rel), partitioned)
	if sets == 0 {
		// Nothing but unchanged TOAST values: there is nothing to write, but
		// the row must still exist.
		return &shape{
			sql: func() string {
				return fmt.Sprintf("SELECT 1 FROM %s WHERE %s", table, whereIdentity(rel, table, whereMask, 0))
			},
			matchesRow: true,
		}
	}
	var setColumns []*havenpb.Column
	for i, m := range []byte(setMask) {
		if m == 'v' {
			setColumns = append(setColumns, rel.Columns[i])
		}
	}
	s := &shape{
		sql: func() string {
			set := make([]string, len(setColumns))
			for i, c := range setColumns {
				set[i] = fmt.Sprintf("%s = $%d", pgx.Identifier{c.Name}.Sanitize(), i+1)
			}
			return fmt.Sprintf("UPDATE %s SET %s WHERE %s", table, strings.Join(set, ", "), whereIdentity(rel, table, whereMask, sets))
		},
		matchesRow: true,
	}
	for _, c := range setColumns {
		s.setColumns = append(s.setColumns, c.Name)
	}
	if keyUnchanged && keyedIdentity(rel) {
		s.rows = func(n int) string {
			set := make([]string, len(setColumns))
			for i, c := range setColumns {
				set[i] = fmt.Sprintf("%s = haven_v.p%d", pgx.Identifier{c.Name}.Sanitize(), i+1)
			}
			return fmt.Sprintf("UPDATE %s AS haven_t SET %s FROM %s RETURNING haven_v.n", table, strings.Join(set, ", "), joinRows(rel, setColumns, n))
		}
	}
	return s
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

func (b *builder) delete(rel *havenpb.Relation, partitioned bool, old *havenpb.Row) (statement, error) {
	b.tableKey("|D", partitioned)
	at := len(b.key)
	if err := b.identity(rel, old); err != nil {
		return statement{}, err
	}
	s, ok := b.lookup()
	if !ok {
		s = b.keep(deleteShape(shapeOf(rel), partitioned, string(b.key[at:])))
	}
	return statement{shape: s, params: b.params}, nil
}

func deleteShape(rel *havenpb.Relation, partitioned bool, mask string) *shape {
	table := tableRef(qualifiedName(rel), partitioned)
	s := &shape{
		sql: func() string {
			return fmt.Sprintf("DELETE FROM %s WHERE %s", table, whereIdentity(rel, table, mask, 0))
		},
		matchesRow: true,
	}
	if keyedIdentity(rel) {
		s.rows = func(n int) string {
			return fmt.Sprintf("DELETE FROM %s AS haven_t USING %s RETURNING haven_v.n", table, joinRows(rel, nil, n))
		}
	}
	return s
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
