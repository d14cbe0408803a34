package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/havenpb/havenpbconnect"
)

// ctl holds what every haven ctl subcommand shares.
type ctl struct {
	apis    []string
	json    bool
	actor   string
	timeout time.Duration
}

// call runs fn against each controller API in turn until one answers (a
// node that is down or has no route to the leader gives way to the next).
// While a node says the quorum has no leader (an election, after a
// failover or a node's restart), it asks again until --timeout.
func call[T any](ctx context.Context, c *ctl, fn func(context.Context, havenpbconnect.ControlClient) (*T, error)) (*T, error) {
	if len(c.apis) == 0 {
		return nil, errors.New("no controller: set --api URL (or HAVEN_API), e.g. http://ctl1:7400")
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	var errs []string
	for round := 0; ; round++ {
		errs = errs[:0]
		electing := false
		for _, url := range c.apis {
			cl := havenpbconnect.NewControlClient(http.DefaultClient, strings.TrimRight(url, "/"))
			resp, err := fn(ctx, cl)
			if err == nil {
				return resp, nil
			}
			code := connect.CodeOf(err)
			if code != connect.CodeUnavailable && code != connect.CodeUnknown && code != connect.CodeDeadlineExceeded {
				// The quorum answered: another node would say the same.
				return nil, errors.New(connect.CodeOf(err).String() + ": " + strings.TrimPrefix(err.Error(), code.String()+": "))
			}
			electing = electing || (code == connect.CodeUnavailable && strings.Contains(err.Error(), "no leader"))
			errs = append(errs, fmt.Sprintf("%s: %v", url, err))
		}
		if !electing {
			break
		}
		if round == 0 {
			fmt.Fprintln(os.Stderr, "the quorum has no leader yet; asking again until --timeout")
		}
		select {
		case <-ctx.Done():
		case <-time.After(250 * time.Millisecond):
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("no controller answered:\n  %s", strings.Join(errs, "\n  "))
}

func (c *ctl) print(w io.Writer, m proto.Message, text func()) error {
	if c.json {
		out, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(m)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintln(w, string(out))
		return err
	}
	text()
	return nil
}

func newCtlCmd() *cobra.Command {
	c := &ctl{actor: os.Getenv("USER")}
	cmd := &cobra.Command{
		Use:   "ctl",
		Short: "Operate the controller quorum: status, failover, switchover, rejoin, pause, resume, drills, remove-node",
	}
	pf := cmd.PersistentFlags()
	pf.StringSliceVar(&c.apis, "api", nil, "control API URL(s) of controller nodes, comma-separated; each is tried in turn")
	pf.BoolVar(&c.json, "json", false, "print the answer as JSON")
	pf.StringVar(&c.actor, "actor", c.actor, "who is acting, for the audit trail (default: $USER)")
	pf.DurationVar(&c.timeout, "timeout", 30*time.Second, "how long to wait for an answer")

	status := &cobra.Command{
		Use:   "status",
		Short: "Show the groups, their primary site, epoch, lag and health as each controller node sees it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := call(cmd.Context(), c, func(ctx context.Context, cl havenpbconnect.ControlClient) (*havenpb.StatusResponse, error) {
				r, err := cl.Status(ctx, connect.NewRequest(&havenpb.StatusRequest{}))
				if err != nil {
					return nil, err
				}
				return r.Msg, nil
			})
			if err != nil {
				return err
			}
			return c.print(cmd.OutOrStdout(), resp, func() { printStatus(cmd.OutOrStdout(), resp) })
		},
	}

	var force bool
	var reason string
	failoverCmd := groupCommand(c, "failover", "Promote a group's DR site (refused for a healthy primary or a lagging DR unless --force)",
		func(ctx context.Context, cl havenpbconnect.ControlClient, g string) (*havenpb.FailoverResponse, error) {
			return msg(cl.Failover(ctx, connect.NewRequest(&havenpb.FailoverRequest{Group: g, Force: force, Actor: c.actor, Reason: reason})))
		}, func(g string, r *havenpb.FailoverResponse) string {
			return fmt.Sprintf("group %s: site %s ordered to promote at epoch %d (haven ctl status shows when it is done)", g, r.PrimarySite, r.Epoch)
		})
	failoverCmd.Flags().BoolVar(&force, "force", false, "fail over even if the primary answers or DR lags more than max_rpo (the old primary is fenced first; what DR lacks is reported)")
	failoverCmd.Flags().StringVar(&reason, "reason", "", "why, for the audit trail")
	pause := groupCommand(c, "pause", "Stop automatic failover of a group (alerts still fire)",
		func(ctx context.Context, cl havenpbconnect.ControlClient, g string) (*havenpb.PauseResponse, error) {
			return msg(cl.Pause(ctx, connect.NewRequest(&havenpb.PauseRequest{Group: g, Actor: c.actor})))
		}, func(g string, _ *havenpb.PauseResponse) string { return "group " + g + ": paused" })
	resume := groupCommand(c, "resume", "Let the quorum fail a group over by itself again",
		func(ctx context.Context, cl havenpbconnect.ControlClient, g string) (*havenpb.ResumeResponse, error) {
			return msg(cl.Resume(ctx, connect.NewRequest(&havenpb.ResumeRequest{Group: g, Actor: c.actor})))
		}, func(g string, _ *havenpb.ResumeResponse) string { return "group " + g + ": resumed" })
	rejoin := groupCommand(c, "rejoin", "Make a group's deposed primary its new standby: report what it committed that the new primary lacks, then reload it from the new primary",
		func(ctx context.Context, cl havenpbconnect.ControlClient, g string) (*havenpb.RejoinResponse, error) {
			return msg(cl.Rejoin(ctx, connect.NewRequest(&havenpb.RejoinRequest{Group: g, Actor: c.actor})))
		}, func(g string, r *havenpb.RejoinResponse) string {
			return fmt.Sprintf("group %s: site %s rejoins: its agent writes the lost-transaction report (--report-dir) and drops its slot, "+
				"then its standby reloads the database from the new primary (haven ctl status shows the progress)", g, r.Site)
		})
	switchover := groupCommand(c, "switchover", "Hand the primary role to the DR site without losing a write; the old primary then follows as the standby",
		func(ctx context.Context, cl havenpbconnect.ControlClient, g string) (*havenpb.SwitchoverResponse, error) {
			return msg(cl.Switchover(ctx, connect.NewRequest(&havenpb.SwitchoverRequest{Group: g, Actor: c.actor})))
		}, func(g string, r *havenpb.SwitchoverResponse) string {
			return fmt.Sprintf("group %s: switching over to site %s (haven ctl status shows the progress)", g, r.PrimarySite)
		})
	for _, sub := range []*cobra.Command{failoverCmd, pause, resume, rejoin, switchover} {
		sub.Flags().String("group", "", "the group")
		_ = sub.MarkFlagRequired("group")
	}
	var removeReason string
	removeNode := &cobra.Command{
		Use:   "remove-node NODE_ID",
		Short: "Take a stopped controller node out of the quorum for good (its host is lost, or it moves), so that the majority counts without it",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			resp, err := call(cmd.Context(), c, func(ctx context.Context, cl havenpbconnect.ControlClient) (*havenpb.RemoveNodeResponse, error) {
				return msg(cl.RemoveNode(ctx, connect.NewRequest(&havenpb.RemoveNodeRequest{NodeId: args[0], Actor: c.actor, Reason: removeReason})))
			})
			if err != nil {
				return err
			}
			return c.print(cmd.OutOrStdout(), resp, func() {
				fmt.Fprintf(cmd.OutOrStdout(), "node %s removed: the quorum's voters are %s (a majority is %d of them)\n",
					args[0], strings.Join(resp.Voters, ", "), len(resp.Voters)/2+1)
			})
		},
	}
	removeNode.Flags().StringVar(&removeReason, "reason", "", "why, for the audit trail")
	cmd.AddCommand(status, failoverCmd, switchover, pause, resume, rejoin, removeNode, newDrillCmd(c))
	return cmd
}

// groupCommand makes a subcommand that sends one request about --group
// and prints the answer.
func groupCommand[T any, PT interface {
	*T
	proto.Message
}](c *ctl, use, short string, send func(context.Context, havenpbconnect.ControlClient, string) (*T, error), text func(string, *T) string) *cobra.Command {
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			group, _ := cmd.Flags().GetString("group")
			resp, err := call(cmd.Context(), c, func(ctx context.Context, cl havenpbconnect.ControlClient) (*T, error) { return send(ctx, cl, group) })
			if err != nil {
				return err
			}
			return c.print(cmd.OutOrStdout(), PT(resp), func() { fmt.Fprintln(cmd.OutOrStdout(), text(group, resp)) })
		},
	}
}

// msg unwraps a Connect response.
func msg[T any](r *connect.Response[T], err error) (*T, error) {
	if err != nil {
		return nil, err
	}
	return r.Msg, nil
}

func printStatus(w io.Writer, s *havenpb.StatusResponse) {
	leader := s.LeaderId
	if leader == "" {
		leader = "NONE (no majority)"
	}
	fmt.Fprintf(w, "leader: %s (answered by %s)\n", leader, s.NodeId)
	if s.RulesVersion > 0 {
		fmt.Fprintf(w, "rules: version %d\n", s.RulesVersion)
	} else {
		fmt.Fprintf(w, "rules: unreported (the node that answered predates rules versions)\n")
	}
	for _, n := range s.Nodes {
		rules := "rules unreported"
		if n.RulesVersion > 0 {
			rules = fmt.Sprintf("rules %d", n.RulesVersion)
		}
		fmt.Fprintf(w, "  node %s  raft %s  api %s  voter %v  %s\n", n.Id, n.RaftAddress, n.ApiUrl, n.Voter, rules)
	}
	now := time.Now()
	ago := func(ms int64) string {
		if ms == 0 {
			return "never"
		}
		return now.Sub(time.UnixMilli(ms)).Round(10*time.Millisecond).String() + " ago"
	}
	for _, g := range s.Groups {
		fmt.Fprintf(w, "group %s: primary %s, DR %s, epoch %d, %s", g.Name, g.PrimarySite, g.DrSite, g.Epoch, g.State)
		if g.Paused {
			fmt.Fprint(w, ", automatic failover PAUSED")
		}
		fmt.Fprintf(w, "\n  DR lag %.2fs (reported %s), agent seen %s, lease %s\n", g.LagSeconds, ago(g.StandbySeenUnixMs), ago(g.AgentSeenUnixMs),
			leaseText(now, g.LeaseExpiresUnixMs))
		if g.DrIncomplete != "" {
			fmt.Fprintf(w, "  DR INCOMPLETE (no automatic failover; a forced one could lose rows): %s\n", g.DrIncomplete)
		}
		for _, o := range g.Observations {
			state := "up"
			if !o.Up {
				state = "DOWN (" + o.Error + ")"
			}
			fmt.Fprintf(w, "  %s sees the primary %s since %s, probed %s\n", o.NodeId, state, ago(o.SinceUnixMs), ago(o.AtUnixMs))
		}
		if g.Alert != "" {
			fmt.Fprintf(w, "  ALERT: %s\n", g.Alert)
		}
		if g.RtoObjectiveSeconds > 0 || g.RpoObjectiveSeconds > 0 {
			fmt.Fprintf(w, "  objectives: RTO %gs, RPO %gs\n", g.RtoObjectiveSeconds, g.RpoObjectiveSeconds)
		}
		if g.Drill != "" {
			fmt.Fprintf(w, "  drill under way: %s\n", g.Drill)
		}
		if g.DrillAlert != "" {
			fmt.Fprintf(w, "  DRILL ALERT: %s\n", g.DrillAlert)
		}
	}
	if len(s.Audit) > 0 {
		fmt.Fprintln(w, "recent actions:")
		from := max(0, len(s.Audit)-10)
		for _, e := range s.Audit[from:] {
			fmt.Fprintf(w, "  %s  %-8s %-10s %-12s %s\n", time.UnixMilli(e.AtUnixMs).UTC().Format(time.DateTime), e.Group, e.Action, e.Actor, e.Outcome)
		}
	}
}

func leaseText(now time.Time, expiresMs int64) string {
	if expiresMs == 0 {
		return "none"
	}
	left := time.UnixMilli(expiresMs).Sub(now)
	if left < 0 {
		return "EXPIRED " + (-left).Round(10*time.Millisecond).String() + " ago"
	}
	return "valid for " + left.Round(10*time.Millisecond).String()
}
