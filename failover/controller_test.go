package failover

import (
	"net"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// TestNoRulesVersionRaiseDuringAJoin: while a join is being decided (from
// its check of the joining node's rules version until the node is a
// voter), the leader does not raise the quorum's rules version; it does at
// its next tick. A real one-node Raft quorum on loopback.
func TestNoRulesVersionRaiseDuringAJoin(t *testing.T) {
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
	t.Cleanup(c.shutdown)
	for deadline := time.Now().Add(30 * time.Second); !c.isLeader(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the one-node quorum elected no leader in 30 s")
		}
	}
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
