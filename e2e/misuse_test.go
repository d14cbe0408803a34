package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/haven-dr/haven/internal/natstest"
	"github.com/haven-dr/haven/proto/wire"
)

// TestStandbyPointedAtThePrimaryRefuses: a standby whose --target-url is
// the source database stops before writing anything there (it would make
// the primary read-only and feed it its own changes).
func TestStandbyPointedAtThePrimaryRefuses(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `CREATE TABLE acct (id int PRIMARY KEY, v int); CREATE TABLE marker (id bigint PRIMARY KEY)`)
	startHaven(t, "agent", s.agentArgs()...)
	startHaven(t, "standby", s.standbyArgs()...)
	waitCaughtUp(t, primary, connect(t, s.drURL()), 1, 60*time.Second)

	wrong := startHaven(t, "standby-on-primary", "standby", "--target-url", s.primaryURL(), "--nats-url", s.nats.URL(), "--group", s.group)
	waitFor(t, 30*time.Second, "the misdirected standby to stop", func() (bool, error) { return wrong.exited(), nil })
	if !strings.Contains(wrong.output(), "points at database") {
		t.Errorf("the standby did not say its target is the source:\n%s", tail(wrong.output(), 5))
	}
	fresh := connect(t, s.primaryURL())
	if _, err := fresh.Exec(t.Context(), `INSERT INTO acct VALUES (1, 1)`); err != nil {
		t.Errorf("the primary no longer takes writes after a standby was pointed at it: %v", err)
	}
	var tables int
	if err := fresh.QueryRow(t.Context(), `SELECT count(*) FROM pg_tables WHERE schemaname = 'haven' AND tablename = 'apply_position'`).Scan(&tables); err != nil || tables != 0 {
		t.Errorf("the misdirected standby wrote its bookkeeping on the primary (%d, %v)", tables, err)
	}
}

// TestStandbyPointedAtThePrimaryBeforeItsAgentRefuses: a standby started on
// the source database while the group's stream exists but its agent has
// recorded nothing yet (it created the stream, then failed) leaves the
// primary writable, and is refused once the agent's snapshot reaches it,
// before the snapshot touches the primary's tables.
func TestStandbyPointedAtThePrimaryBeforeItsAgentRefuses(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `CREATE TABLE acct (id int PRIMARY KEY, v int); INSERT INTO acct SELECT generate_series(1, 100), 0`)
	if _, err := natstest.JetStreamAt(t, s.nats.URL()).CreateStream(t.Context(), jetstream.StreamConfig{Name: wire.StreamName(s.group),
		Subjects: []string{wire.SubjectPrefix(s.group) + ">"}, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	wrong := startHaven(t, "standby-on-primary", "standby", "--target-url", s.primaryURL(), "--nats-url", s.nats.URL(), "--group", s.group)
	waitFor(t, 30*time.Second, "the standby to read the stream", func() (bool, error) {
		return strings.Contains(wrong.output(), "applying from the stored position"), nil
	})
	if _, err := connect(t, s.primaryURL()).Exec(t.Context(), `INSERT INTO acct VALUES (0, 1)`); err != nil {
		t.Errorf("the primary no longer takes writes once a standby reads the stream on it: %v", err)
	}
	startHaven(t, "agent", s.agentArgs()...)
	waitFor(t, 60*time.Second, "the misdirected standby to stop", func() (bool, error) { return wrong.exited(), nil })
	if !strings.Contains(wrong.output(), "points at") {
		t.Errorf("the standby did not say its target is the source:\n%s", tail(wrong.output(), 5))
	}
	fresh := connect(t, s.primaryURL())
	if _, err := fresh.Exec(t.Context(), `INSERT INTO acct VALUES (101, 1)`); err != nil {
		t.Errorf("the primary no longer takes writes after a standby was pointed at it: %v", err)
	}
	var rows int
	if err := fresh.QueryRow(t.Context(), `SELECT count(*) FROM acct`).Scan(&rows); err != nil || rows != 102 {
		t.Errorf("the primary's table holds %d rows (%v), want 102", rows, err)
	}
}
