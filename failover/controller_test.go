package failover

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// TestNoRulesVersionRaiseDuringAJoin: while a join is being decided (from
// its check of the joining node's rules version until the node is a
// voter), the leader does not raise the quorum's rules version; it does at
// its next tick. A real one-node Raft quorum on loopback.
func TestNoRulesVersionRaiseDuringAJoin(t *testing.T) {
	c := startOneNode(t)
	t.Cleanup(c.shutdown)
	for _, cmd := range []command{
		{Kind: cmdNode, AtMs: 1000, Node: "n1", Info: &NodeInfo{APIURL: "http://n1", RulesVersion: RulesVersion}},
		{Kind: cmdRulesVersion, AtMs: 1000, RulesVersion: RulesVersion - 1},
	} {
		if _, err := c.propose(cmd); err != nil {
			t.Fatal(err)
		}
	}

	c.membership.Lock() // as Join holds it
	c.raiseRulesVersion(time.Now())
	if got := c.fsm.read().RulesVersion; got != RulesVersion-1 {
		t.Errorf("rules version %d while a join was decided, want it left at %d", got, RulesVersion-1)
	}
	c.membership.Unlock()
	c.raiseRulesVersion(time.Now())
	if got := c.fsm.read().RulesVersion; got != RulesVersion {
		t.Errorf("rules version %d once the join was decided, want %d (every voter runs it)", got, RulesVersion)
	}
}

// TestANodeBehindTheQuorumsRulesStops: a node whose build is older than
// the rules its quorum moves to (rolled back in place) proposes nothing
// more from its stale state (as leader, it would decide for the quorum),
// and Run stops, saying which build it needs. A real one-node Raft quorum
// on loopback.
func TestANodeBehindTheQuorumsRulesStops(t *testing.T) {
	c := startOneNode(t)
	if _, err := c.propose(command{Kind: cmdRulesVersion, AtMs: 1000, RulesVersion: RulesVersion + 1}); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("a build of version %d or later", RulesVersion+1)
	last := c.raft.LastIndex()
	if _, err := c.propose(command{Kind: cmdNode, AtMs: 1100, Node: "n1", Info: &NodeInfo{APIURL: "http://n1"}}); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("a proposal after the quorum moved on: %v, want an error asking for %q", err, want)
	}
	if got := c.raft.LastIndex(); got != last {
		t.Errorf("the node behind the quorum's rules appended to the log (index %d to %d)", last, got)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c.cfg.APIAddr = ln.Addr().String()
	ln.Close()
	ran := make(chan error, 1)
	go func() { ran <- c.Run(t.Context()) }()
	select {
	case err := <-ran:
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Run returned %v, want an error asking for %q", err, want)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the node still runs 30 s after its quorum moved to rules it does not have")
	}
}

// startOneNode starts a controller node that is its own quorum, on
// loopback, and waits for it to lead. Its API is not served (Run).
func startOneNode(t *testing.T) *Controller {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	raftAddr := ln.Addr().String()
	ln.Close()
	cfg := DefaultConfig()
	cfg.ID, cfg.RaftAddr, cfg.APIAddr, cfg.DataDir = "n1", raftAddr, "127.0.0.1:1", t.TempDir()
	cfg.Peers = map[string]string{"n1": raftAddr}
	c, err := Start(cfg, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); !c.isLeader(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			c.shutdown()
			t.Fatal("the one-node quorum elected no leader in 30 s")
		}
	}
	return c
}
