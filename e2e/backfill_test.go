package e2e

import (
	"context"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// startChurn updates, deletes, inserts and re-keys rows (up, and down into
// what a backfill has already copied) of a table with a TOASTed column
// from several connections until stopped: an update that
// leaves the large column alone sends no value for it, so a row DR lacks
// cannot be rebuilt from the stream alone.
func startChurn(t *testing.T, url, table string, clients int, maxID int) *workload {
	var next atomic.Int64
	next.Store(int64(maxID) * 10)
	return startLoad(t, url, clients, func(ctx context.Context, conn *pgx.Conn, rng *rand.Rand) error {
		return pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			for range 1 + rng.IntN(4) {
				id := 1 + rng.IntN(maxID)
				var err error
				switch rng.IntN(12) {
				case 0:
					_, err = tx.Exec(ctx, `DELETE FROM `+table+` WHERE id = $1`, id)
				case 1:
					_, err = tx.Exec(ctx, `INSERT INTO `+table+` (id, grp, note) VALUES ($1, 0, 'inserted')`, next.Add(1))
				case 2:
					_, err = tx.Exec(ctx, `UPDATE `+table+` SET id = $2 WHERE id = $1`, id, next.Add(1))
				case 3:
					// Into the part of the table a backfill has copied.
					_, err = tx.Exec(ctx, `UPDATE `+table+` SET id = $2 WHERE id = $1`, id, -next.Add(1))
				default:
					_, err = tx.Exec(ctx, `UPDATE `+table+` SET note = note || '+', grp = grp + 1 WHERE id = $1`, id)
				}
				if err != nil {
					return err
				}
			}
			return nil
		})
	})
}

func backfillsOnDR(ctx context.Context, dr *pgx.Conn) (int, error) {
	var n int
	err := dr.QueryRow(ctx, `SELECT count(*) FROM haven.backfills`).Scan(&n)
	return n, err
}

// TestTablesJoiningWithRowsAreBackfilled: a table made with CREATE TABLE
// AS, given its primary key afterwards (in a commit a synchronous standby
// holds back), joins the running group; its rows are copied while the
// stream goes on, under concurrent updates (most leaving a TOASTed column
// alone), deletes, inserts and key changes, and with the agent SIGKILLed in
// the middle. DR ends equal to the primary.
func TestTablesJoiningWithRowsAreBackfilled(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 20)
	// A temporary table the DR site never sees feeds the new table.
	const rows = 20000
	mustExec(t, primary, `CREATE TEMP TABLE staging AS SELECT g AS id FROM generate_series(1, $1) g`, rows)
	agentArgs := s.agentArgs("--backfill-chunk-rows", "100")
	agent := startHaven(t, "agent", agentArgs...)
	standby := startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	mustExec(t, primary, `CREATE TABLE big AS SELECT id, id % 7 AS grp, 'note ' || id AS note,
		CASE WHEN id % 100 = 0 THEN (SELECT string_agg(md5(random()::text || g), '') FROM generate_series(1, 200 + id % 2) g) END AS blob
		FROM staging`)
	mustExec(t, primary, `DROP TABLE staging`)
	c := startChurn(t, s.primaryURL(), "big", 3, rows)
	// The key comes in a commit a synchronous standby holds back: the
	// agent decodes it while the new key is not yet visible to it.
	heldBackCommit(t, s.primaryURL(), `ALTER TABLE big ADD PRIMARY KEY (id)`, func() bool {
		return strings.Contains(agent.output(), "table joined the group with rows in it")
	})

	waitFor(t, 60*time.Second, "the backfill to start on DR", func() (bool, error) {
		var n int
		err := dr.QueryRow(t.Context(), `SELECT count(*) FROM big`).Scan(&n)
		return n > rows/10, err
	})
	agent.kill()
	if n, err := backfillsOnDR(t.Context(), dr); err != nil || n != 1 {
		t.Logf("the agent was killed with %d backfills open on DR (%v): the restart case is not exercised this run", n, err)
	}
	startHaven(t, "agent", agentArgs...)
	waitFor(t, 120*time.Second, "the backfill to finish", func() (bool, error) {
		n, err := backfillsOnDR(t.Context(), dr)
		return n == 0, err
	})
	c.finish(t)
	// DDL after the agent's restart (which installs DDL capture again)
	// reaches DR, and only it does.
	mustExec(t, primary, `ALTER TABLE big ADD COLUMN extra int DEFAULT 7`)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	var triggers int
	if err := dr.QueryRow(t.Context(), `SELECT count(*) FROM pg_event_trigger`).Scan(&triggers); err != nil || triggers != 0 {
		t.Errorf("DR has %d event triggers (%v): haven's capture of the primary was replayed there", triggers, err)
	}
	assertEqual(t, primary, dr, map[string]string{"big": "id", "accounts": "id", "contacts": "id"})
	if t.Failed() {
		diffIDs(t, primary, dr, "big")
	}
	assertSameSchema(t, primary, dr)
	if strings.Contains(standby.output(), "found no row on DR") {
		t.Error("the standby reported missing rows: a backfilled table's expected misses were taken for drift")
	}
}

// TestATableAddedToTablesIsBackfilled: a group of some tables grows
// (--tables, agent restarted) by a table DR has empty (from the initial
// snapshot's schema) and by one made later that DR lacks; DR gets the
// latter's schema, both tables' rows, and the changes made meanwhile.
func TestATableAddedToTablesIsBackfilled(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 200)
	agent := startHaven(t, "agent", s.agentArgs("--tables", "accounts,marker")...)
	standby := startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	mustExec(t, primary, `CREATE TABLE leads (id serial PRIMARY KEY, account_id bigint REFERENCES accounts (id), grp int DEFAULT 0, note text DEFAULT 'new')`)
	mustExec(t, primary, `INSERT INTO leads (account_id) SELECT 1 + g % 200 FROM generate_series(1, 3000) g`)

	agent.stop()
	mustExec(t, primary, `UPDATE contacts SET phone = 'changed while out of the group', n = n + 1 WHERE id % 3 = 0`)
	startHaven(t, "agent", s.agentArgs("--tables", "accounts,marker,contacts,leads", "--backfill-chunk-rows", "150")...)
	w := startWorkload(t, s.primaryURL(), 2, 200)
	lc := startChurn(t, s.primaryURL(), "leads", 1, 3000)
	// Both backfills ended on DR (haven.backfills is also empty before
	// they begin).
	waitFor(t, 60*time.Second, "the backfills to finish", func() (bool, error) {
		var done bool
		err := dr.QueryRow(t.Context(), `SELECT NOT EXISTS (SELECT 1 FROM haven.backfills)`).Scan(&done)
		return done && strings.Count(standby.output(), "backfill complete: the DR table holds every row") == 2 && w.commits.Load() > 200, err
	})
	w.finish(t)
	lc.finish(t)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	assertEqual(t, primary, dr, map[string]string{"accounts": "id", "contacts": "id", "leads": "id"})
	var fks int
	if err := dr.QueryRow(t.Context(), `SELECT count(*) FROM pg_constraint WHERE conrelid = 'leads'::regclass AND contype = 'f'`).Scan(&fks); err != nil || fks != 1 {
		t.Errorf("DR's leads has %d foreign keys (%v), want the primary's 1: its schema did not come from pg_dump", fks, err)
	}
}

// diffIDs logs the ids one side of a table has and the other lacks.
func diffIDs(t *testing.T, a, b *pgx.Conn, table string) {
	t.Helper()
	ids := func(c *pgx.Conn) map[int64]string {
		rows, err := c.Query(t.Context(), `SELECT id, t::text FROM `+table+` t`)
		if err != nil {
			t.Fatal(err)
		}
		out := map[int64]string{}
		for rows.Next() {
			var id int64
			var text string
			if err := rows.Scan(&id, &text); err != nil {
				t.Fatal(err)
			}
			out[id] = text
		}
		return out
	}
	left, right := ids(a), ids(b)
	n := 0
	for id, row := range left {
		if other, ok := right[id]; (!ok || other != row) && n < 20 {
			n++
			t.Logf("%s id %d: primary %.120q, DR %.120q (present %v)", table, id, row, other, ok)
		}
	}
	for id, row := range right {
		if _, ok := left[id]; !ok && n < 20 {
			n++
			t.Logf("%s id %d only on DR: %.120q", table, id, row)
		}
	}
}

// TestBackfillFollowsSchemaChanges: tables joining with rows while, during
// their backfill, one's key changes type (its order changes), one gets
// REPLICA IDENTITY FULL, one is dropped and made again under its name,
// and a partitioned table gets its key from its parent, partitions filled.
func TestBackfillFollowsSchemaChanges(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 5)
	startHaven(t, "agent", s.agentArgs("--backfill-chunk-rows", "100")...)
	standby := startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	mustExec(t, primary, `CREATE TABLE p (id int NOT NULL, region int NOT NULL, note text) PARTITION BY LIST (region);
		CREATE TABLE p1 PARTITION OF p FOR VALUES IN (1); CREATE TABLE p2 PARTITION OF p FOR VALUES IN (2)`)
	mustExec(t, primary, `INSERT INTO p SELECT g, 1 + g % 2, 'p ' || g FROM generate_series(1, 3000) g`)
	for _, name := range []string{"retyped", "fulled", "remade"} {
		mustExec(t, primary, `CREATE TABLE `+name+` AS SELECT g AS id, 'note ' || g AS note FROM generate_series(1, 8000) g`)
	}
	mustExec(t, primary, `ALTER TABLE retyped ADD PRIMARY KEY (id); ALTER TABLE fulled ADD PRIMARY KEY (id); ALTER TABLE remade ADD PRIMARY KEY (id);
		ALTER TABLE p ADD PRIMARY KEY (id, region)`)
	waitFor(t, 60*time.Second, "the backfills to be under way", func() (bool, error) {
		var n int
		err := dr.QueryRow(t.Context(), `SELECT (SELECT count(*) FROM retyped) + (SELECT count(*) FROM fulled)`).Scan(&n)
		return n >= 400, err
	})
	mustExec(t, primary, `ALTER TABLE retyped ALTER COLUMN id TYPE text`)
	mustExec(t, primary, `ALTER TABLE fulled REPLICA IDENTITY FULL`)
	mustExec(t, primary, `UPDATE fulled SET note = note || '+' WHERE id % 5 = 0`)
	mustExec(t, primary, `DROP TABLE remade`)
	mustExec(t, primary, `CREATE TABLE remade AS SELECT g AS id, 'again ' || g AS note FROM generate_series(1, 6000) g`)
	mustExec(t, primary, `ALTER TABLE remade ADD PRIMARY KEY (id)`)
	waitFor(t, 120*time.Second, "the backfills to finish", func() (bool, error) {
		n, err := backfillsOnDR(t.Context(), dr)
		return n == 0, err
	})
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	assertEqual(t, primary, dr, map[string]string{"retyped": "id", "fulled": "id", "remade": "id", "p": "id, region"})
	if strings.Contains(standby.output(), "found no row on DR") {
		t.Error("the standby reported missing rows during a backfill")
	}
}
