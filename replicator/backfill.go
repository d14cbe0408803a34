package replicator

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/haven-dr/haven/proto/havenpb"
)

// A table that joins a running group with rows in it is backfilled: the
// agent sends BEGIN, then the table's changes as usual and, in between, its
// rows as upserts, each as the primary held it at that point of the stream,
// then END (see the agent's backfill). Until END the DR table lacks rows
// the primary has, so an update or delete that finds no row is expected,
// not drift. The tables being backfilled are kept in haven.backfills, in
// the same transactions as the changes.

// loadBackfills reads the tables being backfilled (by DR OID).
func (a *applier) loadBackfills(ctx context.Context) error {
	rows, err := a.conn.Query(ctx, `SELECT relid, table_name FROM haven.backfills WHERE group_name = $1`, a.cfg.Group)
	if err != nil {
		return fmt.Errorf("read haven.backfills: %w", err)
	}
	a.backfilling = map[uint32]string{}
	var oid uint32
	var name string
	if _, err := pgx.ForEachRow(rows, []any{&oid, &name}, func() error {
		a.backfilling[oid] = name
		return nil
	}); err != nil {
		return fmt.Errorf("read haven.backfills: %w", err)
	}
	a.metrics.backfilling.Set(float64(len(a.backfilling)))
	a.reportCompleteness()
	return nil
}

// backfill applies a backfill's BEGIN or END in the open transaction;
// first says that nothing of the source transaction is applied yet.
func (a *applier) backfill(ctx context.Context, seq uint64, b *havenpb.Backfill, first bool) error {
	if err := a.flush(ctx, seq); err != nil {
		return err
	}
	qualified := pgx.Identifier{b.Schema, b.Name}.Sanitize()
	target, err := readTarget(ctx, a.conn, b.Schema, b.Name)
	if err != nil {
		return err
	}
	if b.Phase == havenpb.Backfill_PHASE_END {
		// By the source's OID: the table of that name on DR may be another
		// one (dropped and made again on the primary meanwhile).
		if _, err := a.conn.Exec(ctx, `DELETE FROM haven.backfills WHERE group_name = $1 AND
			(CASE WHEN $3::oid <> 0 THEN source_relid = $3 ELSE relid = $2 END OR NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = relid))`,
			a.cfg.Group, target.oid, b.SourceOid); err != nil {
			return fmt.Errorf("end the backfill of %s: %w", qualified, err)
		}
		if err := a.loadBackfills(ctx); err != nil {
			return err
		}
		a.log.Info().Str("table", b.Schema+"."+b.Name).Uint64("seq", seq).Msg("backfill complete: the DR table holds every row")
		return nil
	}
	if !target.exists && b.SchemaSql != "" {
		// The script runs on a connection of its own: what the open
		// transaction holds (locks, a schema it created) is committed
		// first, and a new one starts after, which sees what it made.
		if first {
			if err := a.commit(ctx); err != nil {
				return err
			}
		}
		if err := a.createSchema(ctx, seq, b.SchemaSql, ""); err != nil {
			return err
		}
		if first {
			if err := a.begin(ctx); err != nil {
				return err
			}
			if err := a.flush(ctx, seq); err != nil {
				return err
			}
		}
		if target, err = readTarget(ctx, a.conn, b.Schema, b.Name); err != nil {
			return err
		}
	}
	if !target.exists {
		return blocked(seq, "missing table", "table %s joined the group on the primary but does not exist on DR; create it there "+
			"(pg_dump --schema-only --table=%s on the primary), then apply resumes and backfills it", qualified, qualified)
	}
	if target.policed {
		return blocked(seq, "row security", "%w", policedError(qualified))
	}
	if target.hasRows {
		// What DR has is not the primary's: the rows come again. Under
		// session_replication_role = replica no foreign key stops it.
		if _, err := a.conn.Exec(ctx, "DELETE FROM "+tableRef(qualified, target.partitioned)); err != nil {
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) {
				return blocked(seq, "apply failed", "empty %s on DR for its backfill: %w", qualified, err)
			}
			return fmt.Errorf("empty %s for its backfill: %w", qualified, err)
		}
	}
	if _, err := a.conn.Exec(ctx, `INSERT INTO haven.backfills (group_name, relid, table_name, source_relid) VALUES ($1, $2, $3, $4)
		ON CONFLICT (group_name, relid) DO UPDATE SET began_at = now(), source_relid = excluded.source_relid`, a.cfg.Group, target.oid, b.Schema+"."+b.Name, b.SourceOid); err != nil {
		return fmt.Errorf("begin the backfill of %s: %w", qualified, err)
	}
	a.backfilling[target.oid] = b.Schema + "." + b.Name
	a.metrics.backfilling.Set(float64(len(a.backfilling)))
	a.reportCompleteness()
	a.log.Info().Str("table", b.Schema+"."+b.Name).Uint64("seq", seq).Bool("emptied", target.hasRows).
		Msg("backfill begins: the table's rows arrive while its changes are applied")
	return nil
}

// upsertShape inserts a backfilled row, or overwrites the DR row with its
// key.
func upsertShape(rel *havenpb.Relation, mask string) *shape {
	insert := insertShape(rel, mask).sql
	return &shape{sql: func() string {
		var keys, sets []string
		for _, c := range rel.Columns {
			ident := pgx.Identifier{c.Name}.Sanitize()
			if c.Key {
				keys = append(keys, ident)
			} else {
				sets = append(sets, ident+" = EXCLUDED."+ident)
			}
		}
		if len(sets) == 0 {
			return insert() + fmt.Sprintf(" ON CONFLICT (%s) DO NOTHING", strings.Join(keys, ", "))
		}
		return insert() + fmt.Sprintf(" ON CONFLICT (%s) DO UPDATE SET %s", strings.Join(keys, ", "), strings.Join(sets, ", "))
	}}
}
