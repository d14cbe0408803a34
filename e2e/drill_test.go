package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
)

// drillSite is a group with three controllers (publishing drill reports on
// NATS), the agent at site a and the standby at site b, caught up. The
// primary also has a ledger table the CRM workload never touches, for rows
// to change behind haven's back.
func drillSite(t *testing.T, standbyArgs ...string) (*site, *quorum, *pgx.Conn, *proc) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 30)
	mustExec(t, primary, `CREATE TABLE ledger (id int PRIMARY KEY, note text, amount numeric(12,2), at timestamptz);
		INSERT INTO ledger SELECT g, 'entry ' || g, g * 1.5, '2026-01-01'::timestamptz + g * interval '1 hour' FROM generate_series(1, 2000) g`)
	q := startQuorum(t, 3, "--nats-url", s.nats.URL())
	controllers := strings.Join(q.apis, ",")
	startHaven(t, "agent", s.agentArgs("--controllers", controllers, "--site", "a")...)
	standby := startHaven(t, "standby", s.standbyArgs(append([]string{"--controllers", controllers, "--site", "b"}, standbyArgs...)...)...)
	waitCaughtUp(t, primary, connect(t, s.drURL()), 1, 60*time.Second)
	waitFor(t, 30*time.Second, "the quorum to know both sites, and that DR is complete", func() (bool, error) {
		st, err := q.status(t)
		return err == nil && len(st.Groups) == 1 && st.Groups[0].DRSite == "b" && st.Groups[0].DRIncomplete == "", nil
	})
	return s, q, primary, standby
}

// drillReport is what haven ctl drill … --json prints of a report.
type drillReport struct {
	ID          string  `json:"id"`
	Kind        string  `json:"kind"`
	Trigger     string  `json:"trigger"`
	Outcome     string  `json:"outcome"`
	Reason      string  `json:"reason"`
	LSN         string  `json:"lsn"`
	HeldSeconds float64 `json:"applyHeldSeconds"`
	Steps       []struct {
		Name    string  `json:"name"`
		Seconds float64 `json:"seconds"`
	} `json:"steps"`
	RPO struct {
		SecondsBehind float64 `json:"secondsBehind"`
	} `json:"rpo"`
	ObjectivesMet bool    `json:"objectivesMet"`
	RTOSeconds    float64 `json:"rtoSeconds"`
	RTOPredicted  bool    `json:"rtoPredicted"`
	Tables        []struct {
		Table       string   `json:"table"`
		Match       bool     `json:"match"`
		PrimaryRows string   `json:"primaryRows"`
		DRRows      string   `json:"drRows"`
		MissingOnDR []string `json:"missingOnDr"`
		ExtraOnDR   []string `json:"extraOnDr"`
		Differing   []string `json:"differing"`
	} `json:"tables"`
}

// runDrill runs haven ctl drill run --json and returns the report it
// printed (and the command's error: a drill that did not pass fails it).
func runDrill(t *testing.T, q *quorum, args ...string) (drillReport, error) {
	t.Helper()
	cmd := exec.Command(havenBin, append([]string{"ctl", "--api", strings.Join(q.apis, ","), "drill", "run", "--json"}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var r drillReport
	if jerr := json.Unmarshal(out, &r); jerr != nil {
		t.Fatalf("haven ctl drill run %v: %v (%v): %s %s", args, err, jerr, out, stderr.String())
	}
	return r, err
}

// TestVerifyDrill: under a concurrent CRM workload, a verify drill finds
// the sites equal at one LSN, holds DR apply briefly, and publishes its
// report on NATS. Then rows changed on DR behind haven's back (one
// updated, one deleted, one added) make the next drill fail and name
// exactly those keys, and only in that table.
func TestVerifyDrill(t *testing.T) {
	s, q, primary, standby := drillSite(t)
	nc, err := nats.Connect(s.nats.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	published, err := nc.SubscribeSync("haven.drills.crm")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := q.ctl(t, "drill", "objectives", "--group", "crm", "--rpo", "30s", "--rto", "60s"); err != nil {
		t.Fatalf("drill objectives: %v: %s", err, out)
	}
	load := startWorkload(t, s.primaryURL(), 2, 30)
	defer load.finish(t)
	waitFor(t, 30*time.Second, "the workload to write", func() (bool, error) { return load.commits.Load() > 100, nil })

	r, err := runDrill(t, q, "--group", "crm")
	if err != nil || r.Outcome != "passed" {
		t.Fatalf("verify drill on equal sites: %v: %+v", err, r)
	}
	if len(r.Tables) < 5 || r.LSN == "" || len(r.Steps) != 6 || !r.ObjectivesMet {
		t.Errorf("report lacks evidence: %+v", r)
	}
	for _, tc := range r.Tables {
		if !tc.Match || tc.PrimaryRows != tc.DRRows {
			t.Errorf("table %s: %+v", tc.Table, tc)
		}
	}
	if r.HeldSeconds <= 0 || r.HeldSeconds > 10 {
		t.Errorf("DR apply held %.3fs; want a short, reported hold", r.HeldSeconds)
	}
	t.Logf("verify drill %s passed at %s under load: DR apply held %.3fs, %d tables, steps %+v", r.ID, r.LSN, r.HeldSeconds, len(r.Tables), r.Steps)
	msg, err := published.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("no report on haven.drills.crm: %v", err)
	}
	var onNATS struct {
		ID      string `json:"id"`
		Outcome string `json:"outcome"`
	}
	if err := json.Unmarshal(msg.Data, &onNATS); err != nil || onNATS.ID != r.ID || onNATS.Outcome != "passed" {
		t.Errorf("report on NATS: %v %s", err, msg.Data)
	}

	drw := connect(t, s.drWriteURL())
	mustExec(t, drw, `UPDATE ledger SET amount = amount + 0.01 WHERE id = 417`)
	mustExec(t, drw, `DELETE FROM ledger WHERE id = 23`)
	mustExec(t, drw, `INSERT INTO ledger VALUES (5000, 'not on the primary', 1, now())`)
	r, err = runDrill(t, q, "--group", "crm")
	if err == nil || r.Outcome != "failed" {
		t.Fatalf("verify drill after DR was changed: %v: %+v", err, r)
	}
	for _, tc := range r.Tables {
		if tc.Table != "public.ledger" {
			if !tc.Match {
				t.Errorf("table %s reported different: %+v", tc.Table, tc)
			}
			continue
		}
		if tc.Match || !slices.Equal(tc.Differing, []string{"id=417"}) || !slices.Equal(tc.MissingOnDR, []string{"id=23"}) || !slices.Equal(tc.ExtraOnDR, []string{"id=5000"}) {
			t.Errorf("ledger: %+v; want id=417 different, id=23 missing on DR, id=5000 only on DR", tc)
		}
	}
	out, err := q.ctl(t, "drill", "show", r.ID)
	if err != nil || !strings.Contains(out, "different: id=417") {
		t.Errorf("haven ctl drill show %s: %v: %s", r.ID, err, out)
	}
	t.Logf("%s", out)
	waitFor(t, 10*time.Second, "drill metrics", func() (bool, error) {
		body, err := metricsPage(q.metrics[0])
		if err != nil {
			return false, err
		}
		for _, want := range []string{`haven_drill_last_result{group="crm",kind="verify"} 0`, `haven_drill_alert{group="crm"} 1`,
			`haven_drill_last_success_timestamp_seconds{group="crm",kind="verify"}`} {
			if !strings.Contains(body, want) {
				return false, err
			}
		}
		return true, err
	})
	st, err := q.ctl(t, "status")
	if err != nil || !strings.Contains(st, "DRILL ALERT: drill "+r.ID) {
		t.Errorf("haven ctl status does not alert on the failed drill: %v: %s", err, st)
	}

	// A transaction writing on the primary for long would make the
	// snapshot wait, and DR with it: the drill does not hold DR, and says
	// which transaction.
	long := connect(t, s.primaryURL())
	mustExec(t, long, `BEGIN; INSERT INTO ledger VALUES (6000, 'long', 0, now())`)
	waitFor(t, 30*time.Second, "the transaction to be old", func() (bool, error) {
		var old bool
		err := primary.QueryRow(t.Context(), `SELECT bool_or(xact_start < now() - interval '6 s') FROM pg_stat_activity WHERE backend_xid IS NOT NULL`).Scan(&old)
		return old, err
	})
	r, err = runDrill(t, q, "--group", "crm")
	if err == nil || r.Outcome != "failed" || !strings.Contains(r.Reason, "transactions have been writing on the primary") {
		t.Errorf("verify drill beside a long transaction: %v: %+v", err, r)
	}
	if strings.Contains(standby.output(), `"drill":"`+r.ID+`"`) {
		t.Errorf("the standby held apply for drill %s", r.ID)
	}
	mustExec(t, long, `ROLLBACK`)
}

// TestScheduledDrillFiresOncePerSlot: a verify drill scheduled every five
// seconds fires at each slot exactly once, also across a leader change:
// the leader is killed, and the next leader goes on from the last slot
// the state records.
func TestScheduledDrillFiresOncePerSlot(t *testing.T) {
	_, q, _, _ := drillSite(t)
	out, err := q.ctl(t, "drill", "schedule", "--group", "crm", "--kind", "verify", "--cron", "*/5 * * * * *")
	if err != nil {
		t.Fatalf("drill schedule: %v: %s", err, out)
	}
	waitFor(t, 30*time.Second, "two scheduled drills", func() (bool, error) { return len(slotsOf(t, q)) >= 2, nil })
	leader := leaderIndex(t, q)
	killedAt := time.Now()
	q.procs[leader].kill()
	rest := q.without(leader)
	waitFor(t, 60*time.Second, "scheduled drills after the leader change", func() (bool, error) {
		s := slotsOf(t, rest)
		return len(s) > 0 && s[len(s)-1].After(killedAt.Add(10*time.Second)), nil
	})
	got := slotsOf(t, rest)
	for i := 1; i < len(got); i++ {
		if d := got[i].Sub(got[i-1]); d != 5*time.Second {
			t.Errorf("slots %s and %s follow each other: a slot fired twice or was missed (%v)", got[i-1], got[i], got)
		}
	}
	t.Logf("%d slots fired once each across the leader change: %v", len(got), got)
}

// slotsOf lists the slots the quorum's drill reports were fired for.
func slotsOf(t *testing.T, q *quorum) []time.Time {
	out, err := q.ctl(t, "drill", "list", "--json")
	if err != nil {
		return nil
	}
	var l struct {
		Reports []drillReport `json:"reports"`
	}
	if json.Unmarshal([]byte(out), &l) != nil {
		return nil
	}
	var at []time.Time
	for _, r := range l.Reports {
		_, slot, ok := strings.Cut(r.Trigger, "slot ")
		if !ok {
			continue
		}
		ts, err := time.Parse(time.RFC3339, slot)
		if err != nil {
			t.Fatalf("trigger %q: %v", r.Trigger, err)
		}
		at = append(at, ts)
	}
	slices.SortFunc(at, func(a, b time.Time) int { return a.Compare(b) })
	return at
}

// TestPromoteDrill: a promote drill clones the DR cluster, runs the
// promotion's steps on the clone, times them, predicts the RTO and leaves
// no clone behind; also when the leader is killed while the clone runs
// (the next leader ends the drill, the standby drops the clone), and when
// the standby is (it drops the leftover clone when it starts again, and
// finishes the drill). DR keeps applying throughout.
func TestPromoteDrill(t *testing.T) {
	drillDir, err := os.MkdirTemp("", "hvd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(drillDir) })
	if err := os.Chmod(drillDir, 0o711); err != nil { // the clone runs as postgres when the test runs as root
		t.Fatal(err)
	}
	clone := filepath.Join(drillDir, "haven-clone-crm")
	s, q, primary, standby := drillSite(t, "--drill-dir", drillDir)
	dr := connect(t, s.drURL())

	r, err := runDrill(t, q, "--group", "crm", "--kind", "promote")
	if err != nil || r.Outcome != "passed" {
		t.Fatalf("promote drill: %v: %+v", err, r)
	}
	var names []string
	for _, st := range r.Steps {
		names = append(names, st.Name)
	}
	for _, want := range []string{"clone the DR cluster", "start the clone", "promotion: sequences", "promotion: writable",
		"promotion: a write to every table, rolled back", "predicted: detection"} {
		if !slices.Contains(names, want) {
			t.Errorf("no step %q in %v", want, names)
		}
	}
	if r.RTOSeconds < 3 || !r.RTOPredicted {
		t.Errorf("predicted RTO %.2fs (predicted %v): it includes at least the 3s detection", r.RTOSeconds, r.RTOPredicted)
	}
	assertNoClone(t, clone)
	t.Logf("promote drill %s: predicted RTO %.2fs, steps %+v", r.ID, r.RTOSeconds, r.Steps)

	// A standby whose clone takes long (a capped rate) runs the drill now.
	controllers := strings.Join(q.apis, ",")
	slow := s.standbyArgs("--controllers", controllers, "--site", "b", "--drill-dir", drillDir, "--drill-clone-rate", "1M")
	standby.stop()
	standby = startHaven(t, "standby-slow-clone", slow...)

	// The leader dies while the clone is made.
	id := startDrillNoWait(t, q, "promote")
	waitFor(t, 60*time.Second, "the clone to begin", func() (bool, error) { return exists(filepath.Join(clone, "data")), nil })
	leader := leaderIndex(t, q)
	q.procs[leader].kill()
	rest := q.without(leader)
	waitFor(t, 60*time.Second, "the drill to end as interrupted", func() (bool, error) { return outcome(t, rest, id) == "interrupted", nil })
	waitFor(t, 30*time.Second, "the clone to be dropped", func() (bool, error) { return !exists(clone), nil })
	// The killed controller comes back: it follows, and runs nothing of
	// the drill it had started.
	q.restart(t, leader)
	restarted := &quorum{apis: []string{q.apis[leader]}}
	waitFor(t, 30*time.Second, "the restarted controller to know the drill ended", func() (bool, error) {
		return outcome(t, restarted, id) == "interrupted", nil
	})
	if exists(clone) {
		t.Fatal("a clone is there again after the controller's restart")
	}

	// The standby dies while the clone is made, and starts again (at full
	// speed): it drops what was left, and the drill passes.
	id = startDrillNoWait(t, rest, "promote")
	waitFor(t, 60*time.Second, "the clone to begin", func() (bool, error) { return exists(filepath.Join(clone, "data")), nil })
	standby.kill()
	standby = startHaven(t, "standby-again", s.standbyArgs("--controllers", controllers, "--site", "b", "--drill-dir", drillDir)...)
	waitFor(t, 120*time.Second, "the drill to pass after the standby's restart", func() (bool, error) { return outcome(t, rest, id) == "passed", nil })
	if !strings.Contains(standby.output(), "dropped what a promote drill left in --drill-dir") {
		t.Error("the restarted standby did not say it dropped what the drill left")
	}
	assertNoClone(t, clone)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
}

func startDrillNoWait(t *testing.T, q *quorum, kind string) string {
	t.Helper()
	out, err := q.ctl(t, "drill", "run", "--group", "crm", "--kind", kind, "--no-wait", "--json")
	if err != nil {
		t.Fatalf("drill run --no-wait: %v: %s", err, out)
	}
	var started struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal([]byte(out), &started); err != nil || started.ID == "" {
		t.Fatalf("drill run --no-wait --json: %v: %s", err, out)
	}
	return started.ID
}

// outcome is a drill's outcome as haven ctl drill show --json prints it.
func outcome(t *testing.T, q *quorum, id string) string {
	out, err := q.ctl(t, "drill", "show", id, "--json")
	if err != nil {
		return ""
	}
	var r drillReport
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("drill show --json: %v: %s", err, out)
	}
	return r.Outcome
}

func assertNoClone(t *testing.T, dir string) {
	t.Helper()
	if exists(dir) {
		entries, _ := os.ReadDir(dir)
		t.Errorf("the drill left %s behind: %v", dir, entries)
	}
	out, _ := exec.Command("pgrep", "-f", "postgres -D "+filepath.Join(dir, "data")).Output()
	if len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("a clone server still runs: pids %s", out)
	}
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// TestSwitchoverDrill: a switchover drill is refused without --disruptive;
// with it, under a client writing through a multi-host connection string,
// the group switches to site b and back, the drill's probe loses no write
// and reports the write pause, and so does the client.
func TestSwitchoverDrill(t *testing.T) {
	s, q, _, _, _, _ := twoSites(t, t.TempDir())
	if out, err := q.ctl(t, "drill", "run", "--group", "crm", "--kind", "switchover"); err == nil || !strings.Contains(out, "--disruptive") {
		t.Fatalf("a switchover drill without --disruptive: %v: %s", err, out)
	}
	multiHost := fmt.Sprintf("postgres://postgres@127.0.0.1:%d,127.0.0.1:%d/%s?target_session_attrs=read-write&connect_timeout=1",
		s.primary.Port(), s.dr.Port(), s.db)
	var acked ackedWrites
	writer := startLoad(t, multiHost, 2, func(ctx context.Context, conn *pgx.Conn, _ *rand.Rand) error {
		id := acked.next.Add(1)
		if _, err := conn.Exec(ctx, `INSERT INTO acked (id) VALUES ($1)`, id); err != nil {
			conn.Close(context.Background())
			for ctx.Err() == nil {
				if c, err := pgx.Connect(ctx, multiHost); err == nil {
					*conn = *c
					return nil
				}
			}
			return nil
		}
		acked.mu.Lock()
		acked.ids = append(acked.ids, id)
		acked.mu.Unlock()
		return nil
	})
	r, err := runDrill(t, q, "--group", "crm", "--kind", "switchover", "--disruptive")
	writer.finish(t)
	if err != nil || r.Outcome != "passed" {
		t.Fatalf("switchover drill: %v: %+v", err, r)
	}
	if r.RTOSeconds <= 0 || r.RTOSeconds > 5 || r.RTOPredicted {
		t.Errorf("measured write pause %.3fs (predicted %v)", r.RTOSeconds, r.RTOPredicted)
	}
	st, err := q.status(t)
	if err != nil || st.Groups[0].PrimarySite != "a" || len(st.Groups[0].DeposedSites) != 0 {
		t.Fatalf("after the drill: %+v %v; want site a primary and b following", st, err)
	}
	final, standby := connect(t, s.primaryURL()), connect(t, s.drURL())
	waitCaughtUp(t, final, standby, 2, 60*time.Second)
	acked.onceEach(t, final)
	t.Logf("switchover drill %s: write pause %.3fs; steps %+v", r.ID, r.RTOSeconds, r.Steps)
}
