package failover

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/rs/zerolog"
	"go.etcd.io/bbolt"
)

// Recovery is a quorum rebuilt from the nodes that survive a loss of its
// majority (RecoverQuorum).
type Recovery struct {
	// DataDir and ID name the stopped node whose Raft state is rewritten.
	DataDir, ID string
	// Voters are the nodes that make the quorum from now on, by id with
	// their Raft address: as a rule this node alone, the other survivors
	// joining it afresh (each survivor recovered with the same list would
	// count its own log as committed, and their logs may differ).
	Voters map[string]string
	// Actor and Reason go into the audit trail.
	Actor, Reason string
	// DryRun reads the node's Raft state and changes nothing.
	DryRun bool
}

// RecoveryResult says what a recovery changed.
type RecoveryResult struct {
	Before  []string // the voters before
	After   []string // the voters from now on (Recovery.Voters' ids)
	Dropped []string // the voters left out
	// LastIndex and LastTerm are the last entry of the node's Raft log:
	// of several survivors, the one with the highest term, then index,
	// knows the most.
	LastIndex, LastTerm uint64
}

// RecoverQuorum makes r.Voters the quorum's only voters in the Raft state
// of a stopped node, for when a majority of the quorum is lost for good:
// without a majority, the quorum commits nothing, not even a remove-node,
// and cannot promote DR. Every entry in the node's Raft log counts as
// committed, and the state forgets the nodes left out (their probes, as
// remove-node does) and records the recovery in the audit trail. Started
// again, the node leads a quorum of r.Voters; new nodes join it with
// --join. A node left out must never run again with its old data: with
// the others left out, it could form a quorum of its own.
func RecoverQuorum(r Recovery, log zerolog.Logger) (RecoveryResult, error) {
	res := RecoveryResult{After: slices.Sorted(maps.Keys(r.Voters))}
	if _, ok := r.Voters[r.ID]; !ok && !r.DryRun {
		return res, fmt.Errorf("the voters (%s) do not include this node (%s): name this node, as a rule alone",
			strings.Join(res.After, ", "), r.ID)
	}
	if _, err := os.Stat(filepath.Join(r.DataDir, "raft.db")); err != nil {
		return res, fmt.Errorf("no Raft state in %s (%w): name the --data-dir of a node of the quorum", r.DataDir, err)
	}
	store, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(r.DataDir, "raft.db"), BoltOptions: &bbolt.Options{Timeout: time.Second}})
	if errors.Is(err, bbolt.ErrTimeout) {
		return res, fmt.Errorf("the Raft state in %s is open: stop controller node %s first", r.DataDir, r.ID)
	}
	if err != nil {
		return res, fmt.Errorf("open the Raft log in %s: %w", r.DataDir, err)
	}
	defer store.Close()
	snaps, err := raft.NewFileSnapshotStore(r.DataDir, 3, zerologWriter{log})
	if err != nil {
		return res, fmt.Errorf("open Raft snapshots in %s: %w", r.DataDir, err)
	}
	rc := raftConfig(r.ID, log)
	_, trans := raft.NewInmemTransport("")
	before, err := raft.GetConfiguration(rc, newFSM(), store, store, snaps, trans)
	if err != nil {
		return res, fmt.Errorf("read the quorum's configuration in %s: %w", r.DataDir, err)
	}
	if len(before.Servers) == 0 {
		return res, fmt.Errorf("the Raft state in %s holds no configuration: the node never joined a quorum", r.DataDir)
	}
	for _, s := range before.Servers {
		if s.Suffrage == raft.Voter {
			res.Before = append(res.Before, string(s.ID))
			if _, stays := r.Voters[string(s.ID)]; !stays {
				res.Dropped = append(res.Dropped, string(s.ID))
			}
		}
	}
	slices.Sort(res.Before)
	slices.Sort(res.Dropped)
	if res.LastIndex, res.LastTerm, err = lastEntry(store, snaps); err != nil || r.DryRun {
		return res, err
	}
	var voters raft.Configuration
	for _, id := range res.After {
		voters.Servers = append(voters.Servers, raft.Server{ID: raft.ServerID(id), Address: raft.ServerAddress(r.Voters[id]), Suffrage: raft.Voter})
	}
	f := &recoveringFSM{fsm: newFSM(), dropped: res.Dropped, atMs: time.Now().UnixMilli(), actor: r.Actor,
		outcome: fmt.Sprintf("quorum recovered on node %s: voters %s (were %s)", r.ID, strings.Join(res.After, ", "), strings.Join(res.Before, ", "))}
	if r.Reason != "" {
		f.outcome += ": " + r.Reason
	}
	if err := raft.RecoverCluster(rc, f, store, store, snaps, trans, voters); err != nil {
		return res, fmt.Errorf("recover the quorum in %s: %w", r.DataDir, err)
	}
	return res, nil
}

// recoveringFSM is the state RecoverCluster replays from the node's Raft
// state; the snapshot it then takes, which carries the new configuration,
// no longer knows the nodes left out and records the recovery.
type recoveringFSM struct {
	*fsm
	dropped []string
	atMs    int64
	actor   string
	outcome string
}

func (f *recoveringFSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.Lock()
	if f.behind == nil {
		for _, n := range f.dropped {
			f.state.forget(n)
		}
		f.state.audit(f.atMs, f.actor, "recover-quorum", "", f.outcome)
	}
	f.mu.Unlock()
	return f.fsm.Snapshot()
}

// lastEntry is the last entry of a Raft log, or of the snapshot that
// replaced it.
func lastEntry(logs raft.LogStore, snaps raft.SnapshotStore) (index, term uint64, err error) {
	metas, err := snaps.List()
	if err != nil {
		return 0, 0, fmt.Errorf("list the Raft snapshots: %w", err)
	}
	if len(metas) > 0 {
		index, term = metas[0].Index, metas[0].Term
	}
	last, err := logs.LastIndex()
	if err != nil {
		return 0, 0, fmt.Errorf("read the Raft log: %w", err)
	}
	if last > index {
		var l raft.Log
		if err := logs.GetLog(last, &l); err != nil {
			return 0, 0, fmt.Errorf("read the Raft log's last entry: %w", err)
		}
		index, term = l.Index, l.Term
	}
	return index, term, nil
}
