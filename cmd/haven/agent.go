package main

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/haven-dr/haven/agent"
	"github.com/haven-dr/haven/internal/opshttp"
)

func newAgentCmd(logger func() (zerolog.Logger, error)) *cobra.Command {
	cfg := agent.DefaultConfig()
	var httpAddr string
	var printDDLCapture bool
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Capture the primary database's changes into the group's JetStream stream",
		Long: `The agent runs next to the primary. On first start it creates a publication and a
logical slot, publishes an initial snapshot of every table, then streams every
committed change. It confirms a WAL position to PostgreSQL only once JetStream
has acknowledged everything before it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if printDDLCapture {
				script, err := agent.DDLCaptureSQL(cfg)
				if err != nil {
					return err
				}
				_, err = fmt.Fprintln(cmd.OutOrStdout(), script)
				return err
			}
			log, err := logger()
			if err != nil {
				return err
			}
			reg := newRegistry()
			a, err := agent.New(cfg, log, reg)
			if err != nil {
				return err
			}
			ctx, stop := signalContext()
			defer stop()
			if httpAddr != "" {
				addr, _, err := opshttp.Serve(ctx, httpAddr, reg, a.Healthy)
				if err != nil {
					return err
				}
				log.Info().Str("addr", addr).Msg("serving /healthz and /metrics")
			}
			return a.Run(ctx)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.SourceURL, "source-url", "", "primary database URL, e.g. postgres://haven@db1:5432/crm")
	f.StringVar(&cfg.NATSURL, "nats-url", "", "NATS server URL(s), comma-separated")
	f.StringVar(&cfg.Group, "group", "", "replication group name (lower-case letters, digits, underscores)")
	f.StringSliceVar(&cfg.Tables, "tables", nil, "tables to replicate (schema.table, comma-separated); default: every table outside system schemas")
	f.BoolVar(&cfg.PublishViaRoot, "publish-via-partition-root", false, "publish partitioned tables as their root table, so DR may partition them differently (needs a superuser once, to capture TRUNCATE of single partitions)")
	f.BoolVar(&cfg.SetReplicaIdentityFull, "set-replica-identity-full", false, "give tables without a primary key or usable replica identity REPLICA IDENTITY FULL instead of refusing them (says so for each)")
	f.Uint64Var(&cfg.Epoch, "epoch", cfg.Epoch, "fencing epoch stamped on every message (with --controllers, the quorum's epoch replaces it)")
	f.StringSliceVar(&cfg.Controllers, "controllers", nil, "control API URLs of the controller quorum (comma-separated): hold the primary's lease, fence this database when it is lost or another site is promoted")
	f.StringVar(&cfg.Site, "site", "", "name of this agent's site (with --controllers)")
	f.BoolVar(&cfg.Synchronous, "synchronous", false, "make commits on the primary wait until JetStream has them (RPO 0): names the agent in synchronous_standby_names")
	f.StringVar(&cfg.ReportDir, "report-dir", cfg.ReportDir, "where a deposed primary's agent writes, when it rejoins, the SQL of transactions the new primary lacks")
	f.StringVar(&cfg.ProbeURL, "probe-url", "", "URL the controllers probe this primary with (default: --source-url)")
	f.IntVar(&cfg.StreamReplicas, "stream-replicas", cfg.StreamReplicas, "replicas of a stream the agent creates (1, 3 or 5)")
	f.DurationVar(&cfg.StreamMaxAge, "stream-max-age", cfg.StreamMaxAge, "how long the stream keeps messages (0: no limit)")
	f.Int64Var(&cfg.StreamMaxBytes, "stream-max-bytes", cfg.StreamMaxBytes, "stream size bound; when full, new changes wait in the slot (0: no limit)")
	f.DurationVar(&cfg.DuplicateWindow, "duplicate-window", cfg.DuplicateWindow, "JetStream dedupe window of a stream the agent creates")
	f.IntVar(&cfg.ChunkBytes, "chunk-bytes", cfg.ChunkBytes, "upper bound of one message's size")
	f.IntVar(&cfg.SnapshotChunkBytes, "snapshot-chunk-bytes", cfg.SnapshotChunkBytes, "size of one message of the initial snapshot's rows (at most the NATS server's max_payload less 64 KiB)")
	f.BoolVar(&cfg.Compress, "compress", cfg.Compress, "compress every message with zstd (without it, only snapshot rows are compressed, with the faster s2)")
	f.IntVar(&cfg.BackfillChunkRows, "backfill-chunk-rows", cfg.BackfillChunkRows, "rows per chunk when backfilling a table that joined the group with rows (each chunk is one short read, held in memory until JetStream has it)")
	f.IntVar(&cfg.SnapshotWorkers, "snapshot-workers", cfg.SnapshotWorkers, "tables copied in parallel by the initial snapshot")
	f.BoolVar(&cfg.SnapshotBinary, "snapshot-binary", cfg.SnapshotBinary, "copy tables whose columns are all of built-in types in COPY's binary format (cheaper for both servers); false: text for every table")
	f.DurationVar(&cfg.HeartbeatInterval, "heartbeat-interval", cfg.HeartbeatInterval, "interval of heartbeats through the slot")
	f.DurationVar(&cfg.StatusInterval, "status-interval", cfg.StatusInterval, "interval of status updates to the walsender (keep under wal_sender_timeout)")
	f.IntVar(&cfg.MaxInFlight, "max-in-flight", cfg.MaxInFlight, "messages published but not yet acknowledged")
	f.DurationVar(&cfg.PublishTimeout, "publish-timeout", cfg.PublishTimeout, "how long a message may wait for JetStream's acknowledgement before the agent reconnects and republishes")
	f.Int64Var(&cfg.RetainedWALWarning, "retained-wal-warning", cfg.RetainedWALWarning, "warn when the slot holds more WAL than this many bytes on the primary (0: never)")
	f.StringVar(&cfg.PgDump, "pg-dump", "", `pg_dump that ships the source schema (types, defaults, sequences, constraints, indexes) with the initial snapshot; empty: find one; "off": none`)
	f.StringVar(&httpAddr, "http-addr", "", "address for /healthz and /metrics, e.g. :9187 (empty: off)")
	f.BoolVar(&printDDLCapture, "print-ddl-capture", false, "print the SQL a superuser runs for an agent that is not one (DDL capture, the group, its publication), given the agent's other flags, and exit")
	return cmd
}

func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}
