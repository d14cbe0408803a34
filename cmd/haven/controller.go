package main

import (
	"fmt"
	"strings"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/haven-dr/haven/failover"
	"github.com/haven-dr/haven/internal/opshttp"
)

func newControllerCmd(logger func() (zerolog.Logger, error)) *cobra.Command {
	cfg := failover.DefaultConfig()
	var peers, routes, dbRoutes []string
	var httpAddr string
	cmd := &cobra.Command{
		Use:   "controller",
		Short: "Run one node of the controller quorum that detects a lost primary, fences it and promotes the DR site",
		Long: `Controller nodes (3 or 5, across sites) form a Raft quorum. Each probes every
group's primary; the leader fails a group over when a majority saw its primary
down for --failover-after, the primary's lease ran out, and DR lags at most
--max-rpo. Every node serves the control API (haven ctl) and forwards changes to
the leader. Start a new cluster with the same --peers on every node, or add a
node to a running one with --join.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := logger()
			if err != nil {
				return err
			}
			if cfg.Peers, err = parsePeers(peers); err != nil {
				return fmt.Errorf("--peers: %w", err)
			}
			if cfg.RaftRoutes, err = parsePeers(routes); err != nil {
				return fmt.Errorf("--raft-route: %w", err)
			}
			if cfg.DBRoutes, err = parsePeers(dbRoutes); err != nil {
				return fmt.Errorf("--db-route: %w", err)
			}
			c, err := failover.Start(cfg, log)
			if err != nil {
				return err
			}
			ctx, stop := signalContext()
			defer stop()
			if httpAddr != "" {
				reg := newRegistry()
				reg.MustRegister(c)
				addr, _, err := opshttp.Serve(ctx, httpAddr, reg, c.Healthy)
				if err != nil {
					return err
				}
				log.Info().Str("addr", addr).Msg("serving /healthz and /metrics")
			}
			return c.Run(ctx)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.ID, "id", "", "this node's id, unique in the quorum")
	f.StringVar(&cfg.RaftAddr, "raft-addr", "", "host:port for Raft traffic between controller nodes")
	f.StringVar(&cfg.APIAddr, "api-addr", "", "host:port the control API listens on")
	f.StringVar(&cfg.APIURL, "api-url", "", "URL other nodes and clients reach this node's API at (default http://<api-addr>)")
	f.StringVar(&cfg.DataDir, "data-dir", "", "directory for the Raft log and snapshots")
	f.StringSliceVar(&peers, "peers", nil, "every voter of a new cluster as id=host:port (Raft address), this node included, the same on every node")
	f.StringVar(&cfg.Join, "join", "", "API URL of a running node, to join its cluster")
	f.StringSliceVar(&routes, "raft-route", nil, "id=host:port: where this node dials a peer's Raft traffic, when not at its address in --peers (a gateway between sites)")
	f.DurationVar(&cfg.Policy.FailoverAfter, "failover-after", cfg.Policy.FailoverAfter, "how long a majority must see the primary down before failover")
	f.DurationVar(&cfg.Policy.MaxRPO, "max-rpo", cfg.Policy.MaxRPO, "most DR may lag for an automatic failover; beyond it, alert and wait for failover --force")
	f.DurationVar(&cfg.Policy.ProbeInterval, "probe-interval", cfg.Policy.ProbeInterval, "how often each node probes each primary")
	f.DurationVar(&cfg.LeaseTTL, "lease-ttl", cfg.LeaseTTL, "the primary agent's lease; shorter than --failover-after")
	f.StringVar(&cfg.NATSURL, "nats-url", "", "NATS server to publish drill reports on (haven.drills.<group>); empty: reports stay in the controllers' state")
	f.StringSliceVar(&dbRoutes, "db-route", nil, "host:port=host:port: where this node reaches a database the agents registered (to probe or fence it), when not at its own address")
	f.StringVar(&httpAddr, "http-addr", "", "address for /healthz (200 while the node has a leader) and /metrics, e.g. :9189 (empty: off)")
	cmd.AddCommand(newRecoverCmd(logger))
	return cmd
}

func newRecoverCmd(logger func() (zerolog.Logger, error)) *cobra.Command {
	var r failover.Recovery
	var voters []string
	cmd := &cobra.Command{
		Use:   "recover",
		Short: "Rebuild a quorum that lost its majority for good from a stopped node that survives",
		Long: `Without a majority the quorum commits nothing: it cannot fail over, remove a
node, or renew the primary's lease. Stop a surviving node and run this on its
--data-dir with --voters naming it alone. With several survivors, stop them
all, run --dry-run on each, and recover the one whose Raft log has the highest
term, then index. Every entry in its Raft log counts as committed, the state
forgets the nodes left out, and the audit trail records the recovery. Start
the node again as before: it leads alone, and the other nodes join it with
--join. Never start a node left out with its old --data-dir: wipe it first, or
it may form a quorum of its own with the other nodes left out.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := logger()
			if err != nil {
				return err
			}
			if r.ID == "" || r.DataDir == "" || (len(voters) == 0 && !r.DryRun) {
				return fmt.Errorf("set --id, --data-dir and --voters (id=host:port of each node that makes the quorum from now on, this one included)")
			}
			if r.Voters, err = parsePeers(voters); err != nil {
				return fmt.Errorf("--voters: %w", err)
			}
			if r.Actor == "" {
				r.Actor = "operator"
			}
			res, err := failover.RecoverQuorum(r, log)
			if err != nil {
				return err
			}
			if r.DryRun {
				fmt.Fprintf(cmd.OutOrStdout(), "node %s: Raft log through index %d (term %d); the quorum's voters: %s. Nothing changed.\n",
					r.ID, res.LastIndex, res.LastTerm, strings.Join(res.Before, ", "))
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "node %s: Raft log through index %d (term %d), all of it now committed.\n", r.ID, res.LastIndex, res.LastTerm)
			fmt.Fprintf(cmd.OutOrStdout(), "node %s: the quorum's voters are now %s (were %s).\n", r.ID, strings.Join(res.After, ", "), strings.Join(res.Before, ", "))
			if len(res.Dropped) > 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "Left out: %s. Wipe their --data-dir before any of them runs again.\n", strings.Join(res.Dropped, ", "))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Start node %s as before; add nodes with haven controller --join.\n", r.ID)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&r.ID, "id", "", "this node's id")
	f.StringVar(&r.DataDir, "data-dir", "", "this node's --data-dir (the node must be stopped)")
	f.StringSliceVar(&voters, "voters", nil, "the nodes that make the quorum from now on as id=host:port (Raft address), this one included")
	f.BoolVar(&r.DryRun, "dry-run", false, "say how far this node's Raft log goes and who the voters are, and change nothing")
	f.StringVar(&r.Actor, "actor", "", "who recovers, for the audit trail (default operator)")
	f.StringVar(&r.Reason, "reason", "", "why, for the audit trail")
	return cmd
}

func parsePeers(list []string) (map[string]string, error) {
	if len(list) == 0 {
		return nil, nil
	}
	peers := map[string]string{}
	for _, p := range list {
		id, addr, ok := strings.Cut(p, "=")
		if !ok || id == "" || addr == "" {
			return nil, fmt.Errorf("entry %q: use id=host:port", p)
		}
		if _, dup := peers[id]; dup {
			return nil, fmt.Errorf("%q named twice", id)
		}
		peers[id] = addr
	}
	return peers, nil
}
