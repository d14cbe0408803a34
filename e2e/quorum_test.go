package e2e

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	connectrpc "connectrpc.com/connect"

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
