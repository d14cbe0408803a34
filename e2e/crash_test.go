package e2e

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/haven-dr/haven/proto/wire"
)

// countApplies installs, on DR, an ENABLE ALWAYS trigger (it fires even under
// session_replication_role = replica) that counts every UPDATE the standby
// applies to a table, per row. Compared with the primary's counter n, it
// shows whether any update was applied twice or not at all.
func countApplies(t *testing.T, dr *pgx.Conn, table string) {
	t.Helper()
	mustExec(t, dr, fmt.Sprintf(`
CREATE TABLE applied_%[1]s (id bigint PRIMARY KEY, updates int NOT NULL);
CREATE FUNCTION count_%[1]s() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO applied_%[1]s VALUES (NEW.id, 1) ON CONFLICT (id) DO UPDATE SET updates = applied_%[1]s.updates + 1;
  RETURN NEW;
END $$;
CREATE TRIGGER count_%[1]s AFTER UPDATE ON %[1]s FOR EACH ROW EXECUTE FUNCTION count_%[1]s();
ALTER TABLE %[1]s ENABLE ALWAYS TRIGGER count_%[1]s;`, table))
}

type idCount struct{ ID, N int64 }

// assertAppliedOnce checks that every row's update count on DR equals the
// number of updates the primary made to it. Rows deleted since are not
// judged.
func assertAppliedOnce(t *testing.T, primary, dr *pgx.Conn, table string) {
	t.Helper()
	rows, err := primary.Query(t.Context(), fmt.Sprintf(`SELECT id, n FROM %s ORDER BY id`, table))
	if err != nil {
		t.Fatal(err)
	}
	want, err := pgx.CollectRows(rows, pgx.RowToStructByPos[idCount])
	if err != nil {
		t.Fatal(err)
	}
	rows, err = dr.Query(t.Context(), fmt.Sprintf(`SELECT a.id, a.updates FROM applied_%s a ORDER BY a.id`, table))
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowToStructByPos[idCount])
	if err != nil {
		t.Fatal(err)
	}
	gotBy := map[int64]int64{}
	for _, g := range got {
		gotBy[g.ID] = g.N
	}
	bad, updated := 0, 0
	for _, w := range want {
		if w.N > 0 {
			updated++
		}
		if gotBy[w.ID] != w.N {
			bad++
			if bad <= 10 {
				t.Errorf("%s id %d: updated %d times on the primary, applied %d times on DR", table, w.ID, w.N, gotBy[w.ID])
			}
		}
	}
	if bad == 0 {
		t.Logf("%s: each of %d updated rows applied exactly as often as it was updated", table, updated)
	}
}

func streamMessages(t *testing.T, js jetstream.JetStream, group string) uint64 {
	t.Helper()
	st, err := js.Stream(t.Context(), wire.StreamName(group))
	if err != nil {
		return 0
	}
	info, err := st.Info(t.Context())
	if err != nil {
		return 0
	}
	return info.State.LastSeq
}

// bigTransaction inserts rows activities and updates every contact up to
// contacts, in one transaction of several thousand rows.
func bigTransaction(t *testing.T, conn *pgx.Conn, rows, contacts int) {
	t.Helper()
	tx, err := conn.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(t.Context(), `INSERT INTO activities (contact_id, kind, body) SELECT g, 'bulk', $2 || g FROM generate_series(1, $1) g`,
		rows, strings.Repeat("bulk import ", 20)); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(t.Context(), `UPDATE contacts SET n = n + 1, updated_at = now() WHERE id <= $1`, contacts); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(t.Context()); err != nil {
		t.Fatal(err)
	}
}

func TestSurvivesSIGKILLMidStreamAndMidBatch(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 200)

	agent := startHaven(t, "agent", s.agentArgs("--chunk-bytes", "65536")...)
	standby := startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	drWriter := connect(t, s.drWriteURL())
	countApplies(t, drWriter, "contacts")
	countApplies(t, drWriter, "deals")

	js := s.nats.JetStream(t)

	w := startWorkload(t, s.primaryURL(), 3, 200)

	// 1. SIGKILL the agent while it publishes the chunks of a large transaction.
	before := streamMessages(t, js, s.group)
	bigTransaction(t, primary, 20000, 1000)
	waitFor(t, 30*time.Second, "the agent to publish part of the large transaction", func() (bool, error) {
		return streamMessages(t, js, s.group) > before+5, nil
	})
	agent.kill()
	t.Logf("agent killed after %d of the large transaction's messages", streamMessages(t, js, s.group)-before)
	// Restarted with another chunk size: the large transaction is cut
	// differently than by the killed agent.
	agent = startHaven(t, "agent-restarted", s.agentArgs("--chunk-bytes", "20000")...)

	// 2. SIGKILL the standby while it applies a large transaction, inside
	// its open target transaction.
	bigTransaction(t, primary, 20000, 1000)
	waitFor(t, 60*time.Second, "the standby to be inside a target transaction", func() (bool, error) {
		var busy int
		err := dr.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity
			WHERE application_name = 'haven_standby_crm' AND backend_xid IS NOT NULL`).Scan(&busy)
		return busy > 0, err
	})
	standby.kill()
	t.Log("standby killed inside a target transaction")
	standby = startHaven(t, "standby-restarted", s.standbyArgs()...)

	// 3. Both at once, while a third large transaction is in flight.
	bigTransaction(t, primary, 20000, 1000)
	agent.kill()
	standby.kill()
	startHaven(t, "agent-restarted-2", s.agentArgs("--chunk-bytes", "65536")...)
	startHaven(t, "standby-restarted-2", s.standbyArgs()...)

	waitFor(t, 60*time.Second, "more workload after the kills", func() (bool, error) { return w.commits.Load() >= 600, nil })
	w.finish(t)
	waitCaughtUp(t, primary, dr, 2, 120*time.Second)
	assertEqual(t, primary, dr, crmTables)
	assertAppliedOnce(t, primary, dr, "contacts")
	assertAppliedOnce(t, primary, dr, "deals")
}

// TestSurvivesDRCrashWhileApplying crashes the DR server (SIGKILL of the
// postmaster and its backends) twice while the standby catches up a
// backlog: once at a target transaction's COMMIT (the last statement DR
// ran), once inside a target transaction. The standby reconnects by itself and
// goes on from the position DR kept, applying each change exactly once.
// What it had reported as applied before a crash survived the crash.
func TestSurvivesDRCrashWhileApplying(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 200)
	startHaven(t, "agent", s.agentArgs()...)
	// Small groups: many commits, so that the crash finds one in flight.
	metrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	standbyArgs := s.standbyArgs("--group-changes", "100", "--http-addr", metrics)
	standby := startHaven(t, "standby", standbyArgs...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	drWriter := connect(t, s.drWriteURL())
	countApplies(t, drWriter, "contacts")
	countApplies(t, drWriter, "deals")
	standby.stop()

	// A backlog in the stream, the standby stopped.
	w := startWorkload(t, s.primaryURL(), 3, 200)
	waitFor(t, 60*time.Second, "a backlog", func() (bool, error) { return w.commits.Load() >= 3000, nil })
	startHaven(t, "standby-restarted", standbyArgs...)

	applied := func(conn *pgx.Conn) (seq int64, err error) {
		err = conn.QueryRow(t.Context(), `SELECT stream_seq FROM haven.apply_position`).Scan(&seq)
		return seq, err
	}
	from, err := applied(dr)
	if err != nil {
		t.Fatal(err)
	}
	for i, when := range []string{"at a COMMIT", "inside a target transaction"} {
		waitFor(t, 60*time.Second, "the standby to apply part of the backlog, "+when, func() (bool, error) {
			seq, err := applied(dr)
			if err != nil || seq <= from {
				return false, err
			}
			var n int
			err = dr.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity
				WHERE application_name = 'haven_standby_crm' AND CASE WHEN $1 THEN query = 'COMMIT' ELSE backend_xid IS NOT NULL END`, i == 0).Scan(&n)
			return n > 0, err
		})
		reported := reportedAppliedLSN(t, metrics)
		if err := s.dr.Kill(); err != nil {
			t.Fatal(err)
		}
		t.Logf("DR server killed %s, the stream at %d, %d reported applied", when, streamMessages(t, s.nats.JetStream(t), s.group), reported)
		if err := s.dr.Restart(t.Context()); err != nil {
			t.Fatal(err)
		}
		dr = connect(t, s.drURL())
		if from, err = applied(dr); err != nil {
			t.Fatal(err)
		}
		var kept uint64
		if err := dr.QueryRow(t.Context(), `SELECT (commit_lsn - '0/0')::bigint FROM haven.apply_position`).Scan(&kept); err != nil {
			t.Fatal(err)
		}
		if kept < reported {
			t.Fatalf("the standby reported commit LSN %d as applied, but DR kept only %d through its crash", reported, kept)
		}
	}

	w.finish(t)
	waitCaughtUp(t, primary, dr, 2, 120*time.Second)
	assertEqual(t, primary, dr, crmTables)
	assertAppliedOnce(t, primary, dr, "contacts")
	assertAppliedOnce(t, primary, dr, "deals")
}

// reportedAppliedLSN reads the source commit LSN a standby reports as
// applied on DR, from its metrics at addr.
func reportedAppliedLSN(t *testing.T, addr string) uint64 {
	t.Helper()
	body, err := metricsPage("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(body, "\n") {
		if name, value, ok := strings.Cut(line, " "); ok && strings.HasPrefix(name, "haven_standby_applied_lsn") {
			f, err := strconv.ParseFloat(value, 64)
			if err != nil {
				t.Fatalf("metric %q: %v", line, err)
			}
			return uint64(f)
		}
	}
	t.Fatalf("no haven_standby_applied_lsn in the standby's metrics:\n%s", body)
	return 0
}

// TestSurvivesSIGKILLWhileDRBuildsTheIndexes kills the standby while DR
// builds a new DR copy's indexes and constraints after loading its rows:
// the script goes on running on DR until it commits. The next standby
// waits for it instead of running it again over it, and goes on.
func TestSurvivesSIGKILLWhileDRBuildsTheIndexes(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `CREATE TABLE wide (id bigint PRIMARY KEY, a text, b text, c int); CREATE TABLE marker (id bigint PRIMARY KEY);
		INSERT INTO wide SELECT g, md5(g::text), md5((g * 7)::text), g % 1000 FROM generate_series(1, 300000) g;
		CREATE INDEX wide_a ON wide (a); CREATE INDEX wide_b ON wide (b); CREATE INDEX wide_ab ON wide (a, b); CREATE INDEX wide_ca ON wide (c, a)`)
	startHaven(t, "agent", s.agentArgs()...)
	standby := startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitFor(t, 120*time.Second, "DR to build the indexes", func() (bool, error) {
		var building bool
		err := dr.QueryRow(t.Context(), `SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND state = 'active'
			AND query LIKE '%CREATE INDEX wide_%')`).Scan(&building)
		return building, err
	})
	standby.kill()
	standby = startHaven(t, "standby", s.standbyArgs()...)
	waitCaughtUp(t, primary, dr, 1, 120*time.Second)
	assertSameSchema(t, primary, dr)
	assertEqual(t, primary, dr, map[string]string{"wide": "id"})
	if out := standby.output(); strings.Contains(out, `"reason":"create schema"`) {
		t.Errorf("the next standby ran the schema script again over the one still running:\n%s", out)
	}
}
