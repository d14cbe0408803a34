package e2e

import (
	"strings"
	"testing"
	"time"
)

// TestNoFailoverToAnIncompleteDR: a table joins the group with rows, and
// its agent dies while DR has copied only some of them. The standby
// reports DR's copy incomplete, naming the table, and a switchover is
// refused; with the primary then killed, the quorum does not fail over by
// itself but alerts, a manual failover is refused, and only --force
// promotes DR, which its audit and the standby's log record.
func TestNoFailoverToAnIncompleteDR(t *testing.T) {
	f := startFailoverSite(t, "--backfill-chunk-rows", "100")
	q, primary, dr := f.q, f.primary, f.dr
	const rows = 50000
	mustExec(t, primary, `CREATE TABLE big AS SELECT g AS id, 'row ' || g AS note FROM generate_series(1, $1) g`, rows)
	mustExec(t, primary, `ALTER TABLE big ADD PRIMARY KEY (id)`)
	waitFor(t, 60*time.Second, "the backfill of big to start on DR", func() (bool, error) {
		n, err := backfillsOnDR(t.Context(), dr)
		return n == 1, err
	})
	f.agent.kill()
	var copied int
	if err := dr.QueryRow(t.Context(), `SELECT count(*) FROM big`).Scan(&copied); err != nil {
		t.Fatal(err)
	}
	if n, err := backfillsOnDR(t.Context(), dr); err != nil || n != 1 || copied == rows {
		t.Fatalf("the agent was killed after the backfill ended (%d backfills open, %d of %d rows on DR, %v): this test needs a slower backfill",
			n, copied, rows, err)
	}
	t.Logf("agent killed with %d of %d rows of big on DR", copied, rows)
	waitFor(t, 30*time.Second, "the quorum to know DR is incomplete", func() (bool, error) {
		st, err := q.status(t)
		return err == nil && len(st.Groups) == 1 && strings.Contains(st.Groups[0].DRIncomplete, "public.big"), err
	})
	if out, err := q.ctl(t, "status"); err != nil || !strings.Contains(out, "DR INCOMPLETE") {
		t.Errorf("haven ctl status does not say DR is incomplete: %v, %s", err, out)
	}
	// Every node runs this build: the quorum moves to its rules version.
	waitFor(t, 30*time.Second, "the quorum to apply rules version 4", func() (bool, error) {
		st, err := q.status(t)
		return err == nil && st.RulesVersion == 4, err
	})
	if out, err := q.ctl(t, "switchover", "--group", "crm"); err == nil || !strings.Contains(out, "cannot vouch for its copy") || !strings.Contains(out, "public.big") {
		t.Errorf("a switchover to an incomplete DR was not refused: %v, %s", err, out)
	}

	if err := f.site.primary.Kill(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, "the quorum to alert instead of failing over", func() (bool, error) {
		st, err := q.status(t)
		return err == nil && len(st.Groups) == 1 && strings.Contains(st.Groups[0].Alert, "cannot vouch for its copy"), err
	})
	st, err := q.status(t)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Groups) != 1 {
		t.Fatalf("status lists %d groups, want 1", len(st.Groups))
	}
	if g := st.Groups[0]; g.PrimarySite != "a" || g.Epoch != "1" || !strings.Contains(g.Alert, "public.big") {
		t.Fatalf("with the primary down and DR incomplete: primary %s at epoch %s, alert %q; want a at 1 and an alert naming public.big", g.PrimarySite, g.Epoch, g.Alert)
	}
	if out, err := q.ctl(t, "failover", "--group", "crm"); err == nil || !strings.Contains(out, "cannot vouch for its copy") || !strings.Contains(out, "public.big") {
		t.Errorf("a failover to an incomplete DR was not refused: %v, %s", err, out)
	}
	q.holdsPrimary(t, "a", "1", time.Second)

	if out, err := q.ctl(t, "failover", "--group", "crm", "--force"); err != nil {
		t.Fatalf("forced failover: %v, %s", err, out)
	}
	waitFor(t, 60*time.Second, "DR to be promoted", func() (bool, error) {
		return strings.Contains(f.standby.output(), "PROMOTED"), nil
	})
	if out := f.standby.output(); !strings.Contains(out, "promoting an INCOMPLETE DR copy") {
		t.Errorf("the standby's log does not say it promoted an incomplete copy:\n%s", tail(out, 30))
	}
	out, err := q.ctl(t, "status")
	if err != nil || !strings.Contains(out, "forced failover of an incomplete DR copy") {
		t.Errorf("the audit does not record the forced failover of an incomplete copy: %v\n%s", err, out)
	}
}
