package failover

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/robfig/cron/v3"
)

// Drills rehearse DR without harming production, on a schedule or on
// demand, and leave a report with the evidence (drillrun.go runs them,
// verify.go compares the two sites). The state machine keeps the schedules,
// the drill under way of each group (through which the standby gets its
// orders at check-in), and the reports.

// Drill kinds.
const (
	DrillVerify     = "verify"
	DrillPromote    = "promote"
	DrillSwitchover = "switchover"
)

// Drill outcomes.
const (
	OutcomeRunning     = "running"
	OutcomePassed      = "passed"
	OutcomeFailed      = "failed"
	OutcomeSkipped     = "skipped"
	OutcomeInterrupted = "interrupted"
)

// Phases of a verify drill, as the standby sees them.
const (
	drillPrepare = "prepare" // nothing asked of the standby yet
	drillHold    = "hold"    // the standby stops at the next transaction boundary
	drillCut     = "cut"     // … applies up to the cut LSN, and stops there
	drillCompare = "compare" // both sides are read under their snapshots; apply goes on
	// A promote drill has one: the standby rehearses the promotion on a
	// clone, reporting its steps until it is done.
	drillRehearse = "rehearse"
)

// maxReports is how many drill reports the state keeps (newest), and
// maxReportKeys how many row keys a table check names per list.
const (
	maxReports    = 500
	maxReportKeys = 20
)

// Schedule runs a kind of drill on a group at every slot of a cron spec.
type Schedule struct {
	ID                string `json:"id"`
	Group             string `json:"group"`
	Kind              string `json:"kind"`
	Cron              string `json:"cron"`
	MaintenanceWindow bool   `json:"maintenance_window,omitempty"`
	CreatedMs         int64  `json:"created_ms"`
	// LastSlotMs is the last slot fired (run or skipped): each fires once,
	// whichever node leads.
	LastSlotMs int64 `json:"last_slot_ms,omitempty"`
}

// cronParser reads five fields, six with seconds first, or a descriptor.
var cronParser = cron.NewParser(cron.SecondOptional | cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow | cron.Descriptor)

func parseCron(spec string) (cron.Schedule, error) {
	s, err := cronParser.Parse(spec)
	if err != nil {
		return nil, fmt.Errorf("cron %q: %w (five fields, \"min hour dom month dow\", six with seconds first, or @daily, @every 1h)", spec, err)
	}
	return s, nil
}

// dueSlot returns the latest slot of s at or before now that has not
// fired, and how many earlier ones were passed over (a leaderless quorum
// fires no slot; only the latest missed is run, the others are counted).
func (s *Schedule) dueSlot(now time.Time) (slot time.Time, missed int, ok bool) {
	spec, err := parseCron(s.Cron)
	if err != nil {
		return time.Time{}, 0, false
	}
	from := time.UnixMilli(max(s.LastSlotMs, s.CreatedMs)).UTC()
	for t := spec.Next(from); !t.IsZero() && !t.After(now); t = spec.Next(t) {
		if ok {
			missed++
		}
		slot, ok = t, true
		if missed > 10000 {
			break // a seconds-level schedule left alone for hours
		}
	}
	return slot, missed, ok
}

// interval is the time between two slots of s after from, the window in
// which a drill is expected.
func (s *Schedule) interval(from time.Time) time.Duration {
	spec, err := parseCron(s.Cron)
	if err != nil {
		return 0
	}
	a := spec.Next(from)
	return spec.Next(a).Sub(a)
}

// ActiveDrill is a group's drill under way.
type ActiveDrill struct {
	ID    string `json:"id"`
	Kind  string `json:"kind"`
	Phase string `json:"phase"`
	// Node is the controller node that runs it: a drill whose node no
	// longer leads is interrupted and cleaned up.
	Node    string `json:"node"`
	CutLSN  uint64 `json:"cut_lsn,omitempty"`
	HeldLSN uint64 `json:"held_lsn,omitempty"`
	// HeldMs is when the standby first said it holds; AtCut that it stopped
	// at the cut.
	HeldMs int64 `json:"held_ms,omitempty"`
	AtCut  bool  `json:"at_cut,omitempty"`
	// A promote drill's rehearsal, as the standby reports it.
	Steps []Step `json:"steps,omitempty"`
	Done  bool   `json:"done,omitempty"`
	Error string `json:"error,omitempty"`
}

// Report is the evidence a drill leaves (havenpb.DrillReport).
type Report struct {
	ID           string       `json:"id"`
	Group        string       `json:"group"`
	Kind         string       `json:"kind"`
	Trigger      string       `json:"trigger"`
	StartedMs    int64        `json:"started_ms"`
	EndedMs      int64        `json:"ended_ms,omitempty"`
	Outcome      string       `json:"outcome"`
	Reason       string       `json:"reason,omitempty"`
	RPO          RPO          `json:"rpo"`
	RTOSeconds   float64      `json:"rto_seconds,omitempty"`
	RTOPredicted bool         `json:"rto_predicted,omitempty"`
	Steps        []Step       `json:"steps,omitempty"`
	HeldSeconds  float64      `json:"apply_held_seconds,omitempty"`
	LSN          string       `json:"lsn,omitempty"`
	Tables       []TableCheck `json:"tables,omitempty"`
	RTOObjective float64      `json:"rto_objective_seconds,omitempty"`
	RPOObjective float64      `json:"rpo_objective_seconds,omitempty"`
	ObjectivesOK bool         `json:"objectives_met,omitempty"`
}

// RPO is how far DR was behind when a drill started.
type RPO struct {
	UnappliedMessages uint64  `json:"unapplied_messages"`
	BytesBehind       uint64  `json:"bytes_behind"`
	SecondsBehind     float64 `json:"seconds_behind"`
	// Incomplete is what DR's copy lacked ("" when complete).
	Incomplete string `json:"dr_incomplete,omitempty"`
}

// Step is one timed step of a drill.
type Step struct {
	Name    string  `json:"name"`
	Seconds float64 `json:"seconds"`
	Detail  string  `json:"detail,omitempty"`
}

// TableCheck compares one table on both sites.
type TableCheck struct {
	Table         string   `json:"table"`
	Match         bool     `json:"match"`
	PrimaryRows   int64    `json:"primary_rows"`
	DRRows        int64    `json:"dr_rows"`
	MissingOnDR   []string `json:"missing_on_dr,omitempty"`
	ExtraOnDR     []string `json:"extra_on_dr,omitempty"`
	Differing     []string `json:"differing,omitempty"`
	KeysTruncated bool     `json:"keys_truncated,omitempty"`
	// NotCompared: the table could not be compared (Detail says why); it
	// neither passes nor fails the drill.
	NotCompared bool   `json:"not_compared,omitempty"`
	Detail      string `json:"detail,omitempty"`
}

// judge sets whether r met the objectives it was given; a drill that
// passed otherwise fails when it did not, or when DR's copy was incomplete
// (a failover would have lost what it lacked).
func (r *Report) judge() {
	if r.RPO.Incomplete != "" {
		if r.Outcome == OutcomePassed {
			r.Outcome = OutcomeFailed
		}
		r.Reason = joinReason("DR could not vouch for its copy at the start ("+r.RPO.Incomplete+"): a failover then could have lost rows", r.Reason)
	}
	var missed []string
	if r.RPOObjective > 0 && r.RPO.SecondsBehind > r.RPOObjective {
		missed = append(missed, fmt.Sprintf("DR was %.1fs behind at the start, over the RPO objective of %gs", r.RPO.SecondsBehind, r.RPOObjective))
	}
	if r.RTOObjective > 0 && r.RTOSeconds > r.RTOObjective {
		missed = append(missed, fmt.Sprintf("RTO %.1fs is over the objective of %gs", r.RTOSeconds, r.RTOObjective))
	}
	r.ObjectivesOK = len(missed) == 0
	if !r.ObjectivesOK && r.Outcome == OutcomePassed {
		r.Outcome = OutcomeFailed
		r.Reason = joinReason("objectives missed: "+strings.Join(missed, "; "), r.Reason)
	}
}

// busy says why a group cannot start a drill now ("" when it can).
func (g *Group) busy() string {
	_, deposed := g.Deposed[g.DRSite]
	switch {
	case g.Drill != nil:
		return fmt.Sprintf("drill %s (%s) is under way", g.Drill.ID, g.Drill.Kind)
	case g.State != StateActive:
		return "a failover is under way"
	case g.Switchover != "":
		return "a switchover is under way"
	case g.RejoinSite != "" || g.AutoRejoin != "":
		return "a rejoin is under way"
	case g.DRSite == "" || deposed:
		return "the group has no DR site that follows the primary"
	}
	return ""
}

// drillCommand is the part of a command that drills use.
type drillCommand struct {
	Schedule *Schedule `json:"schedule,omitempty"`
	ID       string    `json:"id,omitempty"`
	Kind     string    `json:"kind,omitempty"`
	Trigger  string    `json:"trigger,omitempty"`
	SlotMs   int64     `json:"slot_ms,omitempty"`
	Missed   int       `json:"missed,omitempty"`
	Skip     string    `json:"skip,omitempty"` // why the slot is recorded, not run
	Phase    string    `json:"phase,omitempty"`
	CutLSN   uint64    `json:"cut_lsn,omitempty"`
	RPO      *RPO      `json:"rpo,omitempty"`
	Report   *Report   `json:"report,omitempty"`
	RTO      float64   `json:"rto,omitempty"`
	RPOObj   float64   `json:"rpo_objective,omitempty"`
}

// Drill command kinds.
const (
	cmdSchedule    = "drill-schedule"
	cmdUnschedule  = "drill-unschedule"
	cmdObjectives  = "objectives"
	cmdDrillStart  = "drill-start"
	cmdDrillPhase  = "drill-phase"
	cmdDrillFinish = "drill-finish"
	cmdDrillAlert  = "drill-alert"
)

// errSlotFired: a schedule's slot fired already (under another leader).
var errSlotFired = errors.New("this slot has fired already")

func (s *State) applyDrill(c command, g *Group) any {
	d := c.Drill
	if d == nil {
		return fmt.Errorf("%s without its drill fields", c.Kind)
	}
	switch c.Kind {
	case cmdSchedule:
		if g == nil {
			return fmt.Errorf("no group %q", c.Group)
		}
		s.NextID++
		sc := *d.Schedule
		sc.ID, sc.Group, sc.CreatedMs = fmt.Sprintf("s%d", s.NextID), c.Group, c.AtMs
		s.Schedules[sc.ID] = &sc
		s.audit(c.AtMs, c.Actor, "drill schedule", c.Group, fmt.Sprintf("%s: %s drill at %q", sc.ID, sc.Kind, sc.Cron))
		return sc
	case cmdUnschedule:
		sc, ok := s.Schedules[d.ID]
		if !ok {
			return fmt.Errorf("no drill schedule %q: haven ctl drill list shows them", d.ID)
		}
		delete(s.Schedules, d.ID)
		s.audit(c.AtMs, c.Actor, "drill unschedule", sc.Group, fmt.Sprintf("%s: %s drill at %q", sc.ID, sc.Kind, sc.Cron))
		return nil
	case cmdObjectives:
		if g == nil {
			return fmt.Errorf("no group %q", c.Group)
		}
		g.RTOObjective, g.RPOObjective = d.RTO, d.RPOObj
		s.audit(c.AtMs, c.Actor, "objectives", c.Group, fmt.Sprintf("RTO %gs, RPO %gs", d.RTO, d.RPOObj))
		return nil
	case cmdDrillStart:
		return s.startDrill(c, g)
	case cmdDrillPhase:
		if g == nil || g.Drill == nil || g.Drill.ID != d.ID {
			return fmt.Errorf("drill %s is not under way", d.ID)
		}
		g.Drill.Phase = d.Phase
		if d.CutLSN != 0 {
			g.Drill.CutLSN = d.CutLSN
		}
		return nil
	case cmdDrillFinish:
		s.finishDrill(c.AtMs, g, d.Report)
		return nil
	case cmdDrillAlert:
		if g != nil {
			g.DrillAlert = c.Reason
		}
		return nil
	}
	return fmt.Errorf("unknown command %q", c.Kind)
}

// startDrill starts a drill, or records why it could not start; it returns
// the report.
func (s *State) startDrill(c command, g *Group) any {
	d := c.Drill
	if g == nil {
		return fmt.Errorf("no group %q", c.Group)
	}
	if d.Schedule != nil {
		sc, ok := s.Schedules[d.Schedule.ID]
		if !ok {
			return fmt.Errorf("no drill schedule %q", d.Schedule.ID)
		}
		if d.SlotMs <= sc.LastSlotMs {
			return errSlotFired
		}
		sc.LastSlotMs = d.SlotMs
	}
	s.NextID++
	r := &Report{ID: fmt.Sprintf("d%d", s.NextID), Group: c.Group, Kind: d.Kind, Trigger: d.Trigger, StartedMs: c.AtMs,
		Outcome: OutcomeRunning, RTOObjective: g.RTOObjective, RPOObjective: g.RPOObjective}
	if d.RPO != nil {
		r.RPO = *d.RPO
	}
	if d.Missed > 0 {
		r.Reason = fmt.Sprintf("%d earlier slots of this schedule were missed (no leader at the time)", d.Missed)
	}
	s.Reports = append(s.Reports, r)
	if len(s.Reports) > maxReports {
		s.Reports = slices.Delete(s.Reports, 0, len(s.Reports)-maxReports)
	}
	why := d.Skip
	if why == "" {
		why = g.busy()
	}
	if why != "" {
		r.Outcome, r.EndedMs = OutcomeSkipped, c.AtMs
		r.Reason = joinReason("not started: "+why, r.Reason)
		g.DrillAlert = fmt.Sprintf("drill %s (%s) was skipped: %s", r.ID, r.Kind, why)
		s.audit(c.AtMs, c.Actor, "drill "+d.Kind, c.Group, r.ID+" skipped: "+why)
		return *r
	}
	phase := drillPrepare
	if d.Kind == DrillPromote {
		phase = drillRehearse
	}
	g.Drill = &ActiveDrill{ID: r.ID, Kind: d.Kind, Phase: phase, Node: c.Node}
	s.audit(c.AtMs, c.Actor, "drill "+d.Kind, c.Group, r.ID+" started: "+d.Trigger)
	return *r
}

func joinReason(a, b string) string {
	if b == "" {
		return a
	}
	return a + "; " + b
}

// finishDrill records a drill's final report and ends it.
func (s *State) finishDrill(atMs int64, g *Group, final *Report) {
	if g != nil && g.Drill != nil && g.Drill.ID == final.ID {
		g.Drill = nil
	}
	for i, r := range s.Reports {
		if r.ID == final.ID {
			if r.Outcome != OutcomeRunning {
				return // finished already (interrupted by a failover)
			}
			s.Reports[i] = final
		}
	}
	if g != nil {
		switch final.Outcome {
		case OutcomePassed:
			if g.DrillPassedMs == nil {
				g.DrillPassedMs = map[string]int64{}
			}
			g.DrillPassedMs[final.Kind] = final.EndedMs
			g.DrillAlert = ""
		default:
			g.DrillAlert = fmt.Sprintf("drill %s (%s) %s: %s", final.ID, final.Kind, final.Outcome, final.Reason)
		}
	}
	s.audit(atMs, "controller", "drill "+final.Kind, final.Group, fmt.Sprintf("%s %s: %s", final.ID, final.Outcome, final.Reason))
}

// interruptDrill ends a group's drill under way as interrupted.
func (s *State) interruptDrill(atMs int64, g *Group, why string) {
	if g.Drill == nil {
		return
	}
	if r := s.report(g.Drill.ID); r != nil && r.Outcome == OutcomeRunning {
		final := *r
		final.Outcome, final.EndedMs, final.Reason = OutcomeInterrupted, atMs, why
		s.finishDrill(atMs, g, &final)
	}
	g.Drill = nil
}

// report returns the report with an id.
func (s *State) report(id string) *Report {
	for _, r := range s.Reports {
		if r.ID == id {
			return r
		}
	}
	return nil
}
