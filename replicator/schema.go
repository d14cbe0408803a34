package replicator

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// targetColumn is a column of a DR table as its catalog describes it.
type targetColumn struct {
	name, typeName string
	// needsValue: NOT NULL without a default, an identity or a generation
	// expression, so an insert that leaves it out fails.
	needsValue bool
}

// querier is what describing a table needs: a connection or a transaction.
type querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// targetTable is a DR table as its catalog describes it.
type targetTable struct {
	exists      bool
	oid         uint32
	cols        map[string]targetColumn
	hasRows     bool
	partitioned bool // statements must not say ONLY: it would reach no row
	// policed: row-level security policies apply to this session's role,
	// which therefore cannot read or write every row (hasRows is unknown).
	policed bool
}

// readTarget describes schema.name on DR. Type names are read under
// search_path wire.TypeNameSearchPath, so that they compare with the
// source's; the session's own search_path is put back (the apply
// connection's triggers run in it). It runs on the apply connection so that
// it sees DDL replayed in the open transaction.
func readTarget(ctx context.Context, tx querier, schema, name string) (t targetTable, err error) {
	var searchPath string
	if err := tx.QueryRow(ctx, `SELECT current_setting('search_path'), set_config('search_path', $1, false)`, wire.TypeNameSearchPath).Scan(&searchPath, nil); err != nil {
		return t, fmt.Errorf("set search_path to read type names: %w", err)
	}
	defer func() {
		if _, restoreErr := tx.Exec(ctx, `SELECT set_config('search_path', $1, false)`, searchPath); restoreErr != nil && err == nil {
			err = fmt.Errorf("restore search_path: %w", restoreErr)
		}
	}()
	qualified := pgx.Identifier{schema, name}.Sanitize()
	var oid *uint32
	if err := tx.QueryRow(ctx, `SELECT to_regclass($1)::oid`, qualified).Scan(&oid); err != nil {
		return t, fmt.Errorf("look up %s: %w", qualified, err)
	}
	if oid == nil {
		return t, nil
	}
	r, err := tx.Query(ctx, `SELECT attname, format_type(atttypid, atttypmod), attnotnull AND NOT atthasdef AND attidentity = '' AND attgenerated = ''
		FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped`, *oid)
	if err != nil {
		return t, fmt.Errorf("describe %s: %w", qualified, err)
	}
	list, err := pgx.CollectRows(r, func(row pgx.CollectableRow) (targetColumn, error) {
		var c targetColumn
		return c, row.Scan(&c.name, &c.typeName, &c.needsValue)
	})
	if err != nil {
		return t, fmt.Errorf("describe %s: %w", qualified, err)
	}
	t = targetTable{exists: true, oid: *oid, cols: make(map[string]targetColumn, len(list))}
	for _, c := range list {
		t.cols[c.name] = c
	}
	if err := tx.QueryRow(ctx, `SELECT c.relkind = 'p', c.relrowsecurity AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE'))
			AND NOT EXISTS (SELECT FROM pg_roles WHERE rolname = current_user AND (rolsuper OR rolbypassrls))
		FROM pg_class c WHERE c.oid = $1`, *oid).Scan(&t.partitioned, &t.policed); err != nil {
		return t, fmt.Errorf("inspect %s: %w", qualified, err)
	}
	if t.policed {
		return t, nil // with row_security off, reading it would fail
	}
	if err := tx.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM "+qualified+")").Scan(&t.hasRows); err != nil {
		return t, fmt.Errorf("inspect %s: %w", qualified, err)
	}
	return t, nil
}

// policedError says that row-level security keeps apply from some rows of
// a DR table.
func policedError(qualified string) error {
	return fmt.Errorf("row-level security applies to haven's DR role on %s, so apply could not reach every row: "+
		"give the role BYPASSRLS (as a superuser: ALTER ROLE … BYPASSRLS), or apply as a superuser", qualified)
}

// checkTarget reports how an existing DR table differs from the source's
// description; extra DR columns are allowed when an insert may leave them
// out (they accept NULL, or have a default).
func checkTarget(rel *havenpb.Relation, target targetTable) error {
	if target.policed {
		return policedError(pgx.Identifier{rel.Schema, rel.Name}.Sanitize())
	}
	cols := target.cols
	var problems []string
	seen := make(map[string]bool, len(rel.Columns))
	for _, c := range rel.Columns {
		seen[c.Name] = true
		t, ok := cols[c.Name]
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("column %q (%s) is missing", c.Name, c.Type))
		case t.typeName != c.Type:
			problems = append(problems, fmt.Sprintf("column %q is %s on DR but %s on the primary", c.Name, t.typeName, c.Type))
		}
	}
	for name, t := range cols {
		if !seen[name] && t.needsValue {
			problems = append(problems, fmt.Sprintf("DR-only column %q is NOT NULL without a default, so rows from the primary cannot be inserted", name))
		}
	}
	if len(problems) == 0 {
		return nil
	}
	return fmt.Errorf("table %s on DR does not match the primary: %s; make it match (or drop it and let haven create it)",
		pgx.Identifier{rel.Schema, rel.Name}.Sanitize(), strings.Join(problems, "; "))
}

// createTableSQL builds the DR table for a source relation: columns, NOT
// NULL, and the replica identity as primary key or unique constraint.
func createTableSQL(rel *havenpb.Relation) string {
	var b strings.Builder
	fmt.Fprintf(&b, "CREATE SCHEMA IF NOT EXISTS %s; CREATE TABLE %s (", pgx.Identifier{rel.Schema}.Sanitize(), pgx.Identifier{rel.Schema, rel.Name}.Sanitize())
	var keys []string
	for i, c := range rel.Columns {
		if i > 0 {
			b.WriteString(", ")
		}
		// The type comes from the source's format_type(), which quotes and
		// qualifies as needed; it is not an identifier to re-quote.
		fmt.Fprintf(&b, "%s %s", pgx.Identifier{c.Name}.Sanitize(), c.Type)
		if c.NotNull {
			b.WriteString(" NOT NULL")
		}
		if c.Key {
			keys = append(keys, pgx.Identifier{c.Name}.Sanitize())
		}
	}
	switch {
	case rel.ReplicaIdentity == "d" && len(keys) > 0:
		fmt.Fprintf(&b, ", PRIMARY KEY (%s)", strings.Join(keys, ", "))
	case rel.ReplicaIdentity == "i" && len(keys) > 0:
		fmt.Fprintf(&b, ", UNIQUE (%s)", strings.Join(keys, ", "))
	}
	b.WriteString(")")
	return b.String()
}
