package failover

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/haven-dr/haven/proto/wire"
)

// A verify drill compares every replicated table on the primary, under a
// snapshot exported at LSN X, with the DR copy, read right after it applied
// every transaction that committed before X and nothing after.
//
// Both sides run the same SQL, so only aggregates cross the network: each
// row's md5 over its text form (under wire.TextFormatSettings on both, so
// that a timestamp or a float prints the same) is summed into one of 256
// buckets chosen by the md5 of its key. Buckets depend on the keys only, not
// on row order or collation, so one differing row disturbs one bucket. The
// rows of the buckets that differ are then listed on both sides, by key and
// hash, which names the keys that differ.

// verifyBuckets is how many buckets a table's rows are summed into, and
// maxListedBuckets how many differing buckets have their rows listed.
const (
	verifyBuckets    = 256
	maxListedBuckets = 16
)

// checkedTable is a replicated table as the primary describes it.
type checkedTable struct {
	schema, name string
	cols         []string // compared columns, in the primary's order
	keys         []string // its replica identity's columns (none: the whole row is the key)
	partitioned  bool
}

func (t checkedTable) String() string { return t.schema + "." + t.name }

// verifyTablesQuery lists the tables a group's publication replicates (but
// haven's own), their columns (the publication's column list where it has
// one), and their key: the replica identity's index, or the primary key.
const verifyTablesQuery = `
SELECT n.nspname, c.relname, c.relkind = 'p',
	ARRAY(SELECT a.attname::text FROM pg_attribute a
		WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
		AND (%s) ORDER BY a.attnum),
	coalesce((SELECT array_agg(a.attname::text ORDER BY k.i) FROM pg_index i
		CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, i)
		JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		WHERE i.indrelid = c.oid AND c.relreplident IN ('d', 'i')
		AND (i.indisreplident OR (c.relreplident = 'd' AND i.indisprimary))), '{}')
FROM pg_publication_tables p
JOIN pg_namespace n ON n.nspname = p.schemaname
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
WHERE p.pubname = $1 AND n.nspname <> 'haven'
ORDER BY 1, 2`

func verifyTables(ctx context.Context, tx pgx.Tx, group string) ([]checkedTable, error) {
	// PostgreSQL 15 publications may publish some columns only.
	cols := "true"
	var version int
	if err := tx.QueryRow(ctx, `SELECT current_setting('server_version_num')::int`).Scan(&version); err != nil {
		return nil, fmt.Errorf("read the primary's version: %w", err)
	}
	if version >= 150000 {
		cols = "p.attnames IS NULL OR a.attname = ANY (p.attnames)"
	}
	rows, err := tx.Query(ctx, fmt.Sprintf(verifyTablesQuery, cols), wire.PublicationName(group))
	if err != nil {
		return nil, fmt.Errorf("list the replicated tables on the primary: %w", err)
	}
	tables, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (checkedTable, error) {
		var t checkedTable
		err := row.Scan(&t.schema, &t.name, &t.partitioned, &t.cols, &t.keys)
		return t, err
	})
	if err != nil {
		return nil, fmt.Errorf("list the replicated tables on the primary: %w", err)
	}
	return tables, nil
}

func identList(names []string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = pgx.Identifier{n}.Sanitize()
	}
	return strings.Join(q, ", ")
}

// rowsSQL selects each row's hash (h), its key's hash (k), its bucket (b)
// and its key as text (key: "id=42", or the row for a table without one).
func (t checkedTable) rowsSQL() string {
	from := pgx.Identifier{t.schema, t.name}.Sanitize()
	if !t.partitioned {
		from = "ONLY " + from
	}
	row := fmt.Sprintf("md5(ROW(%s)::text)", identList(t.cols))
	key, shown := row, fmt.Sprintf("left(ROW(%s)::text, 200)", identList(t.cols))
	if len(t.keys) > 0 {
		key = fmt.Sprintf("md5(ROW(%s)::text)", identList(t.keys))
		parts := make([]string, len(t.keys))
		for i, k := range t.keys {
			parts[i] = fmt.Sprintf("%s || '=' || coalesce(%s::text, 'NULL')", quoteLiteral(k), pgx.Identifier{k}.Sanitize())
		}
		shown = "concat_ws(', ', " + strings.Join(parts, ", ") + ")"
	}
	return fmt.Sprintf(`SELECT h, k, ('x' || substr(k, 1, 8))::bit(32)::bigint %% %d AS b, key FROM (SELECT %s AS h, %s AS k, %s AS key FROM %s) r`,
		verifyBuckets, row, key, shown, from)
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// bucket sums the rows of one bucket.
type bucket struct {
	rows   int64
	h1, h2 string // sums of the two halves of the rows' hashes (numeric)
}

// sums reads a table's buckets. A failure is reported, and the transaction
// kept usable, through a savepoint.
func sums(ctx context.Context, tx pgx.Tx, t checkedTable) (map[int64]bucket, error) {
	out := map[int64]bucket{}
	err := savepoint(ctx, tx, func() error {
		rows, err := tx.Query(ctx, fmt.Sprintf(`SELECT b, count(*), sum(('x' || substr(h, 1, 16))::bit(64)::bigint::numeric)::text,
			sum(('x' || substr(h, 17, 16))::bit(64)::bigint::numeric)::text FROM (%s) s GROUP BY b`, t.rowsSQL()))
		if err != nil {
			return err
		}
		for rows.Next() {
			var b int64
			var s bucket
			if err := rows.Scan(&b, &s.rows, &s.h1, &s.h2); err != nil {
				rows.Close()
				return err
			}
			out[b] = s
		}
		return rows.Err()
	})
	return out, err
}

// listed is a row of a listed bucket: its hash and its key as text.
type listed struct{ h, key string }

func listRows(ctx context.Context, tx pgx.Tx, t checkedTable, buckets []int64) (map[string]listed, error) {
	out := map[string]listed{}
	err := savepoint(ctx, tx, func() error {
		rows, err := tx.Query(ctx, fmt.Sprintf(`SELECT k, h, key FROM (%s) s WHERE b = ANY ($1)`, t.rowsSQL()), buckets)
		if err != nil {
			return err
		}
		for rows.Next() {
			var k string
			var l listed
			if err := rows.Scan(&k, &l.h, &l.key); err != nil {
				rows.Close()
				return err
			}
			if t.keys == nil {
				// Identical rows of a table without a key share a hash: one
				// more or fewer of them is a difference too.
				for n := 1; ; n++ {
					if _, dup := out[k]; !dup {
						break
					}
					k = fmt.Sprintf("%s#%d", strings.Split(k, "#")[0], n)
				}
			}
			out[k] = l
		}
		return rows.Err()
	})
	return out, err
}

func savepoint(ctx context.Context, tx pgx.Tx, f func() error) error {
	if _, err := tx.Exec(ctx, "SAVEPOINT haven_verify"); err != nil {
		return err
	}
	if err := f(); err != nil {
		_, rerr := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT haven_verify")
		return errors.Join(err, rerr)
	}
	_, err := tx.Exec(ctx, "RELEASE SAVEPOINT haven_verify")
	return err
}

// compareTable checks one table on both sides.
func compareTable(ctx context.Context, primary, dr pgx.Tx, t checkedTable) TableCheck {
	check := TableCheck{Table: t.String()}
	var ps, ds map[int64]bucket
	var perr, derr error
	done := make(chan struct{})
	go func() { defer close(done); ps, perr = sums(ctx, primary, t) }()
	ds, derr = sums(ctx, dr, t)
	<-done
	if perr != nil {
		check.Detail = "reading it on the primary failed: " + pgMessage(perr)
		return check
	}
	for _, b := range ps {
		check.PrimaryRows += b.rows
	}
	if derr != nil {
		check.Detail = "reading it on DR failed (does it exist there with these columns?): " + pgMessage(derr)
		return check
	}
	for _, b := range ds {
		check.DRRows += b.rows
	}
	var differ []int64
	for b := range int64(verifyBuckets) {
		if ps[b] != ds[b] {
			differ = append(differ, b)
		}
	}
	if len(differ) == 0 {
		check.Match = true
		return check
	}
	if len(differ) > maxListedBuckets {
		differ, check.KeysTruncated = differ[:maxListedBuckets], true
	}
	var pl, dl map[string]listed
	listed := make(chan struct{})
	go func() { defer close(listed); pl, perr = listRows(ctx, primary, t, differ) }()
	dl, derr = listRows(ctx, dr, t, differ)
	<-listed
	if err := errors.Join(perr, derr); err != nil {
		check.Detail = "the table differs; listing the differing rows failed: " + pgMessage(err)
		return check
	}
	add := func(list *[]string, key string) {
		if len(*list) < maxReportKeys {
			*list = append(*list, key)
		} else {
			check.KeysTruncated = true
		}
	}
	for _, k := range slices.Sorted(maps.Keys(pl)) {
		p := pl[k]
		d, ok := dl[k]
		switch {
		case !ok:
			add(&check.MissingOnDR, p.key)
		case d.h != p.h:
			add(&check.Differing, p.key)
		}
	}
	for _, k := range slices.Sorted(maps.Keys(dl)) {
		if _, ok := pl[k]; !ok {
			add(&check.ExtraOnDR, dl[k].key)
		}
	}
	check.Detail = fmt.Sprintf("%d of %d key buckets differ", len(differ), verifyBuckets)
	return check
}

func pgMessage(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Message
	}
	return err.Error()
}
