package main

import (
	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/haven-dr/haven/internal/opshttp"
	"github.com/haven-dr/haven/replicator"
)

func newStandbyCmd(logger func() (zerolog.Logger, error)) *cobra.Command {
	cfg := replicator.DefaultConfig()
	var httpAddr string
	cmd := &cobra.Command{
		Use:   "standby",
		Short: "Apply the group's stream to the DR database, exactly once and in commit order",
		Long: `The standby runs next to the DR database. It loads the initial snapshot (creating
missing tables), then applies every transaction in stream order, recording its
position in haven.apply_position in the same transaction as the changes.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := logger()
			if err != nil {
				return err
			}
			reg := newRegistry()
			s, err := replicator.New(cfg, log, reg)
			if err != nil {
				return err
			}
			ctx, stop := signalContext()
			defer stop()
			if httpAddr != "" {
				addr, _, err := opshttp.Serve(ctx, httpAddr, reg, s.Healthy)
				if err != nil {
					return err
				}
				log.Info().Str("addr", addr).Msg("serving /healthz and /metrics")
			}
			return s.Run(ctx)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.TargetURL, "target-url", "", "DR database URL, e.g. postgres://haven@db2:5432/crm")
	f.StringVar(&cfg.NATSURL, "nats-url", "", "NATS server URL(s), comma-separated")
	f.StringVar(&cfg.Group, "group", "", "replication group name")
	f.IntVar(&cfg.GroupChanges, "group-changes", cfg.GroupChanges, "row changes after which a target transaction commits")
	f.DurationVar(&cfg.GroupDelay, "group-delay", cfg.GroupDelay, "time after which a target transaction commits")
	f.IntVar(&cfg.PipelineStatements, "pipeline", cfg.PipelineStatements, "row changes per batch sent to DR (up to three batches are in flight at a time)")
	f.IntVar(&cfg.SnapshotLanes, "snapshot-lanes", cfg.SnapshotLanes, "DR connections an initial snapshot loads on at once, 1 or 2 (2 pays only when DR has CPUs to spare)")
	f.DurationVar(&cfg.BlockedRetry, "blocked-retry", cfg.BlockedRetry, "how often apply retries a message it could not apply")
	f.StringSliceVar(&cfg.Controllers, "controllers", nil, "control API URLs of the controller quorum (comma-separated): report DR's lag, and promote this database when the quorum orders it")
	f.StringVar(&cfg.Site, "site", "", "name of the DR site (with --controllers)")
	f.StringVar(&cfg.PromoteHook, "promote-hook", "", "shell command run after a promotion (HAVEN_GROUP, HAVEN_SITE, HAVEN_EPOCH in its environment)")
	f.Int64Var(&cfg.SequenceGap, "promote-sequence-gap", cfg.SequenceGap, "increments a promotion moves every sequence past the primary's last known value")
	f.StringVar(&cfg.DrillDir, "drill-dir", "", "directory on a disk with room for a copy of the DR cluster (not tmpfs) where promote drills clone it, in haven-clone-<group> (empty: no promote drills)")
	f.StringVar(&cfg.DrillCloneRate, "drill-clone-rate", "", "cap on how fast a promote drill reads the DR cluster (pg_basebackup --max-rate, e.g. 64M); empty: none")
	f.StringVar(&httpAddr, "http-addr", "", "address for /healthz and /metrics, e.g. :9188 (empty: off)")
	return cmd
}
