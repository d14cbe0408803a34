package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/user"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/haven-dr/haven/replicator"
)

func newInspectCmd() *cobra.Command {
	var natsURL, group string
	var seq uint64
	cmd := &cobra.Command{
		Use:   "inspect",
		Short: "Print one stream message as JSON (decoded, or why it cannot be)",
		Long: `Reads message --seq of the group's stream and prints it as JSON: headers, and the
decoded chunk with every value as text, or the decoding error and the first
bytes when it cannot be decoded. It changes nothing.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if natsURL == "" || group == "" || seq == 0 {
				return fmt.Errorf("set --nats-url, --group and --seq")
			}
			ctx, stop := signalContext()
			defer stop()
			view, err := replicator.Inspect(ctx, natsURL, group, seq)
			if err != nil {
				return err
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(view)
		},
	}
	cmd.Flags().StringVar(&natsURL, "nats-url", "", "NATS server URL(s)")
	cmd.Flags().StringVar(&group, "group", "", "replication group")
	cmd.Flags().Uint64Var(&seq, "seq", 0, "stream sequence of the message (the standby's log and /healthz name it)")
	return cmd
}

func newSkipCmd(logger func() (zerolog.Logger, error)) *cobra.Command {
	req := replicator.SkipRequest{}
	cmd := &cobra.Command{
		Use:   "skip",
		Short: "Deliberately step over the stream message apply is stopped at, and record it",
		Long: `A standby stops at a message it cannot apply and never skips it by itself. When an
operator decides the message must be dropped (after 'haven inspect'), this
records it in haven.skipped_messages on the DR database (the message, who, when
and why) and moves the apply position past it, in one transaction. Only the
message apply is stopped at can be skipped; the standby resumes at its next
retry. What the message held is NOT applied: the DR copy may now differ from
the primary until the rows it touched are repaired.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := logger()
			if err != nil {
				return err
			}
			if req.TargetURL == "" || req.NATSURL == "" || req.Group == "" || req.Seq == 0 {
				return fmt.Errorf("set --target-url, --nats-url, --group and --seq")
			}
			ctx, stop := signalContext()
			defer stop()
			if err := replicator.Skip(ctx, req); err != nil {
				return err
			}
			log.Warn().Str("component", "operator").Str("group", req.Group).Uint64("seq", req.Seq).Str("operator", req.Operator).
				Str("reason", req.Reason).Msg("stream message skipped on purpose and recorded in haven.skipped_messages; its changes are not applied on DR")
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.TargetURL, "target-url", "", "DR database URL")
	f.StringVar(&req.NATSURL, "nats-url", "", "NATS server URL(s)")
	f.StringVar(&req.Group, "group", "", "replication group")
	f.Uint64Var(&req.Seq, "seq", 0, "stream sequence of the message apply is stopped at")
	f.StringVar(&req.Reason, "reason", "", "why it is skipped (recorded)")
	f.StringVar(&req.Operator, "operator", currentUser(), "who skips it (recorded)")
	return cmd
}

func currentUser() string {
	if u, err := user.Current(); err == nil {
		return u.Username
	}
	return os.Getenv("USER")
}
