package e2e

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/haven-dr/haven/proto/wire"
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

// TestAStreamThatLostAcknowledgedMessagesStopsDR: JetStream's files go back
// to an earlier state (as a server without sync to disk may after a crash)
// and lose transactions it had acknowledged, and the agent's slot is past
// them, before DR read them. The agent, still running, says so, and the
// standby stops at the next transaction instead of applying it without
// those before it, at the sequence numbers they had.
func TestAStreamThatLostAcknowledgedMessagesStopsDR(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `CREATE TABLE notes (id int PRIMARY KEY, body text); CREATE TABLE marker (id bigint PRIMARY KEY)`)
	agent := startHaven(t, "agent", s.agentArgs("--publish-timeout", "3s")...)
	standby := startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	standby.stop()

	s.nats.Shutdown()
	saved := t.TempDir()
	if err := os.CopyFS(saved, os.DirFS(s.nats.StoreDir())); err != nil {
		t.Fatal(err)
	}
	if err := s.nats.Restart(); err != nil {
		t.Fatal(err)
	}
	mustExec(t, primary, `INSERT INTO notes VALUES (1, 'lost')`)
	mustExec(t, primary, `INSERT INTO notes VALUES (2, 'lost')`)
	var written string
	if err := primary.QueryRow(t.Context(), `SELECT pg_current_wal_lsn()::text`).Scan(&written); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the agent to confirm the two transactions", func() (bool, error) {
		var done bool
		err := primary.QueryRow(t.Context(), `SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = $2`,
			written, wire.SlotName(s.group)).Scan(&done)
		return done, err
	})
	s.nats.Shutdown()
	if err := os.RemoveAll(s.nats.StoreDir()); err != nil {
		t.Fatal(err)
	}
	if err := os.CopyFS(s.nats.StoreDir(), os.DirFS(saved)); err != nil {
		t.Fatal(err)
	}
	if err := s.nats.Restart(); err != nil {
		t.Fatal(err)
	}
	mustExec(t, primary, `INSERT INTO notes VALUES (3, 'after the loss')`)
	waitFor(t, 60*time.Second, "the agent to report the loss", func() (bool, error) {
		return strings.Contains(agent.output(), "the stream lost messages JetStream had acknowledged"), nil
	})

	standby = startHaven(t, "standby", s.standbyArgs()...)
	waitFor(t, 60*time.Second, "apply to stop", func() (bool, error) {
		return strings.Contains(standby.output(), `"reason":"stream lost messages"`), nil
	})
	var notes int
	if err := dr.QueryRow(t.Context(), `SELECT count(*) FROM notes`).Scan(&notes); err != nil || notes != 0 {
		t.Errorf("DR has %d notes (%v), want none: what follows the loss was applied", notes, err)
	}
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
