package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/haven-dr/haven/proto/wire"
)

// TestReseedAfterTheStreamAgedOut: with --stream-max-age, the snapshot
// ages out of the stream. A restarted agent must not take a new snapshot
// for that (it would empty the DR copy for the whole copy), a new DR copy
// that cannot start is told how to re-seed, and after the operator drops
// the slot the new snapshot reaches both the existing DR copy and the new
// one by itself.
func TestReseedAfterTheStreamAgedOut(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 20)
	agentArgs := s.agentArgs("--stream-max-age", "3s")
	agent := startHaven(t, "agent", agentArgs...)
	startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	js := s.nats.JetStream(t)
	stream, err := js.Stream(t.Context(), wire.StreamName(s.group))
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the snapshot to age out of the stream", func() (bool, error) {
		info, err := stream.Info(t.Context())
		return err == nil && info.State.FirstSeq > 10, err
	})
	agent.stop()
	agent = startHaven(t, "agent-restarted", agentArgs...)
	waitFor(t, 30*time.Second, "the restarted agent to stream", func() (bool, error) {
		return strings.Contains(agent.output(), "resuming from the slot"), nil
	})
	if strings.Contains(agent.output(), "taking a new snapshot") {
		t.Fatal("the restarted agent took a new snapshot because the old one aged out of the stream")
	}
	mustExec(t, primary, `UPDATE contacts SET n = n + 1`)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)

	// A new DR copy cannot start from this stream: it says how to re-seed.
	if err := s.dr.CreateDatabase(t.Context(), "crm2"); err != nil {
		t.Fatal(err)
	}
	second := startHaven(t, "standby-2", "standby", "--target-url", s.dr.URL("crm2"), "--nats-url", s.nats.URL(),
		"--group", s.group, "--blocked-retry", "1s")
	waitFor(t, 30*time.Second, "the new DR copy to ask for a re-seed", func() (bool, error) {
		return strings.Contains(second.output(), "pg_drop_replication_slot('haven_crm')"), nil
	})

	agent.stop()
	// The walsender lets go of the slot a moment after the agent is gone.
	waitFor(t, 30*time.Second, "the slot to be released", func() (bool, error) {
		var active bool
		err := primary.QueryRow(t.Context(), `SELECT active FROM pg_replication_slots WHERE slot_name = 'haven_crm'`).Scan(&active)
		return !active, err
	})
	mustExec(t, primary, `SELECT pg_drop_replication_slot('haven_crm')`)
	mustExec(t, primary, `UPDATE deals SET n = n + 1`)
	startHaven(t, "agent-reseeded", agentArgs...)
	waitCaughtUp(t, primary, dr, 3, 60*time.Second)
	dr2 := connect(t, s.dr.URL("crm2"))
	waitFor(t, 60*time.Second, "the new DR copy to load the new snapshot", func() (bool, error) {
		seen, err := markerSeen(t.Context(), dr2, 3)
		if !seen || err != nil {
			return false, err
		}
		var loaded bool
		err = dr2.QueryRow(t.Context(), `SELECT snapshot_done FROM haven.apply_position`).Scan(&loaded)
		return loaded, err
	})
	assertEqual(t, primary, dr, crmTables)
	assertEqual(t, primary, dr2, crmTables)
}
