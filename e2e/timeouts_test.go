package e2e

import (
	"testing"
	"time"
)

// TestTimeoutsForEveryoneSpareHavensSessions: a primary and a DR database
// that cut every statement after 20 ms, every lock wait after 20 ms and
// every idle transaction after 200 ms (as production databases often do
// for their applications) do not cut haven's own sessions: the snapshot's
// COPY of a table takes longer than that, and so do large transactions.
func TestTimeoutsForEveryoneSpareHavensSessions(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `CREATE TABLE notes (id bigint PRIMARY KEY, body text);
		CREATE TABLE marker (id bigint PRIMARY KEY);
		INSERT INTO notes SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 300000) g`)
	const timeouts = `ALTER DATABASE crm SET statement_timeout = '20ms'; ALTER DATABASE crm SET lock_timeout = '20ms';
		ALTER DATABASE crm SET idle_in_transaction_session_timeout = '200ms'`
	mustExec(t, primary, timeouts)
	mustExec(t, connect(t, s.drWriteURL()), timeouts)
	// The test's own sessions are spared too.
	const spared = "&statement_timeout=0&lock_timeout=0&idle_in_transaction_session_timeout=0"
	primary = connect(t, s.primaryURL()+spared)
	dr := connect(t, s.drURL()+spared)

	startHaven(t, "agent", s.agentArgs()...)
	startHaven(t, "standby", s.standbyArgs()...)
	waitCaughtUp(t, primary, dr, 1, 120*time.Second)
	mustExec(t, primary, `UPDATE notes SET body = body || ' (edited)' WHERE id % 2 = 0`)
	mustExec(t, primary, `INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(300001, 400000) g`)
	waitCaughtUp(t, primary, dr, 2, 120*time.Second)
	assertEqual(t, primary, dr, map[string]string{"notes": "id"})
}
