package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/haven-dr/haven/proto/havenpb"
)

// operatorError is a problem only an operator can fix: the agent stops
// instead of retrying.
type operatorError struct{ err error }

func (e *operatorError) Error() string { return e.err.Error() }
func (e *operatorError) Unwrap() error { return e.err }

func needsOperator(format string, args ...any) error {
	return &operatorError{fmt.Errorf(format, args...)}
}

// IsOperatorError reports whether err needs an operator's action; retrying
// does not help.
func IsOperatorError(err error) bool {
	var oe *operatorError
	return errors.As(err, &oe)
}

// sourceInfo is what the agent learns about the primary before capturing.
type sourceInfo struct {
	systemID uint64
	version  int
	database string
}

// checkSource verifies the server can feed a logical slot to this user.
func checkSource(ctx context.Context, conn *pgx.Conn) (sourceInfo, error) {
	var info sourceInfo
	var walLevel string
	var canReplicate bool
	var sysID string
	err := conn.QueryRow(ctx, `SELECT current_setting('wal_level'),
		current_setting('server_version_num')::int,
		(SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
		(SELECT system_identifier::text FROM pg_control_system()), current_database()`).Scan(&walLevel, &info.version, &canReplicate, &sysID, &info.database)
	if err != nil {
		return info, fmt.Errorf("inspect source server: %w", err)
	}
	if info.version < 140000 {
		return info, needsOperator("source server is PostgreSQL %d.%d: haven needs 14 or later (pgoutput logical messages)", info.version/10000, info.version%10000)
	}
	if walLevel != "logical" {
		return info, needsOperator("source wal_level is %q, haven needs \"logical\": run ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL", walLevel)
	}
	if !canReplicate {
		return info, needsOperator("role %q may not use replication: run ALTER ROLE %s REPLICATION; (or connect as a role that has it)", conn.Config().User, pgx.Identifier{conn.Config().User}.Sanitize())
	}
	if _, err := fmt.Sscan(sysID, &info.systemID); err != nil {
		return info, fmt.Errorf("parse system identifier %q: %w", sysID, err)
	}
	return info, nil
}

// table is a source table the group replicates.
type table struct {
	oid             uint32
	schema, name    string
	replicaIdentity string // relreplident
	hasKey          bool   // a usable identity index exists (PK or USING INDEX)
	unlogged        bool
	partitioned     bool // a partitioned table (published via the partition root)
	deferrableKey   bool // its primary key is DEFERRABLE
}

func (t table) qualified() string { return pgx.Identifier{t.schema, t.name}.Sanitize() }

// usableIdentity reports whether UPDATE and DELETE on t can be replicated.
func (t table) usableIdentity() bool {
	return t.replicaIdentity == "f" || ((t.replicaIdentity == "d" || t.replicaIdentity == "i") && t.hasKey)
}

// tableColumns selects a table as the agent needs it. A deferrable primary
// key is no replica identity for PostgreSQL (indimmediate): such a table has
// none, and publishing it would make the primary's UPDATEs fail.
const tableColumns = `c.oid, n.nspname, c.relname, c.relreplident::text, c.relpersistence = 'u',
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND
               i.indimmediate AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident))),
       c.relkind = 'p',
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary AND NOT i.indimmediate)`

const tablesQuery = `
SELECT ` + tableColumns + `
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE ((c.relkind = 'r' AND NOT ($1 AND c.relispartition)) OR ($1 AND c.relkind = 'p' AND NOT c.relispartition))
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'haven')
  AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp%'
ORDER BY n.nspname, c.relname`

// publishedQuery lists the tables a publication publishes.
const publishedQuery = `
SELECT ` + tableColumns + `
FROM pg_publication_tables p
JOIN pg_namespace n ON n.nspname = p.schemaname
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
WHERE p.pubname = $1
ORDER BY n.nspname, c.relname`

func scanTables(rows pgx.Rows) ([]table, error) {
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (table, error) {
		var t table
		err := row.Scan(&t.oid, &t.schema, &t.name, &t.replicaIdentity, &t.unlogged, &t.hasKey, &t.partitioned, &t.deferrableKey)
		return t, err
	})
}

// publishedTables is what the slot streams: the snapshot copies exactly
// these, so that every streamed table starts from a copy and every copied
// table is kept up to date.
func publishedTables(ctx context.Context, conn *pgx.Conn, publication string) ([]table, error) {
	rows, err := conn.Query(ctx, publishedQuery, publication)
	if err != nil {
		return nil, fmt.Errorf("list tables of publication %q: %w", publication, err)
	}
	tables, err := scanTables(rows)
	if err != nil {
		return nil, fmt.Errorf("list tables of publication %q: %w", publication, err)
	}
	return tables, nil
}

// selectTables resolves the configured table list (or every user table)
// and refuses tables that cannot be replicated safely, unless setFull lets
// it give them REPLICA IDENTITY FULL. A group of every table that already
// runs (its publication exists) leaves such tables out, loudly, rather than
// stop capturing the others.
func selectTables(ctx context.Context, conn *pgx.Conn, log zerolog.Logger, wanted []string, setFull, viaRoot bool, publication string) ([]table, error) {
	rows, err := conn.Query(ctx, tablesQuery, viaRoot)
	if err != nil {
		return nil, fmt.Errorf("list source tables: %w", err)
	}
	all, err := scanTables(rows)
	if err != nil {
		return nil, fmt.Errorf("list source tables: %w", err)
	}
	var picked []table
	if len(wanted) == 0 {
		for _, t := range all {
			if t.unlogged {
				// Unlogged tables never reach the WAL; nothing can replicate them.
				continue
			}
			picked = append(picked, t)
		}
	} else {
		byName := make(map[string]table, len(all))
		for _, t := range all {
			byName[t.schema+"."+t.name] = t
		}
		for _, w := range wanted {
			name := strings.TrimSpace(w)
			if !strings.Contains(name, ".") {
				name = "public." + name
			}
			t, ok := byName[name]
			if !ok {
				return nil, needsOperator("table %q (from --tables) does not exist on the source, or is not an ordinary table "+
					"(a partition when --publish-via-partition-root is set, or a partitioned table when it is not)", w)
			}
			if t.unlogged {
				return nil, needsOperator("table %s is UNLOGGED: its changes never reach the WAL, so it cannot be replicated; run ALTER TABLE %s SET LOGGED; or leave it out of --tables", name, t.qualified())
			}
			picked = append(picked, t)
		}
	}
	var refused, deferrable []string
	for i, t := range picked {
		if t.usableIdentity() {
			continue
		}
		if setFull {
			if _, err := conn.Exec(ctx, "ALTER TABLE "+t.qualified()+" REPLICA IDENTITY FULL"); err != nil {
				return nil, fmt.Errorf("set REPLICA IDENTITY FULL on %s: %w", t.qualified(), err)
			}
			log.Warn().Str("table", t.schema+"."+t.name).Msg("table had no primary key or usable replica identity: set REPLICA IDENTITY FULL on it " +
				"(--set-replica-identity-full); its updates and deletes now log the whole old row, and DR finds rows by comparing whole rows; a primary key is cheaper")
			picked[i].replicaIdentity = "f"
			continue
		}
		refused = append(refused, t.schema+"."+t.name)
		if t.deferrableKey {
			deferrable = append(deferrable, t.schema+"."+t.name)
		}
	}
	var running bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)`, publication).Scan(&running); err != nil {
		return nil, fmt.Errorf("look up publication %q: %w", publication, err)
	}
	var deferrableHint string
	if len(deferrable) > 0 {
		deferrableHint = fmt.Sprintf(" (the primary key of %s is DEFERRABLE, and PostgreSQL identifies rows only by one that is not: "+
			"drop it and add it again without DEFERRABLE)", strings.Join(deferrable, ", "))
	}
	if len(refused) > 0 && len(wanted) == 0 && running {
		log.Error().Strs("tables", refused).Msg("tables without a primary key or usable replica identity are NOT replicated" + deferrableHint + ": " +
			"add a primary key (its rows are then backfilled), or set ALTER TABLE … REPLICA IDENTITY FULL and re-seed the group")
		picked = slices.DeleteFunc(picked, func(t table) bool { return slices.Contains(refused, t.schema+"."+t.name) })
		refused = nil
	}
	if len(refused) > 0 {
		// Adding such a table to a publication that publishes UPDATE and
		// DELETE would make the primary's own UPDATEs on it fail, so it is
		// never added.
		return nil, needsOperator("tables without a primary key or usable replica identity cannot be replicated: %s%s. "+
			"Add a primary key (ALTER TABLE … ADD PRIMARY KEY (…)), or set ALTER TABLE … REPLICA IDENTITY FULL "+
			"(--set-replica-identity-full does it for you), or leave them out with --tables", strings.Join(refused, ", "), deferrableHint)
	}
	if len(picked) == 0 {
		return nil, needsOperator("no tables to replicate: the source database has no ordinary tables outside the system schemas (or --tables is empty)")
	}
	return picked, nil
}

// refuseUnreadable stops an agent whose role may not read every row of
// some of the tables: a snapshot would fail on them, or copy only the rows
// row-level security policies let it see. (Its sessions run with
// row_security off, so such a read fails rather than filters; this says
// why before it starts.)
func refuseUnreadable(ctx context.Context, conn *pgx.Conn, tables []table) error {
	oids := make([]uint32, len(tables))
	for i, t := range tables {
		oids[i] = t.oid
	}
	u, err := unreadableTables(ctx, conn, oids)
	if err != nil || u == nil {
		return err
	}
	return needsOperator("%s", u)
}

// unreadable names the tables whose rows the agent's role may not all
// read, and what to grant.
type unreadable struct {
	role string
	// unusable are schemas the role lacks USAGE on; denied tables lack
	// SELECT on some column; policed ones have row-level security policies
	// that apply to the role.
	unusable, denied, policed []string
}

func (u *unreadable) String() string {
	role := pgx.Identifier{u.role}.Sanitize()
	var says []string
	if len(u.unusable) > 0 {
		says = append(says, fmt.Sprintf("the agent's role %q may not use schema %s: GRANT USAGE ON SCHEMA %s TO %s",
			u.role, strings.Join(u.unusable, ", "), strings.Join(u.unusable, ", "), role))
	}
	if len(u.denied) > 0 {
		says = append(says, fmt.Sprintf("the agent's role %q may not read every column of %s: GRANT SELECT ON %s TO %s",
			u.role, strings.Join(u.denied, ", "), strings.Join(u.denied, ", "), role))
	}
	if len(u.policed) > 0 {
		says = append(says, fmt.Sprintf("row-level security applies to the agent's role %q on %s, so it would copy only the rows its policies let it see: "+
			"give the role BYPASSRLS (as a superuser: ALTER ROLE %s BYPASSRLS), or run the agent as a superuser", u.role, strings.Join(u.policed, ", "), role))
	}
	return strings.Join(says, "; ")
}

// unreadableTables returns the tables among oids whose rows the
// connection's role may not all read, nil if there are none.
func unreadableTables(ctx context.Context, conn *pgx.Conn, oids []uint32) (*unreadable, error) {
	var u unreadable
	err := conn.QueryRow(ctx, `SELECT current_user,
			coalesce(array_agg(DISTINCT c.relnamespace::regnamespace::text ORDER BY c.relnamespace::regnamespace::text)
				FILTER (WHERE NOT has_schema_privilege(c.relnamespace, 'USAGE')), '{}'),
			coalesce(array_agg(c.oid::regclass::text ORDER BY c.oid::regclass::text) FILTER (WHERE EXISTS (
				SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
					AND NOT has_column_privilege(c.oid, a.attnum, 'SELECT'))), '{}'),
			coalesce(array_agg(c.oid::regclass::text ORDER BY c.oid::regclass::text) FILTER (WHERE c.relrowsecurity
				AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE'))
				AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = current_user AND (r.rolsuper OR r.rolbypassrls))), '{}')
		FROM pg_class c WHERE c.oid = ANY($1::oid[])`, oids).Scan(&u.role, &u.unusable, &u.denied, &u.policed)
	if err != nil {
		return nil, fmt.Errorf("check that the agent may read every row of its tables: %w", err)
	}
	if len(u.unusable) == 0 && len(u.denied) == 0 && len(u.policed) == 0 {
		return nil, nil
	}
	return &u, nil
}

// ensurePublication creates the group's publication for tables, or checks
// that an existing one covers them.
func ensurePublication(ctx context.Context, conn *pgx.Conn, name string, tables []table, viaRoot bool) (missing []string, err error) {
	var exists, existingViaRoot bool
	if err := conn.QueryRow(ctx, `SELECT count(*) > 0, coalesce(bool_or(pubviaroot), false) FROM pg_publication WHERE pubname = $1`, name).
		Scan(&exists, &existingViaRoot); err != nil {
		return nil, fmt.Errorf("look up publication %q: %w", name, err)
	}
	if exists && existingViaRoot != viaRoot {
		return nil, needsOperator("publication %q has publish_via_partition_root = %v, but the agent runs with --publish-via-partition-root=%v: "+
			"run it as before, or re-seed the group (drop the publication and the slot) to change it", name, existingViaRoot, viaRoot)
	}
	if !exists {
		names := make([]string, len(tables))
		for i, t := range tables {
			names[i] = t.qualified()
		}
		sql := fmt.Sprintf("CREATE PUBLICATION %s FOR TABLE %s WITH (publish = 'insert, update, delete, truncate', publish_via_partition_root = %v)",
			pgx.Identifier{name}.Sanitize(), strings.Join(names, ", "), viaRoot)
		if _, err := conn.Exec(ctx, sql); err != nil {
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) && pgErr.Code == "42501" {
				return nil, needsOperator("create publication %q: %v: the agent's role needs CREATE on the database and must own the tables (or be a superuser)", name, err)
			}
			return nil, fmt.Errorf("create publication %q: %w", name, err)
		}
		return nil, nil
	}
	rows, err := conn.Query(ctx, `SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1`, name)
	if err != nil {
		return nil, fmt.Errorf("list tables of publication %q: %w", name, err)
	}
	published, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("list tables of publication %q: %w", name, err)
	}
	have := make(map[string]bool, len(published))
	for _, p := range published {
		have[p] = true
	}
	for _, t := range tables {
		if !have[t.schema+"."+t.name] {
			missing = append(missing, t.schema+"."+t.name)
		}
	}
	return missing, nil
}

// describeTables reads the snapshot's relation descriptors from the catalog,
// as of the exported snapshot (the caller's transaction).
func describeTables(ctx context.Context, tx pgx.Tx, tables []table) ([]*havenpb.Relation, error) {
	rels := make([]*havenpb.Relation, 0, len(tables))
	for _, t := range tables {
		rows, err := tx.Query(ctx, `
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid, a.atttypmod, a.attnotnull,
       COALESCE(a.attnum = ANY ((SELECT i.indkey FROM pg_index i WHERE i.indrelid = a.attrelid AND
                ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident)))::int2[]), false)
         OR c.relreplident = 'f'
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attnum`, t.oid)
		if err != nil {
			return nil, fmt.Errorf("describe table %s: %w", t.qualified(), err)
		}
		cols, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (*havenpb.Column, error) {
			var c havenpb.Column
			err := row.Scan(&c.Name, &c.Type, &c.TypeOid, &c.TypeModifier, &c.NotNull, &c.Key)
			return &c, err
		})
		if err != nil {
			return nil, fmt.Errorf("describe table %s: %w", t.qualified(), err)
		}
		rels = append(rels, &havenpb.Relation{Id: t.oid, Schema: t.schema, Name: t.name, Columns: cols, ReplicaIdentity: t.replicaIdentity})
	}
	return rels, nil
}
