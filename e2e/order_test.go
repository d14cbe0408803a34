package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// assertStreamInCommitOrder reads the whole stream and checks that no
// transaction's chunk comes after a chunk of a later transaction.
func assertStreamInCommitOrder(t *testing.T, js jetstream.JetStream, group string) {
	t.Helper()
	st, err := js.Stream(t.Context(), wire.StreamName(group))
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var last uint64
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
		msg, err := st.GetMsg(t.Context(), seq)
		if err != nil {
			t.Fatalf("message %d: %v", seq, err)
		}
		c, err := wire.Decode(msg.Header.Get(wire.HeaderEncoding), msg.Header.Get(wire.HeaderFormat), msg.Data)
		if err != nil {
			t.Fatalf("message %d: %v", seq, err)
		}
		if c.Kind != havenpb.Kind_KIND_TRANSACTION {
			continue
		}
		if c.CommitLsn < last {
			t.Errorf("message %d holds the transaction at %X after one at %X: the stream is out of commit order", seq, c.CommitLsn, last)
		}
		last = max(last, c.CommitLsn)
	}
}

// TestAFullStreamKeepsOrderAndLosesNothing: the stream refuses new messages
// once full (--stream-max-bytes). A large transaction is refused part-way
// while smaller ones after it would still fit; none of them may overtake
// it. Once the operator makes room, everything arrives, in order.
func TestAFullStreamKeepsOrderAndLosesNothing(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `CREATE TABLE docs (id int PRIMARY KEY, body text); CREATE TABLE marker (id bigint PRIMARY KEY)`)
	agent := startHaven(t, "agent", s.agentArgs("--stream-max-bytes", "400000", "--chunk-bytes", "16384",
		"--max-in-flight", "256", "--publish-timeout", "3s")...)
	startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	mustExec(t, primary, `INSERT INTO docs SELECT g, repeat(md5(g::text), 40) FROM generate_series(1, 400) g`) // ~500 kB
	for i := 1000; i < 1020; i++ {
		mustExec(t, primary, `INSERT INTO docs VALUES ($1, 'small')`, i)
	}
	waitFor(t, 60*time.Second, "the agent to hit the full stream", func() (bool, error) {
		return strings.Count(agent.output(), "retrying") > 0, nil
	})
	js := s.nats.JetStream(t)
	st, err := js.Stream(t.Context(), wire.StreamName(s.group))
	if err != nil {
		t.Fatal(err)
	}
	cfg := st.CachedInfo().Config
	cfg.MaxBytes = -1
	if _, err := js.UpdateStream(t.Context(), cfg); err != nil {
		t.Fatal(err)
	}
	t.Log("stream limit lifted")
	waitCaughtUp(t, primary, dr, 2, 120*time.Second)
	assertEqual(t, primary, dr, map[string]string{"docs": "id", "marker": "id"})
	assertStreamInCommitOrder(t, js, s.group)
}
