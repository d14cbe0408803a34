package e2e

import (
	"context"
	"fmt"
	"net/http"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	connectrpc "connectrpc.com/connect"
	"github.com/jackc/pgx/v5"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/havenpb/havenpbconnect"
)

// TestALostControllerIsReplaced: a controller node whose host is lost is
// removed from the quorum and a new node joins in its place, so that the
// quorum again outlives the loss of any one node. Removing a node that
// still runs, the leader, or a node that is not a member is refused.
func TestALostControllerIsReplaced(t *testing.T) {
	q := startQuorum(t, 3)
	waitFor(t, 30*time.Second, "the quorum to apply rules version 4", func() (bool, error) {
		st, err := q.status(t)
		return err == nil && st.RulesVersion == 4, err
	})
	leader := leaderIndex(t, q)
	lost := (leader + 1) % 3
	lostID := fmt.Sprintf("c%d", lost+1)
	for _, c := range []struct{ node, refusal string }{
		{lostID, "still runs"},
		{fmt.Sprintf("c%d", leader+1), "leads the quorum"},
		{"c9", `node "c9" is not in the quorum`},
	} {
		if out, err := q.ctl(t, "remove-node", c.node); err == nil || !strings.Contains(out, c.refusal) {
			t.Errorf("remove-node %s: %v, %s; want a refusal saying %q", c.node, err, out, c.refusal)
		}
	}

	// A node of older rules would not apply the quorum's commands alike.
	_, err := havenpbconnect.NewControlClient(http.DefaultClient, q.apis[leader]).Join(t.Context(), connectrpc.NewRequest(&havenpb.JoinRequest{
		NodeId: "old", RaftAddress: "127.0.0.1:1", ApiUrl: "http://127.0.0.1:1", RulesVersion: 2}))
	if err == nil || !strings.Contains(err.Error(), "runs version 2 of the state's rules, and the quorum applies version 4") {
		t.Errorf("a node of rules version 2 asked to join: %v; want a refusal", err)
	}

	q.procs[lost].kill()
	live := q.without(lost)
	out, err := live.ctl(t, "remove-node", lostID, "--reason", "its host is gone", "--actor", "alice")
	if err != nil || !strings.Contains(out, "node "+lostID+" removed") {
		t.Fatalf("remove-node %s: %v, %s", lostID, err, out)
	}
	// Any node may answer: one that follows the leader learns of it soon.
	waitFor(t, 10*time.Second, lostID+"'s removal to show in the members and the audit trail", func() (bool, error) {
		st, err := live.status(t)
		if err != nil || len(st.Audit) == 0 {
			return false, err
		}
		e := st.Audit[len(st.Audit)-1]
		return len(st.Nodes) == 2 && !slices.ContainsFunc(st.Nodes, func(n ctlNode) bool { return n.ID == lostID }) &&
			e.Action == "remove-node" && e.Actor == "alice" && strings.Contains(e.Outcome, lostID+" removed from the quorum: its host is gone"), nil
	})

	// The lost node comes back with its old state: it stays out.
	q.restart(t, lost)

	// A new node joins in the lost one's place.
	raft, api := fmt.Sprintf("127.0.0.1:%d", freePort(t)), fmt.Sprintf("127.0.0.1:%d", freePort(t))
	startHaven(t, "controller-c4", "controller", "--id", "c4", "--raft-addr", raft, "--api-addr", api, "--data-dir", t.TempDir(),
		"--join", live.apis[0], "--http-addr", fmt.Sprintf("127.0.0.1:%d", freePort(t)))
	live.apis = append(live.apis, "http://"+api)
	waitFor(t, 30*time.Second, "c4 to join as a voter", func() (bool, error) {
		st, err := live.status(t)
		voters := 0
		for _, n := range st.Nodes {
			if n.Voter && n.RulesVersion == 4 {
				voters++
			}
		}
		return err == nil && voters == 3 && len(st.Nodes) == 3, err
	})

	// With three voters again, the quorum outlives a second loss: it still
	// changes its state (here, removing that node too).
	st, err := live.status(t)
	if err != nil {
		t.Fatal(err)
	}
	second := (lost + 1) % 3
	if fmt.Sprintf("c%d", second+1) == st.LeaderID {
		second = (lost + 2) % 3
	}
	q.procs[second].kill()
	rest := &quorum{apis: slices.DeleteFunc(slices.Clone(live.apis), func(u string) bool { return u == q.apis[second] })}
	if out, err := rest.ctl(t, "remove-node", fmt.Sprintf("c%d", second+1)); err != nil || !strings.Contains(out, "a majority is 2 of them") {
		t.Errorf("remove-node after a second loss, with c4 in the quorum: %v, %s", err, out)
	}
	want := []string{fmt.Sprintf("c%d", 3-lost-second+1), "c4"} // the node neither lost nor killed
	slices.Sort(want)
	waitFor(t, 10*time.Second, fmt.Sprintf("the quorum's members to be %v", want), func() (bool, error) {
		st, err := rest.status(t)
		var ids []string
		for _, n := range st.Nodes {
			ids = append(ids, n.ID)
		}
		slices.Sort(ids)
		return err == nil && slices.Equal(ids, want), err
	})
	// The lost node, outside, says why it may have no leader.
	waitFor(t, 30*time.Second, "the removed node to say it may have been removed", func() (bool, error) {
		return strings.Contains(q.procs[lost].output(), "or this node was removed from the quorum"), nil
	})
}

// TestAQuorumIsRecoveredFromItsLastNode: two of three controller nodes are
// lost for good. The last one alone commits nothing: the primary's lease
// runs out and its agent fences it, and nothing could promote DR. haven
// controller recover, refused while the node runs, rebuilds the quorum from
// the stopped node's state: started again, it leads alone with the group
// as it was, the primary takes writes again, the audit trail records the
// recovery, and when the primary is killed, the one-node quorum promotes DR.
func TestAQuorumIsRecoveredFromItsLastNode(t *testing.T) {
	f := startFailoverSite(t)
	q := f.q
	before, err := q.status(t)
	if err != nil {
		t.Fatal(err)
	}
	q.procs[0].kill()
	q.procs[1].kill()
	writes := func() bool {
		conn, err := pgx.Connect(t.Context(), f.site.primaryURL())
		if err != nil {
			return false
		}
		defer conn.Close(context.Background())
		_, err = conn.Exec(t.Context(), `INSERT INTO acked (id) VALUES ($1)`, f.acked.next.Add(1))
		return err == nil
	}
	waitFor(t, 30*time.Second, "the primary to refuse writes once its lease runs out", func() (bool, error) { return !writes(), nil })

	flag := func(name string) string { return q.args[2][slices.Index(q.args[2], name)+1] }
	recoverArgs := []string{"controller", "recover", "--id", "c3", "--data-dir", flag("--data-dir"), "--voters", "c3=" + flag("--raft-addr"),
		"--actor", "alice", "--reason", "site 1 burned"}
	if out, err := exec.Command(havenBin, recoverArgs...).CombinedOutput(); err == nil || !strings.Contains(string(out), "stop controller node c3 first") {
		t.Errorf("recover while the node runs: %v, %s; want a refusal", err, out)
	}
	if out, err := exec.Command(havenBin, "controller", "recover", "--id", "c3", "--data-dir", flag("--data-dir"), "--voters", "c1=127.0.0.1:1").CombinedOutput(); err == nil ||
		!strings.Contains(string(out), "do not include this node (c3)") {
		t.Errorf("recover with voters that leave the node out: %v, %s; want a refusal", err, out)
	}
	if out, err := exec.Command(havenBin, "controller", "recover", "--id", "c3", "--data-dir", t.TempDir(), "--voters", "c3=127.0.0.1:1").CombinedOutput(); err == nil ||
		!strings.Contains(string(out), "no Raft state in") {
		t.Errorf("recover on an empty directory: %v, %s; want a refusal", err, out)
	}
	q.procs[2].stop()
	out, err := exec.Command(havenBin, "controller", "recover", "--dry-run", "--id", "c3", "--data-dir", flag("--data-dir")).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Raft log through index") || !strings.Contains(string(out), "the quorum's voters: c1, c2, c3. Nothing changed.") {
		t.Fatalf("recover --dry-run: %v, %s", err, out)
	}
	out, err = exec.Command(havenBin, recoverArgs...).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "voters are now c3 (were c1, c2, c3)") || !strings.Contains(string(out), "Left out: c1, c2") {
		t.Fatalf("recover: %v, %s", err, out)
	}
	q.restart(t, 2)
	last := &quorum{apis: q.apis[2:]}
	waitFor(t, 30*time.Second, "c3 to lead alone, with the group as it was and the recovery in the audit trail", func() (bool, error) {
		st, err := last.status(t)
		if err != nil || st.LeaderID != "c3" || len(st.Groups) != 1 || len(st.Audit) == 0 {
			return false, nil
		}
		g, e := st.Groups[0], st.Audit[len(st.Audit)-1]
		if g.PrimarySite != "a" || g.Epoch != before.Groups[0].Epoch || len(st.Nodes) != 1 || st.Nodes[0].ID != "c3" {
			return false, fmt.Errorf("after the recovery: primary site %s at epoch %s (before: a at %s), nodes %v", g.PrimarySite, g.Epoch, before.Groups[0].Epoch, st.Nodes)
		}
		return e.Action == "recover-quorum" && e.Actor == "alice" && strings.Contains(e.Outcome, "voters c3 (were c1, c2, c3): site 1 burned"), nil
	})
	waitFor(t, 30*time.Second, "the primary to take writes again under the recovered quorum's lease", func() (bool, error) { return writes(), nil })

	f.killPrimary(t)
	st, err := last.status(t)
	if err != nil {
		t.Fatal(err)
	}
	if g := st.Groups[0]; g.PrimarySite != "b" {
		t.Errorf("after the primary was killed: primary site %s, want b", g.PrimarySite)
	}
}
