package e2e

import (
	"strings"
	"testing"
	"time"
)

// TestRecoversFromServerRestarts restarts NATS, the primary and the DR
// database while changes flow; both processes reconnect by themselves and
// the DR copy ends equal to the primary.
func TestRecoversFromServerRestarts(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 100)
	startHaven(t, "agent", s.agentArgs("--publish-timeout", "3s")...)
	startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	write := func(n int) {
		conn := connect(t, s.primaryURL())
		mustExec(t, conn, `INSERT INTO activities (contact_id, kind, body) SELECT g, 'restart', 'row ' || g FROM generate_series(1, $1) g`, n)
		mustExec(t, conn, `UPDATE contacts SET n = n + 1 WHERE id % 7 = 0`)
	}

	write(1000)
	s.nats.Shutdown()
	write(1000) // captured while NATS is down: waits in the slot
	if err := s.nats.Restart(); err != nil {
		t.Fatal(err)
	}
	write(1000)

	if err := s.primary.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	write(1000)

	if err := s.dr.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	write(1000)

	if err := s.primary.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := s.primary.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	write(1000)

	primary = connect(t, s.primaryURL())
	dr = connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 2, 120*time.Second)
	assertEqual(t, primary, dr, crmTables)
}

// TestSurvivesSIGKILLDuringInitialSnapshot kills the agent while it copies
// the tables (it starts over with a new slot and the standby reloads) and
// the standby while it loads them (it resumes after the last loaded chunk).
func TestSurvivesSIGKILLDuringInitialSnapshot(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 2000)
	dr := connect(t, s.drURL())
	js := s.nats.JetStream(t)
	agentArgs := s.agentArgs("--chunk-bytes", "16384", "--snapshot-chunk-bytes", "16384", "--snapshot-workers", "1")

	agent := startHaven(t, "agent", agentArgs...)
	waitFor(t, 60*time.Second, "the agent to publish part of the snapshot", func() (bool, error) {
		return streamMessages(t, js, s.group) > 5, nil
	})
	agent.kill()
	t.Logf("agent killed after publishing %d snapshot messages", streamMessages(t, js, s.group))
	mustExec(t, primary, `UPDATE contacts SET n = n + 1 WHERE id % 3 = 0`)

	standby := startHaven(t, "standby", s.standbyArgs()...)
	waitFor(t, 60*time.Second, "the standby to load the partial snapshot", func() (bool, error) {
		var seq int64
		err := dr.QueryRow(t.Context(), `SELECT stream_seq FROM haven.apply_position`).Scan(&seq)
		return seq > 3, err
	})
	var firstSnapshot string
	if err := dr.QueryRow(t.Context(), `SELECT snapshot_lsn::text FROM haven.apply_position`).Scan(&firstSnapshot); err != nil {
		t.Fatal(err)
	}
	agent = startHaven(t, "agent-restarted", agentArgs...)
	waitFor(t, 60*time.Second, "the standby to load part of the new snapshot", func() (bool, error) {
		var loading bool
		err := dr.QueryRow(t.Context(), `SELECT NOT snapshot_done AND snapshot_lsn > $1::pg_lsn FROM haven.apply_position`, firstSnapshot).Scan(&loading)
		if !loading || err != nil {
			return false, err
		}
		var rows int64
		err = dr.QueryRow(t.Context(), `SELECT count(*) FROM accounts`).Scan(&rows)
		return rows > 0, err
	})
	standby.kill()
	t.Log("standby killed while loading the new snapshot")
	startHaven(t, "standby-restarted", s.standbyArgs()...)

	waitCaughtUp(t, primary, dr, 1, 120*time.Second)
	assertEqual(t, primary, dr, crmTables)
	// The indexes and constraints, built once the rows were in, exactly once.
	assertSameSchema(t, primary, dr)
	if !strings.Contains(agent.output(), "initial snapshot never completed") {
		t.Error("the restarted agent did not say it starts the unfinished snapshot over")
	}
}
