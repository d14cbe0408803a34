package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/havenpb/havenpbconnect"
)

func newDrillCmd(c *ctl) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "drill",
		Short: "Rehearse DR: run, schedule and read drills (verify: compare DR with the primary at one LSN)",
	}
	var group, kind, cronSpec string
	var window, disruptive, noWait bool
	schedule := &cobra.Command{
		Use:   "schedule",
		Short: "Run a kind of drill on a group at every slot of a cron spec (UTC), once per slot whichever controller leads",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := call(cmd.Context(), c, func(ctx context.Context, cl havenpbconnect.ControlClient) (*havenpb.ScheduleDrillResponse, error) {
				return msg(cl.ScheduleDrill(ctx, connect.NewRequest(&havenpb.ScheduleDrillRequest{Group: group, Kind: kind, Cron: cronSpec,
					MaintenanceWindow: window, Actor: c.actor})))
			})
			if err != nil {
				return err
			}
			return c.print(cmd.OutOrStdout(), resp, func() {
				s := resp.Schedule
				fmt.Fprintf(cmd.OutOrStdout(), "schedule %s: %s drill of group %s at %q; next slot %s\n", s.Id, s.Kind, s.Group, s.Cron, when(s.NextSlotUnixMs))
			})
		},
	}
	schedule.Flags().StringVar(&cronSpec, "cron", "", `robfig/cron spec: "0 3 * * *" (min hour dom month dow), six fields with seconds first, or @daily, @every 6h`)
	schedule.Flags().BoolVar(&window, "maintenance-window", false, "the slots are maintenance windows (needed for switchover drills, which pause writes)")
	_ = schedule.MarkFlagRequired("cron")

	unschedule := &cobra.Command{
		Use:   "unschedule ID",
		Short: "Remove a drill schedule (haven ctl drill list shows the ids)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			resp, err := call(cmd.Context(), c, func(ctx context.Context, cl havenpbconnect.ControlClient) (*havenpb.UnscheduleDrillResponse, error) {
				return msg(cl.UnscheduleDrill(ctx, connect.NewRequest(&havenpb.UnscheduleDrillRequest{Id: args[0], Actor: c.actor})))
			})
			if err != nil {
				return err
			}
			return c.print(cmd.OutOrStdout(), resp, func() { fmt.Fprintf(cmd.OutOrStdout(), "schedule %s removed\n", args[0]) })
		},
	}

	run := &cobra.Command{
		Use:   "run",
		Short: "Run a drill now and print its report when it ends (--no-wait: print its id and return)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := call(cmd.Context(), c, func(ctx context.Context, cl havenpbconnect.ControlClient) (*havenpb.RunDrillResponse, error) {
				return msg(cl.RunDrill(ctx, connect.NewRequest(&havenpb.RunDrillRequest{Group: group, Kind: kind, Disruptive: disruptive, Actor: c.actor})))
			})
			if err != nil {
				return err
			}
			if noWait {
				return c.print(cmd.OutOrStdout(), resp, func() {
					fmt.Fprintf(cmd.OutOrStdout(), "drill %s started; haven ctl drill show %s has its report\n", resp.Id, resp.Id)
				})
			}
			report, err := waitForDrill(cmd.Context(), c, resp.Id)
			if err != nil {
				return err
			}
			if err := c.print(cmd.OutOrStdout(), report, func() { printReport(cmd.OutOrStdout(), report) }); err != nil {
				return err
			}
			if report.Outcome != "passed" {
				return fmt.Errorf("drill %s %s", report.Id, report.Outcome)
			}
			return nil
		},
	}
	run.Flags().BoolVar(&disruptive, "disruptive", false, "allow a drill that pauses writes on the primary (switchover)")
	run.Flags().BoolVar(&noWait, "no-wait", false, "return once the drill has started")
	for _, sub := range []*cobra.Command{schedule, run} {
		sub.Flags().StringVar(&group, "group", "", "the group")
		sub.Flags().StringVar(&kind, "kind", "verify", "verify, promote or switchover")
		_ = sub.MarkFlagRequired("group")
	}

	list := &cobra.Command{
		Use:   "list",
		Short: "List drill schedules and the reports kept, newest first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			g, _ := cmd.Flags().GetString("group")
			resp, err := call(cmd.Context(), c, func(ctx context.Context, cl havenpbconnect.ControlClient) (*havenpb.ListDrillsResponse, error) {
				return msg(cl.ListDrills(ctx, connect.NewRequest(&havenpb.ListDrillsRequest{Group: g})))
			})
			if err != nil {
				return err
			}
			return c.print(cmd.OutOrStdout(), resp, func() { printDrills(cmd.OutOrStdout(), resp) })
		},
	}
	list.Flags().String("group", "", "only this group")

	show := &cobra.Command{
		Use:   "show ID",
		Short: "Print a drill's report",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			resp, err := call(cmd.Context(), c, func(ctx context.Context, cl havenpbconnect.ControlClient) (*havenpb.ShowDrillResponse, error) {
				return msg(cl.ShowDrill(ctx, connect.NewRequest(&havenpb.ShowDrillRequest{Id: args[0]})))
			})
			if err != nil {
				return err
			}
			return c.print(cmd.OutOrStdout(), resp.Report, func() { printReport(cmd.OutOrStdout(), resp.Report) })
		},
	}

	var rto, rpo time.Duration
	objectives := groupCommand(c, "objectives", "Set a group's RTO and RPO objectives, which drills are judged against (0: none)",
		func(ctx context.Context, cl havenpbconnect.ControlClient, g string) (*havenpb.SetObjectivesResponse, error) {
			return msg(cl.SetObjectives(ctx, connect.NewRequest(&havenpb.SetObjectivesRequest{Group: g, RtoObjectiveSeconds: rto.Seconds(),
				RpoObjectiveSeconds: rpo.Seconds(), Actor: c.actor})))
		}, func(g string, _ *havenpb.SetObjectivesResponse) string {
			return fmt.Sprintf("group %s: RTO objective %s, RPO objective %s", g, rto, rpo)
		})
	objectives.Flags().String("group", "", "the group")
	_ = objectives.MarkFlagRequired("group")
	objectives.Flags().DurationVar(&rto, "rto", 0, "recovery time objective, e.g. 30s")
	objectives.Flags().DurationVar(&rpo, "rpo", 0, "recovery point objective, e.g. 5s")

	cmd.AddCommand(run, schedule, unschedule, list, show, objectives)
	return cmd
}

// waitForDrill polls a drill's report until it ends (no --timeout: a
// drill's waits are bounded by the controllers).
func waitForDrill(ctx context.Context, c *ctl, id string) (*havenpb.DrillReport, error) {
	for {
		resp, err := call(ctx, c, func(ctx context.Context, cl havenpbconnect.ControlClient) (*havenpb.ShowDrillResponse, error) {
			return msg(cl.ShowDrill(ctx, connect.NewRequest(&havenpb.ShowDrillRequest{Id: id})))
		})
		// A node that has not applied the start yet does not know it.
		if err != nil && !strings.Contains(err.Error(), "not_found") {
			return nil, err
		}
		if err == nil && resp.Report.Outcome != "running" {
			return resp.Report, nil
		}
		select {
		case <-ctx.Done():
			return nil, errors.New("stopped waiting; haven ctl drill show " + id + " has the report")
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func when(ms int64) string {
	if ms == 0 {
		return "-"
	}
	return time.UnixMilli(ms).UTC().Format(time.DateTime) + " UTC"
}

func printDrills(w io.Writer, r *havenpb.ListDrillsResponse) {
	fmt.Fprintln(w, "schedules:")
	if len(r.Schedules) == 0 {
		fmt.Fprintln(w, "  none")
	}
	for _, s := range r.Schedules {
		window := ""
		if s.MaintenanceWindow {
			window = ", maintenance window"
		}
		fmt.Fprintf(w, "  %-5s %-10s %-10s %-16q last slot %s, next %s%s\n", s.Id, s.Group, s.Kind, s.Cron, when(s.LastSlotUnixMs), when(s.NextSlotUnixMs), window)
	}
	fmt.Fprintln(w, "reports:")
	if len(r.Reports) == 0 {
		fmt.Fprintln(w, "  none")
	}
	for _, d := range r.Reports {
		fmt.Fprintf(w, "  %-5s %-10s %-10s %-11s %s  %s\n", d.Id, d.Group, d.Kind, strings.ToUpper(d.Outcome), when(d.StartedUnixMs), d.Reason)
	}
}

func printReport(w io.Writer, d *havenpb.DrillReport) {
	fmt.Fprintf(w, "drill %s: %s of group %s, %s\n", d.Id, d.Kind, d.Group, strings.ToUpper(d.Outcome))
	if d.Reason != "" {
		fmt.Fprintf(w, "  %s\n", d.Reason)
	}
	fmt.Fprintf(w, "  trigger: %s\n  started %s", d.Trigger, when(d.StartedUnixMs))
	if d.EndedUnixMs > 0 {
		fmt.Fprintf(w, ", took %s", time.Duration(d.EndedUnixMs-d.StartedUnixMs)*time.Millisecond)
	}
	fmt.Fprintln(w)
	if r := d.Rpo; r != nil {
		fmt.Fprintf(w, "  RPO at the start: %.3fs behind, %d bytes of WAL, %d unapplied stream messages", r.SecondsBehind, r.BytesBehind, r.UnappliedMessages)
		if d.RpoObjectiveSeconds > 0 {
			fmt.Fprintf(w, " (objective %gs)", d.RpoObjectiveSeconds)
		}
		fmt.Fprintln(w)
		if r.DrIncomplete != "" {
			fmt.Fprintf(w, "  DR's copy was incomplete: %s\n", r.DrIncomplete)
		}
	}
	if d.RtoSeconds > 0 {
		how := "measured"
		if d.RtoPredicted {
			how = "predicted"
		}
		fmt.Fprintf(w, "  RTO %s: %.2fs", how, d.RtoSeconds)
		if d.RtoObjectiveSeconds > 0 {
			fmt.Fprintf(w, " (objective %gs)", d.RtoObjectiveSeconds)
		}
		fmt.Fprintln(w)
	}
	if d.RtoObjectiveSeconds > 0 || d.RpoObjectiveSeconds > 0 {
		fmt.Fprintf(w, "  objectives met: %v\n", d.ObjectivesMet)
	}
	if d.ApplyHeldSeconds > 0 {
		fmt.Fprintf(w, "  DR apply held %.3fs\n", d.ApplyHeldSeconds)
	}
	if d.Lsn != "" {
		fmt.Fprintf(w, "  compared at LSN %s\n", d.Lsn)
	}
	for _, s := range d.Steps {
		fmt.Fprintf(w, "  step %-36s %8.3fs  %s\n", s.Name, s.Seconds, s.Detail)
	}
	for _, t := range d.Tables {
		state := "equal"
		switch {
		case t.NotCompared:
			state = "skipped"
		case !t.Match:
			state = "DIFFERS"
		}
		fmt.Fprintf(w, "  table %-30s %-8s primary %d rows, DR %d rows", t.Table, state, t.PrimaryRows, t.DrRows)
		if t.Detail != "" {
			fmt.Fprintf(w, "; %s", t.Detail)
		}
		fmt.Fprintln(w)
		for _, l := range []struct {
			name string
			keys []string
		}{{"missing on DR", t.MissingOnDr}, {"only on DR", t.ExtraOnDr}, {"different", t.Differing}} {
			if len(l.keys) > 0 {
				fmt.Fprintf(w, "    %s: %s\n", l.name, strings.Join(l.keys, "; "))
			}
		}
		if t.KeysTruncated {
			fmt.Fprintln(w, "    (more rows differ than listed)")
		}
	}
}
