package failover

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

func apply(t *testing.T, f *fsm, index uint64, c command) any {
	t.Helper()
	data, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	return f.Apply(&raft.Log{Index: index, Data: data})
}

// snapshotRestored is a new FSM restored from a snapshot of f.
func snapshotRestored(t *testing.T, f *fsm) *fsm {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var out sink
	if err := snap.Persist(&out); err != nil {
		t.Fatal(err)
	}
	restored := newFSM()
	if err := restored.Restore(io.NopCloser(bytes.NewReader(out.Bytes()))); err != nil {
		t.Fatal(err)
	}
	return restored
}

type sink struct {
	bytes.Buffer
	cancelled bool
}

func (s *sink) ID() string    { return "test" }
func (s *sink) Cancel() error { s.cancelled = true; return nil }
func (s *sink) Close() error  { return nil }

// TestFSMFailoverLifecycle: an agent registers its group, a standby its DR
// site; a failover swaps them, bumps the epoch, fences the old primary's
// agent and orders the DR standby to promote until it reports it did.
func TestFSMFailoverLifecycle(t *testing.T) {
	f := newFSM()
	if err, _ := apply(t, f, 1, command{Kind: cmdCheckIn, AtMs: 1000, Group: "crm", Site: "b"}).(error); err == nil {
		t.Fatal("a standby created an unknown group")
	}
	r := apply(t, f, 2, command{Kind: cmdCheckIn, AtMs: 1000, Group: "crm", Site: "a", Agent: true, Epoch: 1, URL: "postgres://a", GrantLease: true, LeaseTTLMs: 2000}).(checkInResult)
	if !r.Lease || r.Fence || r.Epoch != 1 || r.PrimarySite != "a" {
		t.Fatalf("agent check-in: %+v", r)
	}
	apply(t, f, 3, command{Kind: cmdCheckIn, AtMs: 1100, Group: "crm", Site: "b", URL: "postgres://b", LagSeconds: 0.3})
	g := f.read().Groups["crm"]
	if g.DRSite != "b" || g.LeaseExpiresMs != 3000 || g.LagSeconds != 0.3 {
		t.Fatalf("group after check-ins: %+v", g)
	}
	if r := apply(t, f, 3, command{Kind: cmdCheckIn, AtMs: 1200, Group: "crm", Site: "b", Agent: true, GrantLease: true, LeaseTTLMs: 2000}).(checkInResult); r.Fence || r.Lease {
		t.Fatalf("the DR site's idle agent: %+v, want neither fenced nor leased", r)
	}
	if r := apply(t, f, 3, command{Kind: cmdCheckIn, AtMs: 1200, Group: "crm", Site: "b"}).(checkInResult); !r.Apply || r.Reseed {
		t.Fatalf("DR standby before failover: %+v, want to apply", r)
	}
	if err, _ := apply(t, f, 4, command{Kind: cmdFailover, AtMs: 5000, Group: "crm", Epoch: 7, Actor: "op"}).(error); err == nil {
		t.Fatal("a failover decided on a stale epoch was applied")
	}
	if err, _ := apply(t, f, 5, command{Kind: cmdFailover, AtMs: 5000, Group: "crm", Epoch: 1, Actor: "op", Reason: "test"}).(error); err != nil {
		t.Fatal(err)
	}
	g = f.read().Groups["crm"]
	if g.PrimarySite != "b" || g.DRSite != "a" || g.Epoch != 2 || g.State != StatePromoting {
		t.Fatalf("group after failover: %+v", g)
	}
	if err, _ := apply(t, f, 6, command{Kind: cmdFailover, AtMs: 5001, Group: "crm", Epoch: 2, Actor: "op"}).(error); err == nil {
		t.Fatal("a second failover while promoting was applied")
	}
	if r := apply(t, f, 7, command{Kind: cmdCheckIn, AtMs: 5100, Group: "crm", Site: "a", Agent: true, Epoch: 1, GrantLease: true, LeaseTTLMs: 2000}).(checkInResult); !r.Fence || r.Lease {
		t.Fatalf("old primary's agent: %+v, want fenced without lease", r)
	}
	if r := apply(t, f, 8, command{Kind: cmdCheckIn, AtMs: 5200, Group: "crm", Site: "b"}).(checkInResult); !r.Promote || r.Epoch != 2 {
		t.Fatalf("DR standby: %+v, want an order to promote at epoch 2", r)
	}
	if r := apply(t, f, 9, command{Kind: cmdCheckIn, AtMs: 5300, Group: "crm", Site: "b", Promoted: 2}).(checkInResult); r.Promote {
		t.Fatalf("DR standby still ordered to promote after it did: %+v", r)
	}
	if g := f.read().Groups["crm"]; g.State != StateActive {
		t.Fatalf("state after promotion: %s", g.State)
	}
	if err, _ := apply(t, f, 10, command{Kind: cmdFailover, AtMs: 5350, Group: "crm", Epoch: 2, Actor: "op"}).(error); err == nil {
		t.Fatal("a failover to the deposed, not rejoined, old primary was applied")
	}
	// The old primary rejoins: its standby waits until its agent reported.
	if r := apply(t, f, 10, command{Kind: cmdCheckIn, AtMs: 5400, Group: "crm", Site: "a"}).(checkInResult); r.Apply {
		t.Fatalf("standby of the deposed site applies before rejoin: %+v", r)
	}
	if err, _ := apply(t, f, 11, command{Kind: cmdRejoin, AtMs: 5500, Group: "crm", Actor: "op"}).(error); err != nil {
		t.Fatal(err)
	}
	if r := apply(t, f, 12, command{Kind: cmdCheckIn, AtMs: 5600, Group: "crm", Site: "a"}).(checkInResult); r.Apply {
		t.Fatalf("standby applies before the deposed agent reported: %+v", r)
	}
	if r := apply(t, f, 13, command{Kind: cmdCheckIn, AtMs: 5700, Group: "crm", Site: "a", Agent: true}).(checkInResult); !r.Report || r.Fence || r.Lease {
		t.Fatalf("deposed agent during rejoin: %+v, want asked to report, not fenced", r)
	}
	apply(t, f, 14, command{Kind: cmdCheckIn, AtMs: 5800, Group: "crm", Site: "a", Agent: true, Reported: true, Report: "/tmp/r.sql"})
	if r := apply(t, f, 15, command{Kind: cmdCheckIn, AtMs: 5900, Group: "crm", Site: "a"}).(checkInResult); !r.Apply || !r.Reseed {
		t.Fatalf("standby of the rejoining site: %+v, want to reseed", r)
	}
	// The check-in that ends the rejoin is the site's first report as DR,
	// from rules version 4; older rules drop it.
	ending := command{Kind: cmdCheckIn, AtMs: 6000, Group: "crm", Site: "a", Reseeded: true, LagSeconds: 0.2, AppliedLSN: 0x5000}
	older := snapshotRestored(t, f)
	apply(t, older, 16, ending)
	if g := older.read().Groups["crm"]; len(g.Deposed) != 0 || g.StandbySeenMs == 6000 || g.LagSeconds == 0.2 {
		t.Errorf("rules version %d: after rejoin deposed %v, DR seen at %d with lag %v; want rejoined, the report dropped",
			older.read().RulesVersion, g.Deposed, g.StandbySeenMs, g.LagSeconds)
	}
	apply(t, f, 16, command{Kind: cmdRulesVersion, AtMs: 5950, RulesVersion: 4, Actor: "controller@n1"})
	if r := apply(t, f, 17, ending).(checkInResult); !r.Apply || r.Reseed {
		t.Fatalf("standby after reseeding: %+v, want to apply", r)
	}
	if g := f.read().Groups["crm"]; len(g.Deposed) != 0 || g.RejoinSite != "" {
		t.Fatalf("after rejoin: deposed %v, rejoin %q", g.Deposed, g.RejoinSite)
	} else if g.StandbySeenMs != 6000 || g.LagSeconds != 0.2 || g.AppliedLSN != 0x5000 {
		t.Errorf("after rejoin: DR seen at %d with lag %v, applied %x; want the rejoin's check-in: 6000, 0.2, 5000", g.StandbySeenMs, g.LagSeconds, g.AppliedLSN)
	}
	if err, _ := apply(t, f, 18, command{Kind: cmdRejoin, AtMs: 6100, Group: "crm", Actor: "op"}).(error); err == nil {
		t.Fatal("a rejoin with nothing to rejoin was accepted")
	}
	// The audit trail chains.
	audit := f.read().Audit
	if len(audit) < 4 {
		t.Fatalf("audit has %d entries", len(audit))
	}
	for i := 1; i < len(audit); i++ {
		if audit[i].Index != audit[i-1].Index+1 || audit[i].Hash == audit[i-1].Hash {
			t.Fatalf("audit entries %d and %d do not chain", i-1, i)
		}
	}

	// Snapshot and restore give the same state.
	restored := snapshotRestored(t, f)
	want, _ := json.Marshal(f.read())
	got, _ := json.Marshal(restored.read())
	if !bytes.Equal(want, got) || len(restored.read().Groups) != 1 {
		t.Fatalf("restored state differs:\n%s\n%s", want, got)
	}
	if err := restored.Restore(io.NopCloser(bytes.NewReader([]byte("not json")))); err == nil {
		t.Fatal("a corrupt snapshot was restored")
	}
}

// TestFSMSwitchoverWaitsForDR: a switchover asked while DR lags stops no
// write until DR reports it is current; one that waits too long is
// aborted.
func TestFSMSwitchoverWaitsForDR(t *testing.T) {
	f := newFSM()
	agent := command{Kind: cmdCheckIn, Group: "crm", Site: "a", Agent: true, Epoch: 1, GrantLease: true, LeaseTTLMs: 2000}
	standby := command{Kind: cmdCheckIn, Group: "crm", Site: "b"}
	agent.AtMs, standby.AtMs, standby.LagSeconds = 1000, 1000, 4
	apply(t, f, 1, agent)
	apply(t, f, 2, standby)
	if err, _ := apply(t, f, 3, command{Kind: cmdSwitchover, AtMs: 1100, Group: "crm", Actor: "op"}).(error); err != nil {
		t.Fatal(err)
	}
	agent.AtMs = 1200
	if r := apply(t, f, 4, agent).(checkInResult); !r.Lease || r.SwitchoverFence {
		t.Fatalf("agent while DR lags 4s: %+v, want its lease and no fence", r)
	}
	if reason := switchoverStuck(f.read().Groups["crm"], time.UnixMilli(1100).Add(catchUpTimeout+time.Second)); !strings.Contains(reason, "did not catch up") {
		t.Errorf("a catch-up past its timeout: %q, want it aborted", reason)
	}
	standby.AtMs, standby.LagSeconds = 1300, 0.05
	apply(t, f, 5, standby)
	g := f.read().Groups["crm"]
	if g.Switchover != phaseFence || g.SwitchoverStarted != 1300 {
		t.Fatalf("after DR reported lag 0.05s: phase %q from %d, want fence from 1300", g.Switchover, g.SwitchoverStarted)
	}
	if reason := switchoverStuck(g, time.UnixMilli(1300).Add(time.Second)); reason != "" {
		t.Errorf("a fence a second old aborted: %s", reason)
	}
	agent.AtMs = 1400
	if r := apply(t, f, 6, agent).(checkInResult); !r.SwitchoverFence {
		t.Fatalf("agent once DR is current: %+v, want the switchover fence", r)
	}
	// DR current when asked: the fence starts at its next report, whose
	// answer has it check in faster.
	f = newFSM()
	apply(t, f, 1, agent)
	standby.AtMs = 1400
	apply(t, f, 2, standby)
	apply(t, f, 3, command{Kind: cmdSwitchover, AtMs: 1500, Group: "crm", Actor: "op"})
	if g := f.read().Groups["crm"]; g.Switchover != phaseCatchUp {
		t.Errorf("switchover with DR current: phase %q, want %q until DR reports", g.Switchover, phaseCatchUp)
	}
	standby.AtMs = 1600
	apply(t, f, 4, standby)
	if g := f.read().Groups["crm"]; g.Switchover != phaseFence || g.SwitchoverStarted != 1600 {
		t.Errorf("after DR's report: phase %q from %d, want fence from 1600", g.Switchover, g.SwitchoverStarted)
	}
}

// TestFSMIncompleteDR: a DR copy its standby reports incomplete is not
// switched over to, and a switchover already waiting does not fence the
// primary for it.
func TestFSMIncompleteDR(t *testing.T) {
	f := newFSM()
	agent := command{Kind: cmdCheckIn, AtMs: 1000, Group: "crm", Site: "a", Agent: true, Epoch: 1, GrantLease: true, LeaseTTLMs: 2000}
	standby := command{Kind: cmdCheckIn, AtMs: 1000, Group: "crm", Site: "b"}
	apply(t, f, 1, agent)
	apply(t, f, 2, standby)
	if err, _ := apply(t, f, 3, command{Kind: cmdSwitchover, AtMs: 1100, Group: "crm", Actor: "op"}).(error); err != nil {
		t.Fatal(err)
	}
	lacks := "1 table(s) joined with rows that are not all copied yet (backfill under way): public.deals"
	standby.AtMs, standby.Incomplete = 1200, lacks
	apply(t, f, 4, standby)
	g := f.read().Groups["crm"]
	if g.DRIncomplete != lacks || g.Switchover != phaseCatchUp {
		t.Fatalf("after an incomplete report: incomplete %q, switchover %q; want the report kept and the primary not fenced", g.DRIncomplete, g.Switchover)
	}
	apply(t, f, 5, command{Kind: cmdAbortSwitchover, AtMs: 1300, Group: "crm", Reason: "test"})
	err, _ := apply(t, f, 6, command{Kind: cmdSwitchover, AtMs: 1400, Group: "crm", Actor: "op"}).(error)
	if err == nil || !strings.Contains(err.Error(), "public.deals") {
		t.Fatalf("switchover to an incomplete DR: %v, want a refusal naming what it lacks", err)
	}
	standby.AtMs, standby.Incomplete = 1500, ""
	apply(t, f, 7, standby)
	if err, _ := apply(t, f, 8, command{Kind: cmdSwitchover, AtMs: 1600, Group: "crm", Actor: "op"}).(error); err != nil {
		t.Fatalf("switchover once DR is complete: %v", err)
	}
	if g := f.read().Groups["crm"]; g.DRIncomplete != "" {
		t.Errorf("after a complete report: incomplete %q", g.DRIncomplete)
	}
}

// TestFSMStopsAtNewerRules: a node whose build is older than the quorum's
// rules (rolled back in place) applies the raise, then nothing more, and
// takes no snapshot, so that its state cannot drift from the other nodes'
// nor be recorded as if it had applied what came after; restored from a
// snapshot of newer rules, it stops at once. Each time it says which build
// it needs.
func TestFSMStopsAtNewerRules(t *testing.T) {
	f := newFSM()
	apply(t, f, 1, command{Kind: cmdNode, AtMs: 1000, Node: "n1", Info: &NodeInfo{APIURL: "http://n1", RulesVersion: RulesVersion}})
	if err := f.stopped(); err != nil {
		t.Fatalf("stopped under its own rules: %v", err)
	}
	newer := RulesVersion + 1
	apply(t, f, 2, command{Kind: cmdRulesVersion, AtMs: 1100, RulesVersion: newer, Actor: "controller@n2"})
	want := fmt.Sprintf("a build of version %d or later", newer)
	if err := f.stopped(); err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("after the quorum moved to rules version %d: %v, want an error asking for %q", newer, err, want)
	}
	out := apply(t, f, 3, command{Kind: cmdNode, AtMs: 1200, Node: "n3", Info: &NodeInfo{APIURL: "http://n3"}})
	if err, _ := out.(error); err == nil {
		t.Errorf("a command after the newer rules returned %v, want an error", out)
	}
	if _, ok := f.read().Nodes["n3"]; ok {
		t.Error("a command after the newer rules changed the state")
	}
	if _, err := f.Snapshot(); err == nil {
		t.Error("a snapshot was taken under rules the node does not have")
	}

	// A node of the newer build snapshots that state; this build restores it.
	ahead := newFSM()
	apply(t, ahead, 1, command{Kind: cmdRulesVersion, AtMs: 1100, RulesVersion: newer, Actor: "controller@n2"})
	ahead.behind = nil // as the newer build, which has those rules
	if err := snapshotRestored(t, ahead).stopped(); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("restored from a snapshot of rules version %d: %v, want an error asking for %q", newer, err, want)
	}
}

// TestFSMRulesVersion: the quorum's rules version is raised by its
// command, never lowered, with an audit entry; the version every voter
// runs is the oldest, a silent voter counting as 1.
func TestFSMRulesVersion(t *testing.T) {
	f := newFSM()
	apply(t, f, 1, command{Kind: cmdRulesVersion, AtMs: 1400, RulesVersion: 2, Actor: "controller@n1"})
	apply(t, f, 2, command{Kind: cmdRulesVersion, AtMs: 1500, RulesVersion: 1, Actor: "controller@n1"})
	st := f.read()
	if st.RulesVersion != 2 {
		t.Fatalf("rules version %d after raising it to 2 and proposing 1, want 2", st.RulesVersion)
	}
	if len(st.Audit) != 1 || st.Audit[0].Action != "rules-version" || !strings.Contains(st.Audit[0].Outcome, "version 2") {
		t.Errorf("audit %+v, want one entry: the raise to version 2", st.Audit)
	}
	if got := snapshotRestored(t, f).read().RulesVersion; got != 2 {
		t.Errorf("rules version %d after a snapshot and restore, want 2", got)
	}

	nodes := map[string]NodeInfo{"n1": {RulesVersion: 2}, "n2": {RulesVersion: 2}, "n3": {}}
	for _, c := range []struct {
		voters []string
		want   int
	}{
		{[]string{"n1", "n2"}, 2},
		{[]string{"n1", "n2", "n3"}, 1}, // n3 has not said: an older build
		{[]string{"n1", "n4"}, 1},       // n4 not announced yet
		{nil, 1},                        // the configuration could not be read
	} {
		if got := quorumRulesVersion(nodes, c.voters); got != c.want {
			t.Errorf("quorum rules version of voters %v: %d, want %d", c.voters, got, c.want)
		}
	}
	// A removal is judged by the voters that stay: a node lost before its
	// upgrade does not hold it back.
	nodes = map[string]NodeInfo{"n1": {RulesVersion: 3}, "n2": {RulesVersion: 3}, "n3": {RulesVersion: 2}}
	for _, c := range []struct {
		voters []string
		want   int
	}{
		{[]string{"n1", "n2"}, 3},
		{[]string{"n1", "n2", "n3"}, 2},
	} {
		if got := quorumRulesVersion(nodes, c.voters); got != c.want {
			t.Errorf("quorum rules version of voters %v: %d, want %d", c.voters, got, c.want)
		}
	}
}

// TestFSMRemoveNode: a removed node's record and its probes of every group
// go, with an audit entry naming who removed it and why.
func TestFSMRemoveNode(t *testing.T) {
	f := newFSM()
	apply(t, f, 1, command{Kind: cmdCheckIn, AtMs: 1000, Group: "crm", Site: "a", Agent: true, Epoch: 1, URL: "postgres://a", GrantLease: true, LeaseTTLMs: 2000})
	for i, n := range []string{"n1", "n2", "n3"} {
		apply(t, f, uint64(2+2*i), command{Kind: cmdNode, AtMs: 1100, Node: n, Info: &NodeInfo{APIURL: "http://" + n, RulesVersion: 3}})
		apply(t, f, uint64(3+2*i), command{Kind: cmdObserve, AtMs: 1200, Group: "crm", Node: n, Observation: &Observation{Up: false, AtMs: 1200, SinceMs: 1200}})
	}
	if err, _ := apply(t, f, 8, command{Kind: cmdRemoveNode, AtMs: 1300, Node: "n3", Actor: "alice", Reason: "its data centre burned"}).(error); err != nil {
		t.Fatal(err)
	}
	for _, st := range []*State{f.read(), snapshotRestored(t, f).read()} {
		if _, ok := st.Nodes["n3"]; ok || len(st.Nodes) != 2 {
			t.Errorf("nodes %v after removing n3, want n1 and n2", st.Nodes)
		}
		if _, ok := st.Groups["crm"].Observations["n3"]; ok || len(st.Groups["crm"].Observations) != 2 {
			t.Errorf("observations %v after removing n3, want those of n1 and n2", st.Groups["crm"].Observations)
		}
		last := st.Audit[len(st.Audit)-1]
		if last.Action != "remove-node" || last.Actor != "alice" || last.Outcome != "node n3 removed from the quorum: its data centre burned" {
			t.Errorf("last audit entry %+v, want alice's removal of n3 and why", last)
		}
	}
}
