package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// waitHeartbeatPast waits until DR has applied a heartbeat emitted after
// everything the primary has written so far: the sequences it carried were
// sampled after every nextval before this call.
func waitHeartbeatPast(t *testing.T, primary, dr *pgx.Conn) {
	t.Helper()
	var lsn string
	if err := primary.QueryRow(t.Context(), `SELECT pg_current_wal_lsn()::text`).Scan(&lsn); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, "a heartbeat after "+lsn+" on DR", func() (bool, error) {
		var past bool
		err := dr.QueryRow(t.Context(), `SELECT coalesce(source_wal_lsn >= $1::pg_lsn, false) FROM haven.apply_position`, lsn).Scan(&past)
		return past, err
	})
}

// TestSequencesMoveAheadOnDR: after the stream is drained, nextval on DR
// returns more than any value the primary handed out, for serial and
// identity columns, a cached sequence used by several sessions, and a
// descending sequence (which must go lower instead).
func TestSequencesMoveAheadOnDR(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `
CREATE TABLE orders (id bigserial PRIMARY KEY, note text);
CREATE TABLE invoices (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, total numeric);
CREATE SEQUENCE ticket_no CACHE 50;
CREATE SEQUENCE countdown INCREMENT BY -3 START WITH 1000 MAXVALUE 1000;
CREATE TABLE marker (id bigint PRIMARY KEY);
INSERT INTO orders (note) SELECT 'before' FROM generate_series(1, 100);`)
	startHaven(t, "agent", s.agentArgs()...)
	startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	mustExec(t, primary, `INSERT INTO orders (note) SELECT 'after' FROM generate_series(1, 500)`)
	mustExec(t, primary, `INSERT INTO invoices (total) SELECT g FROM generate_series(1, 300) g`)
	// Several sessions each take values from a cached sequence: each has
	// cached ahead of what it handed out.
	var maxTicket int64
	for range 3 {
		conn := connect(t, s.primaryURL())
		for range 7 {
			var v int64
			if err := conn.QueryRow(t.Context(), `SELECT nextval('ticket_no')`).Scan(&v); err != nil {
				t.Fatal(err)
			}
			maxTicket = max(maxTicket, v)
		}
	}
	var minCountdown int64
	if err := primary.QueryRow(t.Context(), `SELECT min(nextval('countdown')) FROM generate_series(1, 40)`).Scan(&minCountdown); err != nil {
		t.Fatal(err)
	}
	// A transaction that rolls back still used its sequence values.
	mustExec(t, primary, `BEGIN; INSERT INTO orders (note) SELECT 'rolled back' FROM generate_series(1, 50); ROLLBACK`)
	var maxOrder, maxInvoice int64
	if err := primary.QueryRow(t.Context(), `SELECT (SELECT last_value FROM orders_id_seq), (SELECT max(id) FROM invoices)`).Scan(&maxOrder, &maxInvoice); err != nil {
		t.Fatal(err)
	}

	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	waitHeartbeatPast(t, primary, dr)
	for _, c := range []struct {
		sequence string
		beyond   int64
		down     bool
	}{
		{"orders_id_seq", maxOrder, false},
		{"invoices_id_seq", maxInvoice, false},
		{"ticket_no", maxTicket, false},
		{"countdown", minCountdown, true},
	} {
		var next int64
		if err := dr.QueryRow(t.Context(), fmt.Sprintf(`SELECT nextval('%s')`, c.sequence)).Scan(&next); err != nil {
			t.Fatal(err)
		}
		if (!c.down && next <= c.beyond) || (c.down && next >= c.beyond) {
			t.Errorf("nextval('%s') on DR = %d, but the primary already handed out %d", c.sequence, next, c.beyond)
		} else {
			t.Logf("nextval('%s') on DR = %d, beyond the primary's %d", c.sequence, next, c.beyond)
		}
	}
	// Inserting on DR with the defaults does not collide with replicated rows.
	mustExec(t, connect(t, s.drWriteURL()), `INSERT INTO orders (note) VALUES ('written on DR after a failover')`)
}
