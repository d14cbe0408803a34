package failover

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"time"

	"connectrpc.com/connect"

	"github.com/haven-dr/haven/proto/havenpb"
)

// checkDrillKind refuses a kind of drill that cannot run as asked.
func checkDrillKind(kind string, disruptiveOK bool) error {
	switch kind {
	case DrillVerify:
		return nil
	case DrillPromote:
		return nil
	case DrillSwitchover:
		if !disruptiveOK {
			return errors.New("a switchover drill stops writes on the primary for a moment, twice: run it with --disruptive, or schedule it with --maintenance-window")
		}
		return nil
	}
	return fmt.Errorf("no drill kind %q: verify, promote or switchover", kind)
}

func actorOr(actor string) string {
	if actor == "" {
		return "operator"
	}
	return actor
}

func (a *api) ScheduleDrill(ctx context.Context, req *connect.Request[havenpb.ScheduleDrillRequest]) (*connect.Response[havenpb.ScheduleDrillResponse], error) {
	leader, err := a.leader()
	if err != nil {
		return nil, err
	}
	if leader != nil {
		return leader.ScheduleDrill(ctx, req)
	}
	r := req.Msg
	if _, err := a.group(r.Group); err != nil {
		return nil, err
	}
	if err := checkDrillKind(r.Kind, r.MaintenanceWindow); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	if _, err := parseCron(r.Cron); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	res, err := a.c.propose(command{Kind: cmdSchedule, AtMs: time.Now().UnixMilli(), Group: r.Group, Actor: actorOr(r.Actor),
		Drill: &drillCommand{Schedule: &Schedule{Kind: r.Kind, Cron: r.Cron, MaintenanceWindow: r.MaintenanceWindow}}})
	if err != nil {
		return nil, connect.NewError(connect.CodeFailedPrecondition, err)
	}
	sc := res.(Schedule)
	return connect.NewResponse(&havenpb.ScheduleDrillResponse{Schedule: scheduleProto(&sc, time.Now())}), nil
}

func (a *api) UnscheduleDrill(ctx context.Context, req *connect.Request[havenpb.UnscheduleDrillRequest]) (*connect.Response[havenpb.UnscheduleDrillResponse], error) {
	leader, err := a.leader()
	if err != nil {
		return nil, err
	}
	if leader != nil {
		return leader.UnscheduleDrill(ctx, req)
	}
	if _, err := a.c.propose(command{Kind: cmdUnschedule, AtMs: time.Now().UnixMilli(), Actor: actorOr(req.Msg.Actor), Drill: &drillCommand{ID: req.Msg.Id}}); err != nil {
		return nil, connect.NewError(connect.CodeNotFound, err)
	}
	return connect.NewResponse(&havenpb.UnscheduleDrillResponse{}), nil
}

func (a *api) RunDrill(ctx context.Context, req *connect.Request[havenpb.RunDrillRequest]) (*connect.Response[havenpb.RunDrillResponse], error) {
	leader, err := a.leader()
	if err != nil {
		return nil, err
	}
	if leader != nil {
		return leader.RunDrill(ctx, req)
	}
	r := req.Msg
	g, err := a.group(r.Group)
	if err != nil {
		return nil, err
	}
	if err := checkDrillKind(r.Kind, r.Disruptive); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	// Asked for now: refused, not recorded as skipped, when it cannot run.
	if why := g.busy(); why != "" {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("group %q cannot start a drill now: %s", g.Name, why))
	}
	actor := actorOr(r.Actor)
	rep, err := a.c.startDrill(ctx, r.Group, r.Kind, "run by "+actor, actor, nil, 0, 0, "")
	if err != nil {
		return nil, connect.NewError(connect.CodeAborted, err)
	}
	if rep.Outcome == OutcomeSkipped {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("drill %s was not started: %s", rep.ID, rep.Reason))
	}
	return connect.NewResponse(&havenpb.RunDrillResponse{Id: rep.ID}), nil
}

func (a *api) SetObjectives(ctx context.Context, req *connect.Request[havenpb.SetObjectivesRequest]) (*connect.Response[havenpb.SetObjectivesResponse], error) {
	leader, err := a.leader()
	if err != nil {
		return nil, err
	}
	if leader != nil {
		return leader.SetObjectives(ctx, req)
	}
	r := req.Msg
	if _, err := a.group(r.Group); err != nil {
		return nil, err
	}
	if r.RtoObjectiveSeconds < 0 || r.RpoObjectiveSeconds < 0 {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("objectives are durations of zero (none) or more"))
	}
	if _, err := a.c.propose(command{Kind: cmdObjectives, AtMs: time.Now().UnixMilli(), Group: r.Group, Actor: actorOr(r.Actor),
		Drill: &drillCommand{RTO: r.RtoObjectiveSeconds, RPOObj: r.RpoObjectiveSeconds}}); err != nil {
		return nil, connect.NewError(connect.CodeAborted, err)
	}
	return connect.NewResponse(&havenpb.SetObjectivesResponse{}), nil
}

func (a *api) ListDrills(_ context.Context, req *connect.Request[havenpb.ListDrillsRequest]) (*connect.Response[havenpb.ListDrillsResponse], error) {
	st := a.c.fsm.read()
	resp := &havenpb.ListDrillsResponse{}
	now := time.Now()
	for _, sc := range st.Schedules {
		if req.Msg.Group == "" || sc.Group == req.Msg.Group {
			resp.Schedules = append(resp.Schedules, scheduleProto(sc, now))
		}
	}
	sort.Slice(resp.Schedules, func(i, j int) bool { return resp.Schedules[i].CreatedUnixMs < resp.Schedules[j].CreatedUnixMs })
	for _, r := range slices.Backward(st.Reports) {
		if req.Msg.Group == "" || r.Group == req.Msg.Group {
			resp.Reports = append(resp.Reports, reportProto(r))
		}
	}
	return connect.NewResponse(resp), nil
}

func (a *api) ShowDrill(_ context.Context, req *connect.Request[havenpb.ShowDrillRequest]) (*connect.Response[havenpb.ShowDrillResponse], error) {
	r := a.c.fsm.read().report(req.Msg.Id)
	if r == nil {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("no drill %q: haven ctl drill list shows the reports kept", req.Msg.Id))
	}
	return connect.NewResponse(&havenpb.ShowDrillResponse{Report: reportProto(r)}), nil
}

func stepsOf(steps []*havenpb.DrillStep) []Step {
	var out []Step
	for _, s := range steps {
		out = append(out, Step{Name: s.Name, Seconds: s.Seconds, Detail: s.Detail})
	}
	return out
}

func scheduleProto(sc *Schedule, now time.Time) *havenpb.DrillSchedule {
	p := &havenpb.DrillSchedule{Id: sc.ID, Group: sc.Group, Kind: sc.Kind, Cron: sc.Cron, MaintenanceWindow: sc.MaintenanceWindow,
		CreatedUnixMs: sc.CreatedMs, LastSlotUnixMs: sc.LastSlotMs}
	if spec, err := parseCron(sc.Cron); err == nil {
		p.NextSlotUnixMs = spec.Next(now).UnixMilli()
	}
	return p
}

func reportProto(r *Report) *havenpb.DrillReport {
	p := &havenpb.DrillReport{Id: r.ID, Group: r.Group, Kind: r.Kind, Trigger: r.Trigger, StartedUnixMs: r.StartedMs, EndedUnixMs: r.EndedMs,
		Outcome: r.Outcome, Reason: r.Reason, RtoSeconds: r.RTOSeconds, RtoPredicted: r.RTOPredicted, ApplyHeldSeconds: r.HeldSeconds,
		Lsn: r.LSN, RtoObjectiveSeconds: r.RTOObjective, RpoObjectiveSeconds: r.RPOObjective, ObjectivesMet: r.ObjectivesOK,
		Rpo: &havenpb.DrillRPO{UnappliedMessages: r.RPO.UnappliedMessages, BytesBehind: r.RPO.BytesBehind, SecondsBehind: r.RPO.SecondsBehind, DrIncomplete: r.RPO.Incomplete}}
	for _, s := range r.Steps {
		p.Steps = append(p.Steps, &havenpb.DrillStep{Name: s.Name, Seconds: s.Seconds, Detail: s.Detail})
	}
	for _, t := range r.Tables {
		p.Tables = append(p.Tables, &havenpb.TableCheck{Table: t.Table, Match: t.Match, PrimaryRows: t.PrimaryRows, DrRows: t.DRRows,
			MissingOnDr: t.MissingOnDR, ExtraOnDr: t.ExtraOnDR, Differing: t.Differing, KeysTruncated: t.KeysTruncated, Detail: t.Detail,
			NotCompared: t.NotCompared})
	}
	return p
}
