package e2e

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// crmSchema is a CRM's tables with the types a CRM uses: text, numeric,
// timestamptz, jsonb, bool, uuid, bytea, arrays, NULLs and large text that
// PostgreSQL TOASTs out of line. Every table has a counter n that each
// update increments, so that an update applied twice on DR shows.
const crmSchema = `
CREATE TABLE accounts (
  id bigserial PRIMARY KEY, name text NOT NULL, industry text, revenue numeric(14,2), active bool,
  tags text[], settings jsonb, external_id uuid, logo bytea, created_at timestamptz DEFAULT now(),
  updated_at timestamptz, n int NOT NULL DEFAULT 0);
CREATE TABLE contacts (
  id bigserial PRIMARY KEY, account_id bigint REFERENCES accounts(id) ON DELETE CASCADE,
  first_name text, last_name text, email text, phone text, notes text, scores int[],
  updated_at timestamptz, n int NOT NULL DEFAULT 0);
CREATE TABLE deals (
  id bigserial PRIMARY KEY, account_id bigint, title text, stage text, amount numeric(12,2),
  closed_at timestamptz, n int NOT NULL DEFAULT 0);
CREATE TABLE activities (
  id bigserial PRIMARY KEY, contact_id bigint, kind text, body text, at timestamptz DEFAULT now());
CREATE TABLE marker (id bigint PRIMARY KEY);`

// crmTables maps each table to its ORDER BY for digests.
var crmTables = map[string]string{"accounts": "id", "contacts": "id", "deals": "id", "activities": "id", "marker": "id"}

// seedCRM fills the schema; large notes (random, incompressible, > 8 kB)
// are stored out of line.
func seedCRM(t *testing.T, conn *pgx.Conn, accounts int) {
	t.Helper()
	mustExec(t, conn, crmSchema)
	mustExec(t, conn, `
INSERT INTO accounts (name, industry, revenue, active, tags, settings, external_id, logo, updated_at)
SELECT 'Account ' || g, (ARRAY['software','retail','finance',NULL])[1 + g % 4], (g * 1234.56)::numeric(14,2), g % 3 = 0,
       ARRAY['tag' || g % 7, 'quote"d', 'comma,tag', NULL], jsonb_build_object('tier', g % 5, 'note', 'ünïcödé ' || g),
       md5(g::text)::uuid, decode(md5(g::text), 'hex'), now()
FROM generate_series(1, $1) g`, accounts)
	mustExec(t, conn, `
INSERT INTO contacts (account_id, first_name, last_name, email, phone, notes, scores, updated_at)
SELECT 1 + g % $1, 'First' || g, CASE WHEN g % 10 = 0 THEN NULL ELSE 'Last' || g END, 'c' || g || '@example.com',
       '+1-555-' || lpad(g::text, 7, '0'),
       CASE WHEN g % 20 = 0 THEN (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 400)) ELSE E'line1\nline2\ttab\\slash' END,
       ARRAY[g % 100, NULL, -g], now()
FROM generate_series(1, $1 * 5) g`, accounts)
	mustExec(t, conn, `
INSERT INTO deals (account_id, title, stage, amount)
SELECT 1 + g % $1, 'Deal ' || g, (ARRAY['prospect','qualified','won','lost'])[1 + g % 4], (g % 100000) + 0.5
FROM generate_series(1, $1 * 2) g`, accounts)
	mustExec(t, conn, `
INSERT INTO activities (contact_id, kind, body)
SELECT 1 + g % ($1 * 5), (ARRAY['call','email','meeting','note'])[1 + g % 4], 'seed ' || repeat(md5(g::text), 3)
FROM generate_series(1, $1 * 10) g`, accounts)
}

// workload runs CRM transactions from several connections until stopped.
type workload struct {
	stop    chan struct{}
	stopped sync.Once
	wg      sync.WaitGroup
	commits atomic.Int64
	mu      sync.Mutex
	err     error
}

func startWorkload(t *testing.T, url string, clients int, maxAccount int64) *workload {
	t.Helper()
	return startLoad(t, url, clients, func(ctx context.Context, conn *pgx.Conn, rng *rand.Rand) error {
		return crmTransaction(ctx, conn, rng, maxAccount)
	})
}

// startLoad runs transactions from several connections until stopped; a
// deadlock or serialization failure between clients is retried.
func startLoad(t *testing.T, url string, clients int, txn func(context.Context, *pgx.Conn, *rand.Rand) error) *workload {
	t.Helper()
	w := &workload{stop: make(chan struct{})}
	for i := range clients {
		conn := connect(t, url)
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), uint64(time.Now().UnixNano())))
			for {
				select {
				case <-w.stop:
					return
				default:
				}
				err := txn(t.Context(), conn, rng)
				if err != nil {
					var pgErr *pgconn.PgError
					if errors.As(err, &pgErr) && (pgErr.Code == "40P01" || pgErr.Code == "40001") {
						continue // deadlock between clients: the transaction rolled back, nothing to replicate
					}
					if t.Context().Err() == nil {
						w.mu.Lock()
						w.err = err
						w.mu.Unlock()
					}
					return
				}
				w.commits.Add(1)
			}
		}()
	}
	// A test that fails with clients running: they stop before their
	// connections close (cleanups run last-registered first).
	t.Cleanup(w.abandon)
	return w
}

// abandon stops the clients without judging their errors: their server
// was killed.
func (w *workload) abandon() {
	w.stopped.Do(func() { close(w.stop) })
	w.wg.Wait()
}

// finish stops the clients and fails the test if one failed.
func (w *workload) finish(t *testing.T) {
	t.Helper()
	w.abandon()
	if w.err != nil {
		t.Fatalf("workload: %v", w.err)
	}
	t.Logf("workload committed %d transactions", w.commits.Load())
}

// crmTransaction is one CRM transaction: a mix of inserts, updates (each
// incrementing n) and deletes across the tables, now and then a rolled-back
// one and a large text change.
func crmTransaction(ctx context.Context, conn *pgx.Conn, rng *rand.Rand, maxAccount int64) error {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback(ctx) }()
	acct := 1 + rng.Int64N(maxAccount)
	contact := 1 + rng.Int64N(maxAccount*5)
	stmts := []struct {
		sql  string
		args []any
	}{
		{`INSERT INTO activities (contact_id, kind, body) VALUES ($1, 'call', $2)`, []any{contact, fmt.Sprintf("call %d %s", rng.Int(), strings.Repeat("x", rng.IntN(300)))}},
		{`UPDATE contacts SET phone = $2, updated_at = now(), n = n + 1 WHERE id = $1`, []any{contact, fmt.Sprintf("+1-555-%07d", rng.IntN(9999999))}},
		{`UPDATE deals SET stage = (ARRAY['prospect','qualified','won','lost'])[1 + $2::int % 4], amount = $3, n = n + 1 WHERE id = $1`,
			[]any{1 + rng.Int64N(maxAccount*2), rng.IntN(4), fmt.Sprintf("%d.%02d", rng.IntN(1000000), rng.IntN(100))}},
		{`UPDATE accounts SET settings = settings || jsonb_build_object('seen', $2::int), tags = array_append(tags[1:3], $3), active = NOT active, n = n + 1 WHERE id = $1`,
			[]any{acct, rng.IntN(1000), fmt.Sprintf("t%d", rng.IntN(50))}},
		{`INSERT INTO contacts (account_id, first_name, last_name, email, scores) VALUES ($1, 'New', NULL, $2, ARRAY[1,2,3])`, []any{acct, fmt.Sprintf("new%d@example.com", rng.Int())}},
	}
	for _, s := range stmts {
		if _, err := tx.Exec(ctx, s.sql, s.args...); err != nil {
			return err
		}
	}
	switch rng.IntN(20) {
	case 0:
		if _, err := tx.Exec(ctx, `DELETE FROM activities WHERE id = (SELECT id FROM activities WHERE id >= $1 ORDER BY id LIMIT 1)`, rng.Int64N(maxAccount*10)); err != nil {
			return err
		}
	case 1:
		if _, err := tx.Exec(ctx, `UPDATE contacts SET notes = $2, n = n + 1 WHERE id = $1`, contact, randomText(rng, 9000+rng.IntN(9000))); err != nil {
			return err
		}
	case 2:
		// A rolled-back transaction must leave no trace on DR.
		return tx.Rollback(ctx)
	case 3:
		if _, err := tx.Exec(ctx, `DELETE FROM deals WHERE id = $1`, 1+rng.Int64N(maxAccount*2)); err != nil {
			return err
		}
	}
	return tx.Commit(ctx)
}

func randomText(rng *rand.Rand, n int) string {
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \t\n\\'\"é"
	var b strings.Builder
	for b.Len() < n {
		b.WriteString(string([]rune(alphabet)[rng.IntN(len([]rune(alphabet)))]))
	}
	return b.String()
}

// waitCaughtUp writes a marker row on the primary and waits until DR has it
// and has loaded every table of its latest snapshot (the marker may be
// part of a snapshot whose other tables are still loading).
func waitCaughtUp(t *testing.T, primary, dr *pgx.Conn, id int64, timeout time.Duration) {
	t.Helper()
	mustExec(t, primary, `INSERT INTO marker (id) VALUES ($1)`, id)
	waitFor(t, timeout, fmt.Sprintf("marker %d on DR", id), func() (bool, error) {
		seen, err := markerSeen(t.Context(), dr, id)
		if !seen || err != nil {
			return false, err
		}
		var loaded bool
		err = dr.QueryRow(t.Context(), `SELECT bool_and(snapshot_done) FROM haven.apply_position`).Scan(&loaded)
		return loaded, err
	})
}

func TestReplicatesCRMWorkloadExactly(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 300)

	startHaven(t, "agent", s.agentArgs()...)
	startHaven(t, "standby", s.standbyArgs()...)

	w := startWorkload(t, s.primaryURL(), 4, 300)
	waitFor(t, 60*time.Second, "2000 workload transactions", func() (bool, error) { return w.commits.Load() >= 2000, nil })
	w.finish(t)

	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	assertEqual(t, primary, dr, crmTables)

	// Other sessions cannot write on DR by default: the copy cannot drift.
	if _, err := dr.Exec(t.Context(), `INSERT INTO marker (id) VALUES (999)`); err == nil || !strings.Contains(err.Error(), "read-only transaction") {
		t.Errorf("a write on DR by another session: %v, want it refused as read-only", err)
	}
}
