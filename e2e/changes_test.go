package e2e

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestEveryKindOfChangeArrives covers what a CRM does beyond plain rows:
// updates that leave large TOASTed values untouched, TRUNCATE of several
// tables at once (CASCADE, RESTART IDENTITY), a replica identity on a unique
// index, savepoints rolled back to, rolled-back and two-phase transactions,
// and transactions across tables that a reader on DR must never see half of.
func TestEveryKindOfChangeArrives(t *testing.T) {
	s := newSiteWith(t, map[string]string{"max_prepared_transactions": "10"})
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `
CREATE TABLE docs (id int PRIMARY KEY, title text, body text, attachment bytea, version int NOT NULL DEFAULT 0);
CREATE TABLE parents (id serial PRIMARY KEY, name text);
CREATE TABLE children (id serial PRIMARY KEY, parent_id int REFERENCES parents(id), name text);
CREATE TABLE tags (code text NOT NULL, label text);
CREATE UNIQUE INDEX tags_code ON tags (code);
ALTER TABLE tags REPLICA IDENTITY USING INDEX tags_code;
CREATE TABLE ledger_a (id int PRIMARY KEY, amount int);
CREATE TABLE ledger_b (id int PRIMARY KEY, amount int);
CREATE TABLE marker (id bigint PRIMARY KEY);
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;`)
	// Large values: body is stored out of line uncompressed, attachment is
	// compressed and (being random) out of line too.
	mustExec(t, primary, `INSERT INTO docs (id, title, body, attachment)
		SELECT g, 'doc ' || g, repeat('lorem ipsum ' || g, 1000), (SELECT string_agg(decode(md5(random()::text), 'hex'), '') FROM generate_series(1, 500))
		FROM generate_series(1, 20) g`)

	startHaven(t, "agent", s.agentArgs()...)
	standby := startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	// A DR reader checks, in each of its snapshots, that both ledgers hold
	// the same rows: every transaction writes to both.
	var torn atomic.Int64
	var reads atomic.Int64
	ctx, stopReader := context.WithCancel(t.Context())
	readerDone := make(chan struct{})
	reader := connect(t, s.drURL())
	t.Cleanup(func() { stopReader(); <-readerDone })
	go func() {
		defer close(readerDone)
		for ctx.Err() == nil {
			var a, b int64
			if err := reader.QueryRow(ctx, `SELECT (SELECT count(*) FROM ledger_a), (SELECT count(*) FROM ledger_b)`).Scan(&a, &b); err != nil {
				continue
			}
			reads.Add(1)
			if a != b {
				torn.Add(1)
			}
		}
	}()

	// Unchanged TOAST: updates that do not touch body or attachment.
	mustExec(t, primary, `UPDATE docs SET title = title || ' (edited)', version = version + 1 WHERE id <= 10`)
	mustExec(t, primary, `UPDATE docs SET version = version + 1`)
	mustExec(t, primary, `UPDATE docs SET body = body || ' appendix' WHERE id = 3`)

	// TRUNCATE of several tables, with CASCADE and RESTART IDENTITY.
	mustExec(t, primary, `INSERT INTO parents (name) SELECT 'p' || g FROM generate_series(1, 5) g;
		INSERT INTO children (parent_id, name) SELECT 1 + g % 5, 'c' || g FROM generate_series(1, 10) g`)
	mustExec(t, primary, `TRUNCATE parents RESTART IDENTITY CASCADE`)
	mustExec(t, primary, `INSERT INTO parents (name) VALUES ('after truncate')`)
	mustExec(t, primary, `INSERT INTO tags VALUES ('a', 'A'), ('b', 'B'), ('c', 'C')`)
	mustExec(t, primary, `TRUNCATE tags, children`)
	mustExec(t, primary, `INSERT INTO tags VALUES ('x', 'X'), ('y', 'Y')`)

	// Replica identity on a unique index: the key itself changes, too.
	mustExec(t, primary, `UPDATE tags SET label = 'ex' WHERE code = 'x'`)
	mustExec(t, primary, `UPDATE tags SET code = 'z' WHERE code = 'y'`)
	mustExec(t, primary, `DELETE FROM tags WHERE code = 'x'`)

	// Savepoints, rollbacks, two-phase commit.
	mustExec(t, primary, `BEGIN;
		INSERT INTO ledger_a VALUES (1, 10); INSERT INTO ledger_b VALUES (1, 10);
		SAVEPOINT s1;
		INSERT INTO ledger_a VALUES (2, 20); INSERT INTO ledger_b VALUES (2, 20);
		ROLLBACK TO SAVEPOINT s1;
		INSERT INTO ledger_a VALUES (3, 30); INSERT INTO ledger_b VALUES (3, 30);
		SAVEPOINT s2; UPDATE ledger_a SET amount = 31 WHERE id = 3; UPDATE ledger_b SET amount = 31 WHERE id = 3; RELEASE SAVEPOINT s2;
		COMMIT`)
	mustExec(t, primary, `BEGIN; INSERT INTO ledger_a VALUES (4, 40); INSERT INTO ledger_b VALUES (4, 40); ROLLBACK`)
	mustExec(t, primary, `BEGIN; INSERT INTO ledger_a VALUES (5, 50); INSERT INTO ledger_b VALUES (5, 50); PREPARE TRANSACTION 'kept'`)
	mustExec(t, primary, `BEGIN; INSERT INTO ledger_a VALUES (6, 60); INSERT INTO ledger_b VALUES (6, 60); PREPARE TRANSACTION 'dropped'`)
	mustExec(t, primary, `COMMIT PREPARED 'kept'`)
	mustExec(t, primary, `ROLLBACK PREPARED 'dropped'`)
	for i := 100; i < 400; i++ {
		tx, err := primary.Begin(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		for _, table := range []string{"ledger_a", "ledger_b"} {
			if _, err := tx.Exec(t.Context(), `INSERT INTO `+table+` SELECT g, g FROM generate_series($1::int, $1::int + 9) g`, i*10); err != nil {
				t.Fatal(err)
			}
		}
		if err := tx.Commit(t.Context()); err != nil {
			t.Fatal(err)
		}
	}

	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	stopReader()
	<-readerDone
	assertEqual(t, primary, dr, map[string]string{"docs": "id", "parents": "id", "children": "id", "tags": "code",
		"ledger_a": "id", "ledger_b": "id", "marker": "id"})
	if torn.Load() > 0 {
		t.Errorf("a DR reader saw the two ledgers differ in %d of %d reads: a source transaction was visible half-applied", torn.Load(), reads.Load())
	} else {
		t.Logf("a DR reader never saw half a transaction in %d reads", reads.Load())
	}
	var ids string
	if err := dr.QueryRow(t.Context(), `SELECT string_agg(id::text, ',' ORDER BY id) FROM ledger_a WHERE id < 100`).Scan(&ids); err != nil {
		t.Fatal(err)
	}
	if ids != "1,3,5" {
		t.Errorf("DR ledger ids below 100 are %q, want 1,3,5 (rolled back, rolled back to savepoint and ROLLBACK PREPARED leave nothing)", ids)
	}
	var seq int64
	if err := dr.QueryRow(t.Context(), `SELECT id FROM parents`).Scan(&seq); err != nil || seq != 1 {
		t.Errorf("after TRUNCATE … RESTART IDENTITY the new parent has id %d (%v), want 1", seq, err)
	}
	var sameToast bool
	if err := dr.QueryRow(t.Context(), `SELECT bool_and(length(body) > 10000 AND length(attachment) = 8000) FROM docs`).Scan(&sameToast); err != nil || !sameToast {
		t.Errorf("large values on DR were lost by updates that did not touch them (%v)", err)
	}
	if strings.Contains(standby.output(), "found no row") {
		t.Error("the standby reported updates or deletes that found no row")
	}
}
