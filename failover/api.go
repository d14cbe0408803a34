package failover

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/hashicorp/raft"

	"github.com/haven-dr/haven/proto/havenpb"
)

// api serves the control API on one node: reads from its own copy of the
// state, changes through the leader (a follower forwards them).
type api struct{ c *Controller }

func connectRequest[T any](m *T) *connect.Request[T] { return connect.NewRequest(m) }

func (a *api) Status(ctx context.Context, _ *connect.Request[havenpb.StatusRequest]) (*connect.Response[havenpb.StatusResponse], error) {
	st := a.c.fsm.read()
	_, leader := a.c.raft.LeaderWithID()
	resp := &havenpb.StatusResponse{LeaderId: string(leader), NodeId: a.c.cfg.ID}
	if f := a.c.raft.GetConfiguration(); f.Error() == nil {
		for _, s := range f.Configuration().Servers {
			info := st.Nodes[string(s.ID)]
			resp.Nodes = append(resp.Nodes, &havenpb.Node{Id: string(s.ID), RaftAddress: string(s.Address),
				ApiUrl: info.APIURL, Voter: s.Suffrage == raft.Voter, RulesVersion: uint32(info.RulesVersion)})
		}
	}
	resp.RulesVersion = uint32(max(st.RulesVersion, 1))
	names := make([]string, 0, len(st.Groups))
	for name := range st.Groups {
		names = append(names, name)
	}
	sort.Strings(names)
	p := a.c.cfg.Policy
	for _, name := range names {
		g := st.Groups[name]
		gs := &havenpb.GroupStatus{Name: g.Name, PrimarySite: g.PrimarySite, DrSite: g.DRSite, Epoch: g.Epoch, Paused: g.Paused, State: g.State,
			LagSeconds: g.LagSeconds, StandbySeenUnixMs: g.StandbySeenMs, AgentSeenUnixMs: g.AgentSeenMs, LeaseExpiresUnixMs: g.LeaseExpiresMs,
			Alert: g.Alert, DrIncomplete: g.DRIncomplete, FailoverAfterMs: p.FailoverAfter.Milliseconds(), MaxRpoSeconds: p.MaxRPO.Seconds()}
		for site := range g.Deposed {
			gs.DeposedSites = append(gs.DeposedSites, site)
		}
		sort.Strings(gs.DeposedSites)
		if g.RejoinSite != "" {
			gs.Rejoin = g.RejoinSite + ": " + g.RejoinPhase
		}
		gs.Switchover = g.Switchover
		if d := g.Drill; d != nil {
			gs.Drill = fmt.Sprintf("%s %s: %s", d.ID, d.Kind, d.Phase)
		}
		gs.RtoObjectiveSeconds, gs.RpoObjectiveSeconds, gs.DrillAlert = g.RTOObjective, g.RPOObjective, g.DrillAlert
		nodes := make([]string, 0, len(g.Observations))
		for n := range g.Observations {
			nodes = append(nodes, n)
		}
		sort.Strings(nodes)
		for _, n := range nodes {
			o := g.Observations[n]
			gs.Observations = append(gs.Observations, &havenpb.Observation{NodeId: n, Up: o.Up, SinceUnixMs: o.SinceMs, AtUnixMs: o.AtMs, Error: o.Error})
		}
		resp.Groups = append(resp.Groups, gs)
	}
	for _, e := range st.Audit {
		resp.Audit = append(resp.Audit, &havenpb.AuditEntry{Index: e.Index, AtUnixMs: e.AtMs, Actor: e.Actor, Action: e.Action, Group: e.Group, Outcome: e.Outcome, Hash: e.Hash})
	}
	return connect.NewResponse(resp), nil
}

func (a *api) group(name string) (*Group, error) {
	g, ok := a.c.fsm.read().Groups[name]
	if !ok {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("no group %q: haven ctl status lists the groups (a group appears when its agent first checks in)", name))
	}
	return g, nil
}

func (a *api) Failover(ctx context.Context, req *connect.Request[havenpb.FailoverRequest]) (*connect.Response[havenpb.FailoverResponse], error) {
	leader, err := a.leader()
	if err != nil {
		return nil, err
	}
	if leader != nil {
		return leader.Failover(ctx, req)
	}
	r := req.Msg
	g, err := a.group(r.Group)
	if err != nil {
		return nil, err
	}
	if g.State != StateActive {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("group %q is %s: a failover to site %s is under way", g.Name, g.State, g.PrimarySite))
	}
	if g.Switchover != "" && !r.Force {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("group %q is switching over to site %s; --force fails over instead", g.Name, g.DRSite))
	}
	if g.DRSite == "" {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("group %q has no DR site: no standby has checked in", g.Name))
	}
	if _, stale := g.Deposed[g.DRSite]; stale {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("site %s of group %q is a deposed primary that has not rejoined: its data is stale, so it is not promoted, even with --force; "+
			"bring site %s back, or restore from a backup", g.DRSite, g.Name, g.PrimarySite))
	}
	if !r.Force {
		down := 0
		now := time.Now().UnixMilli()
		voters := a.c.voterIDs()
		for node, o := range g.Observations {
			if slices.Contains(voters, node) && !o.Up && o.fresh(now, a.c.cfg.Policy) {
				down++
			}
		}
		if down < len(voters)/2+1 {
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("the primary of group %q (site %s) is not seen down by a majority of the controller nodes (%d of %d): "+
				"refusing to fail over a healthy primary; use --force to do it anyway (it is fenced first), or a switchover", g.Name, g.PrimarySite, down, len(voters)))
		}
		if g.LagSeconds > a.c.cfg.Policy.MaxRPO.Seconds() {
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("DR of group %q lags %.1fs, more than max_rpo %s: --force accepts losing that", g.Name, g.LagSeconds, a.c.cfg.Policy.MaxRPO))
		}
		if g.DRIncomplete != "" {
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("DR of group %q cannot vouch for its copy (%s): promoting it could lose rows the primary has; "+
				"bring the primary back, or --force accepts the loss", g.Name, g.DRIncomplete))
		}
	}
	// Never two primaries: the old primary's agent fences itself when its
	// lease runs out, so DR is promoted only after that.
	wait := time.Until(time.UnixMilli(g.LeaseExpiresMs).Add(a.c.cfg.Policy.ClockMargin))
	if wait > 0 {
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	actor := r.Actor
	if actor == "" {
		actor = "operator"
	}
	reason := "manual failover"
	if r.Force {
		reason = "forced failover"
		if g.DRIncomplete != "" {
			reason += " of an incomplete DR copy (" + g.DRIncomplete + ")"
		}
	}
	if r.Reason != "" {
		reason += ": " + r.Reason
	}
	if _, err := a.c.propose(command{Kind: cmdFailover, AtMs: time.Now().UnixMilli(), Group: g.Name, Epoch: g.Epoch, Actor: actor, Reason: reason}); err != nil {
		return nil, connect.NewError(connect.CodeAborted, err)
	}
	return connect.NewResponse(&havenpb.FailoverResponse{Epoch: g.Epoch + 1, PrimarySite: g.DRSite}), nil
}

// leader returns the leader's client when this node is not it (nil when
// it is), or an error when there is none.
func (a *api) leader() (interface {
	Failover(context.Context, *connect.Request[havenpb.FailoverRequest]) (*connect.Response[havenpb.FailoverResponse], error)
	Pause(context.Context, *connect.Request[havenpb.PauseRequest]) (*connect.Response[havenpb.PauseResponse], error)
	Rejoin(context.Context, *connect.Request[havenpb.RejoinRequest]) (*connect.Response[havenpb.RejoinResponse], error)
	Switchover(context.Context, *connect.Request[havenpb.SwitchoverRequest]) (*connect.Response[havenpb.SwitchoverResponse], error)
	Resume(context.Context, *connect.Request[havenpb.ResumeRequest]) (*connect.Response[havenpb.ResumeResponse], error)
	CheckIn(context.Context, *connect.Request[havenpb.CheckInRequest]) (*connect.Response[havenpb.CheckInResponse], error)
	Observe(context.Context, *connect.Request[havenpb.ObserveRequest]) (*connect.Response[havenpb.ObserveResponse], error)
	Join(context.Context, *connect.Request[havenpb.JoinRequest]) (*connect.Response[havenpb.JoinResponse], error)
	RemoveNode(context.Context, *connect.Request[havenpb.RemoveNodeRequest]) (*connect.Response[havenpb.RemoveNodeResponse], error)
	ScheduleDrill(context.Context, *connect.Request[havenpb.ScheduleDrillRequest]) (*connect.Response[havenpb.ScheduleDrillResponse], error)
	UnscheduleDrill(context.Context, *connect.Request[havenpb.UnscheduleDrillRequest]) (*connect.Response[havenpb.UnscheduleDrillResponse], error)
	RunDrill(context.Context, *connect.Request[havenpb.RunDrillRequest]) (*connect.Response[havenpb.RunDrillResponse], error)
	SetObjectives(context.Context, *connect.Request[havenpb.SetObjectivesRequest]) (*connect.Response[havenpb.SetObjectivesResponse], error)
}, error) {
	if a.c.isLeader() {
		return nil, nil
	}
	cl, err := a.c.leaderClient()
	if err != nil {
		return nil, connect.NewError(connect.CodeUnavailable, err)
	}
	return cl, nil
}

func (a *api) pauseResume(ctx context.Context, kind, group, actor string) error {
	if _, err := a.group(group); err != nil {
		return err
	}
	if actor == "" {
		actor = "operator"
	}
	if _, err := a.c.propose(command{Kind: kind, AtMs: time.Now().UnixMilli(), Group: group, Actor: actor}); err != nil {
		return connect.NewError(connect.CodeAborted, err)
	}
	return nil
}

// checkInMs asks sites to check in faster while a group changes hands,
// and while a drill holds DR apply; DR's standby fastest while the primary
// drains for a switchover: writes are stopped until it learns that it is
// to be promoted.
func (a *api) checkInMs(group string, standby bool) int64 {
	g := a.c.fsm.read().Groups[group]
	if g != nil && standby && g.Switchover == phaseFence {
		return 20
	}
	if g != nil && (g.Switchover != "" || g.State == StatePromoting || g.AutoRejoin != "" || g.Drill != nil) {
		return 100
	}
	return 0
}

func (a *api) Switchover(ctx context.Context, req *connect.Request[havenpb.SwitchoverRequest]) (*connect.Response[havenpb.SwitchoverResponse], error) {
	leader, err := a.leader()
	if err != nil {
		return nil, err
	}
	if leader != nil {
		return leader.Switchover(ctx, req)
	}
	g, err := a.group(req.Msg.Group)
	if err != nil {
		return nil, err
	}
	if time.Since(time.UnixMilli(g.AgentSeenMs)) > a.c.cfg.Policy.StandbyTimeout {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("the primary's agent of group %q has not checked in recently: a switchover needs it to drain the primary", g.Name))
	}
	if time.Since(time.UnixMilli(g.StandbySeenMs)) > a.c.cfg.Policy.StandbyTimeout || g.LagSeconds > a.c.cfg.Policy.MaxRPO.Seconds() {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("DR site %s of group %q has not reported recently or lags %.1fs: a switchover would wait for it with writes stopped; fix the standby first",
			g.DRSite, g.Name, g.LagSeconds))
	}
	actor := req.Msg.Actor
	if actor == "" {
		actor = "operator"
	}
	if _, err := a.c.propose(command{Kind: cmdSwitchover, AtMs: time.Now().UnixMilli(), Group: g.Name, Actor: actor}); err != nil {
		return nil, connect.NewError(connect.CodeFailedPrecondition, err)
	}
	return connect.NewResponse(&havenpb.SwitchoverResponse{PrimarySite: g.DRSite}), nil
}

func (a *api) Rejoin(ctx context.Context, req *connect.Request[havenpb.RejoinRequest]) (*connect.Response[havenpb.RejoinResponse], error) {
	leader, err := a.leader()
	if err != nil {
		return nil, err
	}
	if leader != nil {
		return leader.Rejoin(ctx, req)
	}
	g, err := a.group(req.Msg.Group)
	if err != nil {
		return nil, err
	}
	actor := req.Msg.Actor
	if actor == "" {
		actor = "operator"
	}
	if _, err := a.c.propose(command{Kind: cmdRejoin, AtMs: time.Now().UnixMilli(), Group: g.Name, Actor: actor}); err != nil {
		return nil, connect.NewError(connect.CodeFailedPrecondition, err)
	}
	return connect.NewResponse(&havenpb.RejoinResponse{Site: g.DRSite}), nil
}

func (a *api) Pause(ctx context.Context, req *connect.Request[havenpb.PauseRequest]) (*connect.Response[havenpb.PauseResponse], error) {
	leader, err := a.leader()
	if err != nil {
		return nil, err
	}
	if leader != nil {
		return leader.Pause(ctx, req)
	}
	if err := a.pauseResume(ctx, cmdPause, req.Msg.Group, req.Msg.Actor); err != nil {
		return nil, err
	}
	return connect.NewResponse(&havenpb.PauseResponse{}), nil
}

func (a *api) Resume(ctx context.Context, req *connect.Request[havenpb.ResumeRequest]) (*connect.Response[havenpb.ResumeResponse], error) {
	leader, err := a.leader()
	if err != nil {
		return nil, err
	}
	if leader != nil {
		return leader.Resume(ctx, req)
	}
	if err := a.pauseResume(ctx, cmdResume, req.Msg.Group, req.Msg.Actor); err != nil {
		return nil, err
	}
	return connect.NewResponse(&havenpb.ResumeResponse{}), nil
}

func (a *api) CheckIn(ctx context.Context, req *connect.Request[havenpb.CheckInRequest]) (*connect.Response[havenpb.CheckInResponse], error) {
	leader, err := a.leader()
	if err != nil {
		return nil, err
	}
	if leader != nil {
		return leader.CheckIn(ctx, req)
	}
	r := req.Msg
	if r.Group == "" || r.Site == "" || r.Component == havenpb.Component_COMPONENT_UNSPECIFIED {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("a check-in needs a group, a site and a component"))
	}
	agent := r.Component == havenpb.Component_COMPONENT_AGENT
	res, err := a.c.propose(command{Kind: cmdCheckIn, AtMs: time.Now().UnixMilli(), Group: r.Group, Site: r.Site, Agent: agent,
		Epoch: r.Epoch, URL: r.DatabaseUrl, LagSeconds: r.LagSeconds, Promoted: r.PromotedEpoch, AppliedLSN: r.AppliedLsn,
		Reported: r.Reported, Reseeded: r.Reseeded, Report: r.Report, StandbyDB: r.StandbyDatabase, DrainedLSN: r.DrainedLsn,
		Unapplied: r.UnappliedMessages, DrillID: r.DrillId, HeldLSN: r.DrillHeldLsn, AtCut: r.DrillAtCut, DrillSteps: stepsOf(r.DrillSteps),
		DrillDone: r.DrillDone, DrillError: r.DrillError, Incomplete: r.Incomplete, GrantLease: agent, LeaseTTLMs: a.c.cfg.LeaseTTL.Milliseconds()})
	if err != nil {
		var ce *connect.Error
		if errors.As(err, &ce) {
			return nil, err
		}
		return nil, connect.NewError(connect.CodeFailedPrecondition, err)
	}
	out := res.(checkInResult)
	return connect.NewResponse(&havenpb.CheckInResponse{Epoch: out.Epoch, PrimarySite: out.PrimarySite, LeaseGranted: out.Lease,
		LeaseTtlMs: a.c.cfg.LeaseTTL.Milliseconds(), Fence: out.Fence, Promote: out.Promote, Apply: out.Apply, Reseed: out.Reseed,
		Report: out.Report, PromotedLsn: out.PromotedLSN, SwitchoverFence: out.SwitchoverFence, CheckInMs: a.checkInMs(r.Group, !agent),
		DrillHold: out.DrillHold, DrillCutLsn: out.DrillCutLSN, DrillRehearse: out.DrillRehearse}), nil
}

func (a *api) observe(ctx context.Context, r *havenpb.ObserveRequest) (*havenpb.ObserveResponse, error) {
	leader, err := a.leader()
	if err != nil {
		return nil, err
	}
	if leader != nil {
		_, err := leader.Observe(ctx, connect.NewRequest(r))
		return &havenpb.ObserveResponse{}, err
	}
	o := &Observation{Up: r.Up, AtMs: r.AtUnixMs, SinceMs: r.AtUnixMs, Error: r.Error}
	if _, err := a.c.propose(command{Kind: cmdObserve, AtMs: time.Now().UnixMilli(), Group: r.Group, Node: r.NodeId, Observation: o}); err != nil {
		return nil, connect.NewError(connect.CodeUnavailable, err)
	}
	return &havenpb.ObserveResponse{}, nil
}

func (a *api) Observe(ctx context.Context, req *connect.Request[havenpb.ObserveRequest]) (*connect.Response[havenpb.ObserveResponse], error) {
	resp, err := a.observe(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(resp), nil
}

func (a *api) Join(ctx context.Context, req *connect.Request[havenpb.JoinRequest]) (*connect.Response[havenpb.JoinResponse], error) {
	leader, err := a.leader()
	if err != nil {
		return nil, err
	}
	if leader != nil {
		return leader.Join(ctx, req)
	}
	r := req.Msg
	if r.NodeId == "" || r.RaftAddress == "" || r.ApiUrl == "" {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("a join needs the node's id, Raft address and API URL"))
	}
	a.c.membership.Lock()
	defer a.c.membership.Unlock()
	// A leader elected a moment ago may not have applied a raise its
	// predecessor committed.
	if err := a.c.raft.Barrier(5 * time.Second).Error(); err != nil {
		return nil, connect.NewError(connect.CodeUnavailable, fmt.Errorf("catch up with the quorum's log before a join: %w", err))
	}
	if v, quorum := max(int(r.RulesVersion), 1), a.c.fsm.read().RulesVersion; v < quorum {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("node %s runs version %d of the state's rules, and the quorum applies version %d: "+
			"it would not apply the quorum's commands alike; start it with a build of version %d or later", r.NodeId, v, quorum, quorum))
	}
	known := false
	if f := a.c.raft.GetConfiguration(); f.Error() == nil {
		for _, s := range f.Configuration().Servers {
			known = known || s.ID == raft.ServerID(r.NodeId)
		}
	}
	if !known {
		if err := a.c.raft.AddVoter(raft.ServerID(r.NodeId), raft.ServerAddress(r.RaftAddress), 0, 10*time.Second).Error(); err != nil {
			return nil, connect.NewError(connect.CodeUnavailable, fmt.Errorf("add node %s: %w", r.NodeId, err))
		}
		a.c.log.Info().Str("joined", r.NodeId).Str("raft", r.RaftAddress).Msg("node added to the quorum")
	}
	if _, err := a.c.propose(command{Kind: cmdNode, AtMs: time.Now().UnixMilli(), Node: r.NodeId, Info: &NodeInfo{APIURL: r.ApiUrl, RulesVersion: int(r.RulesVersion)}}); err != nil {
		return nil, connect.NewError(connect.CodeUnavailable, err)
	}
	return connect.NewResponse(&havenpb.JoinResponse{}), nil
}

// RemoveNode takes a controller node out of the quorum for good: its host
// died, or it moves to another. A node that still runs is refused: it is
// more likely a mistaken ID than a node meant to go.
func (a *api) RemoveNode(ctx context.Context, req *connect.Request[havenpb.RemoveNodeRequest]) (*connect.Response[havenpb.RemoveNodeResponse], error) {
	r := req.Msg
	if r.NodeId == "" {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("name the node to remove (haven ctl status lists them)"))
	}
	// Here first: a leader of an older build does not know this call.
	members, voters, err := a.membersBut(r.NodeId)
	if err != nil {
		return nil, err
	}
	leader, err := a.leader()
	if err != nil {
		return nil, err
	}
	if leader != nil {
		return leader.RemoveNode(ctx, req)
	}
	actor := r.Actor
	if actor == "" {
		actor = "operator"
	}
	st := a.c.fsm.read()
	if !slices.Contains(members, r.NodeId) {
		if _, recorded := st.Nodes[r.NodeId]; recorded {
			// Out of the configuration by an earlier call whose record did
			// not commit: record it now.
			return a.recordRemoval(r, actor, voters)
		}
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("node %q is not in the quorum (its members: %s)", r.NodeId, strings.Join(members, ", ")))
	}
	if r.NodeId == a.c.cfg.ID {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("node %s leads the quorum: stop it (another node takes the lead within seconds), then remove it", r.NodeId))
	}
	if err := a.stillRuns(ctx, st, r.NodeId); err != nil {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("%w: removing it would take a working voter out of the quorum; if it is the node you mean, stop it first", err))
	}
	if err := a.c.raft.RemoveServer(raft.ServerID(r.NodeId), 0, 10*time.Second).Error(); err != nil {
		return nil, connect.NewError(connect.CodeUnavailable, fmt.Errorf("remove node %s: %w", r.NodeId, err))
	}
	a.c.log.Info().Str("removed", r.NodeId).Str("actor", actor).Msg("node removed from the quorum's configuration")
	return a.recordRemoval(r, actor, voters)
}

// membersBut reads the quorum's members, and its voters other than node,
// and refuses a removal the voters that stay could not all apply.
func (a *api) membersBut(node string) (members, voters []string, err error) {
	f := a.c.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, nil, connect.NewError(connect.CodeUnavailable, fmt.Errorf("read the quorum's members: %w", err))
	}
	for _, s := range f.Configuration().Servers {
		members = append(members, string(s.ID))
		if s.Suffrage == raft.Voter && string(s.ID) != node {
			voters = append(voters, string(s.ID))
		}
	}
	// The removed node leaves the configuration before the command that
	// drops its record: only the others apply it.
	if v := quorumRulesVersion(a.c.fsm.read().Nodes, voters); v < 3 {
		return nil, nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("the controller nodes that would stay run version %d of the state's rules, and removing a node needs version 3: "+
			"upgrade each of them to this build first (haven ctl status shows each node's version)", v))
	}
	return members, voters, nil
}

// stillRuns says why node looks alive: its probes reach the leader, or
// its API answers.
func (a *api) stillRuns(ctx context.Context, st *State, node string) error {
	now := time.Now().UnixMilli()
	for _, g := range st.Groups {
		if o, ok := g.Observations[node]; ok && o.fresh(now, a.c.cfg.Policy) {
			return fmt.Errorf("node %s still runs (its probes of group %s reach the leader)", node, g.Name)
		}
	}
	info, ok := st.Nodes[node]
	if !ok || info.APIURL == "" {
		return nil
	}
	probeCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := a.c.client(info.APIURL).Status(probeCtx, connectRequest(&havenpb.StatusRequest{})); err == nil {
		return fmt.Errorf("node %s still runs (it answers at %s)", node, info.APIURL)
	}
	return nil
}

// recordRemoval drops a node that left the configuration from the state,
// with an audit entry.
func (a *api) recordRemoval(r *havenpb.RemoveNodeRequest, actor string, voters []string) (*connect.Response[havenpb.RemoveNodeResponse], error) {
	if _, err := a.c.propose(command{Kind: cmdRemoveNode, AtMs: time.Now().UnixMilli(), Node: r.NodeId, Actor: actor, Reason: r.Reason}); err != nil {
		return nil, connect.NewError(connect.CodeUnavailable, fmt.Errorf("node %s is out of the quorum's configuration, but dropping its record and probes from the state "+
			"(and the audit entry) did not commit: %w; run remove-node again", r.NodeId, err))
	}
	return connect.NewResponse(&havenpb.RemoveNodeResponse{Voters: voters}), nil
}
