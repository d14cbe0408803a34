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
// buckets that differ are summed again by sub-bucket (other bits of the
// key's md5), and the rows of the sub-buckets that differ are listed on
// both sides, by key and hash, which names the keys that differ.

// verifyBuckets is how many buckets (and sub-buckets in a bucket) a table's
// rows are summed into, and maxListedBuckets how many differing ones are
// looked into at the next level.
const (
	verifyBuckets    = 256
	maxListedBuckets = 16
)

// checkedTable is a replicated table as the primary describes it.
type checkedTable struct {
	schema, name string
	cols         []string // compared columns, in the primary's order
	keys         []string // its replica identity's columns (none: the whole row is the key)
	filtered     bool     // the publication filters its rows
}

func (t checkedTable) String() string { return t.schema + "." + t.name }

// verifyTablesQuery lists the tables a group's publication replicates (but
// haven's own), their columns (the publication's column list where it has
// one), and their key: the replica identity's index, or the primary key.
const verifyTablesQuery = `
SELECT n.nspname, c.relname, %s,
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
	cols, filtered := "true", "false"
	var version int
	if err := tx.QueryRow(ctx, `SELECT current_setting('server_version_num')::int`).Scan(&version); err != nil {
		return nil, fmt.Errorf("read the primary's version: %w", err)
	}
	if version >= 150000 {
		cols, filtered = "p.attnames IS NULL OR a.attname = ANY (p.attnames)", "p.rowfilter IS NOT NULL"
	}
	rows, err := tx.Query(ctx, fmt.Sprintf(verifyTablesQuery, filtered, cols), wire.PublicationName(group))
	if err != nil {
		return nil, fmt.Errorf("list the replicated tables on the primary: %w", err)
	}
	tables, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (checkedTable, error) {
		var t checkedTable
		err := row.Scan(&t.schema, &t.name, &t.filtered, &t.cols, &t.keys)
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

// rowsSQL selects each row's hash (h), its key's hash (k), its bucket (b),
// its sub-bucket (sb, from other bits of the key's hash) and its key as
// text (key: "id=42", or the row for a table without a key), from from.
func (t checkedTable) rowsSQL(from string) string {
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
	return fmt.Sprintf(`SELECT h, k, ('x' || substr(k, 1, 8))::bit(32)::bigint %% %d AS b, ('x' || substr(k, 9, 8))::bit(32)::bigint %% %d AS sb, key
		FROM (SELECT %s AS h, %s AS k, %s AS key FROM %s) r`, verifyBuckets, verifyBuckets, row, key, shown, from)
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// side is one site's database read under one snapshot: holder keeps the
// snapshot alive (the primary's replication connection that exported it
// with its slot, or DR's transaction that exported it), and reader imports
// it into a transaction per read, so that a table is locked (against a
// TRUNCATE or ALTER there) only while it is read.
type side struct {
	name     string
	holder   *pgx.Conn
	reader   *pgx.Conn
	snapshot string
}

func (s *side) close() {
	for _, c := range []*pgx.Conn{s.reader, s.holder} {
		if c != nil {
			c.Close(context.Background())
		}
	}
}

// errRewritten: the table was emptied or rewritten (TRUNCATE, ALTER TABLE,
// VACUUM FULL) after the snapshot, which such commands do not respect.
var errRewritten = errors.New("rewritten after the snapshot (TRUNCATE, ALTER TABLE, VACUUM FULL, CLUSTER): its rows under the snapshot cannot be read")

// inSnapshot runs f in a transaction of its own under the side's snapshot.
func (s *side) inSnapshot(ctx context.Context, f func(tx pgx.Tx) error) error {
	tx, err := s.reader.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return err
	}
	defer tx.Rollback(context.Background())
	if _, err := tx.Exec(ctx, "SET TRANSACTION SNAPSHOT "+quoteLiteral(s.snapshot)); err != nil {
		return fmt.Errorf("import the snapshot: %w", err)
	}
	if err := f(tx); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// read runs f on the rows of t (rows: their SQL, rowsSQL) under the side's
// snapshot.
func (s *side) read(ctx context.Context, t checkedTable, f func(tx pgx.Tx, rows string) error) error {
	return s.inSnapshot(ctx, func(tx pgx.Tx) error {
		name := pgx.Identifier{t.schema, t.name}.Sanitize()
		var kind string
		err := tx.QueryRow(ctx, `SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)`, name).Scan(&kind)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("no table %s on %s", name, s.name)
		}
		if err != nil {
			return err
		}
		from := "ONLY " + name
		if kind == "p" {
			from = name
		}
		if err := f(tx, t.rowsSQL(from)); err != nil {
			return err
		}
		// pg_class read under the snapshot against each relation read as
		// it is now (and stays, while this transaction holds its locks):
		// a table, or a partitioned table's partitions.
		var rewritten bool
		err = tx.QueryRow(ctx, `SELECT coalesce(bool_or(c.relfilenode <> 0 AND c.relfilenode <> coalesce(pg_relation_filenode(c.oid), 0)), false)
			FROM pg_class c WHERE c.oid = to_regclass($1) OR c.oid IN (SELECT relid FROM pg_partition_tree(to_regclass($1)) WHERE isleaf)`, name).Scan(&rewritten)
		if err != nil {
			return err
		}
		if rewritten {
			return errRewritten
		}
		return nil
	})
}

// bucket sums the rows of one bucket.
type bucket struct {
	rows   int64
	h1, h2 string // sums of the two halves of the rows' hashes (numeric)
}

// sumsSQL sums rows by bucket (by bucket and sub-bucket with sub).
func sumsSQL(rows string, sub bool) string {
	group, where := "b, 0", ""
	if sub {
		group, where = "b, sb", " WHERE b = ANY ($1)"
	}
	return fmt.Sprintf(`SELECT %s, count(*), sum(('x' || substr(h, 1, 16))::bit(64)::bigint::numeric)::text,
		sum(('x' || substr(h, 17, 16))::bit(64)::bigint::numeric)::text FROM (%s) s%s GROUP BY 1, 2`, group, rows, where)
}

// sums reads a table's sums, by bucket, or by sub-bucket of the buckets
// given.
func (s *side) sums(ctx context.Context, t checkedTable, buckets []int64) (map[[2]int64]bucket, error) {
	out := map[[2]int64]bucket{}
	err := s.read(ctx, t, func(tx pgx.Tx, rows string) error {
		var args []any
		if buckets != nil {
			args = append(args, buckets)
		}
		res, err := tx.Query(ctx, sumsSQL(rows, buckets != nil), args...)
		if err != nil {
			return err
		}
		for res.Next() {
			var k [2]int64
			var b bucket
			if err := res.Scan(&k[0], &k[1], &b.rows, &b.h1, &b.h2); err != nil {
				res.Close()
				return err
			}
			out[k] = b
		}
		return res.Err()
	})
	return out, err
}

// listed is a row of a listed sub-bucket: its hash and its key as text.
type listed struct{ h, key string }

// list reads the rows of some sub-buckets (bucket, sub-bucket pairs).
func (s *side) list(ctx context.Context, t checkedTable, pairs [][2]int64) (map[string]listed, error) {
	out := map[string]listed{}
	seen := map[string]int{} // rows of a table without a key, by hash
	var bs, sbs []int64
	for _, p := range pairs {
		bs, sbs = append(bs, p[0]), append(sbs, p[1])
	}
	err := s.read(ctx, t, func(tx pgx.Tx, rows string) error {
		res, err := tx.Query(ctx, fmt.Sprintf(`SELECT k, h, key FROM (%s) s WHERE (b, sb) IN (SELECT * FROM unnest($1::int8[], $2::int8[]))`, rows), bs, sbs)
		if err != nil {
			return err
		}
		for res.Next() {
			var k string
			var l listed
			if err := res.Scan(&k, &l.h, &l.key); err != nil {
				res.Close()
				return err
			}
			if len(t.keys) == 0 {
				// Identical rows of a table without a key share a hash: one
				// more or fewer of them is a difference too.
				seen[k]++
				if n := seen[k]; n > 1 {
					k = fmt.Sprintf("%s#%d", k, n)
				}
			}
			out[k] = l
		}
		return res.Err()
	})
	return out, err
}

// both runs f on the primary and on DR at once.
func both[T any](p, d *side, f func(s *side) (T, error)) (T, T, error, error) {
	var pv T
	var perr error
	done := make(chan struct{})
	go func() { defer close(done); pv, perr = f(p) }()
	dv, derr := f(d)
	<-done
	return pv, dv, perr, derr
}

// differing returns the keys whose sums differ, at most limit of them, and
// whether there were more.
func differing(p, d map[[2]int64]bucket, limit int) ([][2]int64, bool) {
	keys := map[[2]int64]bool{}
	for k := range p {
		keys[k] = true
	}
	for k := range d {
		keys[k] = true
	}
	var out [][2]int64
	for _, k := range slices.SortedFunc(maps.Keys(keys), func(a, b [2]int64) int {
		if a[0] != b[0] {
			return int(a[0] - b[0])
		}
		return int(a[1] - b[1])
	}) {
		if p[k] != d[k] {
			out = append(out, k)
		}
	}
	if len(out) > limit {
		return out[:limit], true
	}
	return out, false
}

// compareTable checks one table on both sides: sums by bucket; for the
// buckets that differ, sums by sub-bucket; for the sub-buckets that
// differ, the rows, by key. A side reads at most a few 65536ths of a large
// table into memory.
func compareTable(ctx context.Context, p, d *side, t checkedTable) TableCheck {
	check := TableCheck{Table: t.String()}
	failed := func(perr, derr error) bool {
		switch {
		case errors.Is(perr, errRewritten) || errors.Is(derr, errRewritten):
			check.NotCompared = true
			where := "on the primary"
			if errors.Is(derr, errRewritten) {
				where = "on DR"
			}
			check.Detail = "not compared: " + where + ", " + errRewritten.Error()
		case perr != nil:
			check.Detail = "reading it on the primary failed: " + pgMessage(perr)
		case derr != nil:
			check.Detail = "reading it on DR failed (does it exist there with these columns?): " + pgMessage(derr)
		default:
			return false
		}
		return true
	}
	ps, ds, perr, derr := both(p, d, func(s *side) (map[[2]int64]bucket, error) { return s.sums(ctx, t, nil) })
	if failed(perr, derr) {
		return check
	}
	for _, b := range ps {
		check.PrimaryRows += b.rows
	}
	for _, b := range ds {
		check.DRRows += b.rows
	}
	buckets, more := differing(ps, ds, maxListedBuckets)
	if len(buckets) == 0 {
		check.Match = true
		return check
	}
	check.KeysTruncated = more
	var ids []int64
	for _, b := range buckets {
		ids = append(ids, b[0])
	}
	ps, ds, perr, derr = both(p, d, func(s *side) (map[[2]int64]bucket, error) { return s.sums(ctx, t, ids) })
	if failed(perr, derr) {
		return check
	}
	subs, more := differing(ps, ds, maxListedBuckets)
	check.KeysTruncated = check.KeysTruncated || more
	pl, dl, perr, derr := both(p, d, func(s *side) (map[string]listed, error) { return s.list(ctx, t, subs) })
	if failed(perr, derr) {
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
		pr := pl[k]
		dr, ok := dl[k]
		switch {
		case !ok:
			add(&check.MissingOnDR, pr.key)
		case dr.h != pr.h:
			add(&check.Differing, pr.key)
		}
	}
	for _, k := range slices.Sorted(maps.Keys(dl)) {
		if _, ok := pl[k]; !ok {
			add(&check.ExtraOnDR, dl[k].key)
		}
	}
	check.Detail = fmt.Sprintf("%d of %d key buckets differ", len(buckets), verifyBuckets)
	return check
}

func pgMessage(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Message
	}
	return err.Error()
}
