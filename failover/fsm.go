package failover

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// Group states.
const (
	StateActive    = "ACTIVE"    // the primary site is primary
	StatePromoting = "PROMOTING" // the DR site is ordered to promote and has not said it did
)

// Group is one replicated database as the quorum knows it.
type Group struct {
	Name        string `json:"name"`
	PrimarySite string `json:"primary_site"`
	DRSite      string `json:"dr_site,omitempty"`
	// Epoch is the fencing token: it grows at every change of primary.
	Epoch  uint64 `json:"epoch"`
	State  string `json:"state"`
	Paused bool   `json:"paused,omitempty"`
	// Database URLs by site, as each site's agent (its primary database)
	// and standby (its DR database) registered them: controllers probe the
	// primary's, and fence a deposed primary's.
	AgentURLs   map[string]string `json:"agent_urls,omitempty"`
	StandbyURLs map[string]string `json:"standby_urls,omitempty"`
	// LeaseExpiresMs is when the primary site's agent stops being allowed
	// to write, by the clock of the leader that granted it.
	LeaseExpiresMs int64   `json:"lease_expires_ms,omitempty"`
	AgentSeenMs    int64   `json:"agent_seen_ms,omitempty"`
	StandbySeenMs  int64   `json:"standby_seen_ms,omitempty"`
	LagSeconds     float64 `json:"lag_seconds,omitempty"`
	// DRIncomplete is what the DR standby last reported its copy lacks
	// ("" when complete): promoting it would lose those rows.
	DRIncomplete string `json:"dr_incomplete,omitempty"`
	// Deposed sites: former primaries, by the epoch that deposed them,
	// until they rejoin. Their agent is told to fence, their standby not
	// to apply.
	Deposed map[string]uint64 `json:"deposed,omitempty"`
	// A rejoin under way: the site, and its phase (report, then reseed).
	RejoinSite  string `json:"rejoin_site,omitempty"`
	RejoinPhase string `json:"rejoin_phase,omitempty"`
	// Switchover is a planned switchover's phase ("fence": the primary's
	// agent fences and drains), and AutoRejoin the site that rejoins as
	// standby once the other is promoted.
	Switchover        string `json:"switchover,omitempty"`
	SwitchoverStarted int64  `json:"switchover_started_ms,omitempty"`
	AutoRejoin        string `json:"auto_rejoin,omitempty"`
	// PromotedLSN is the last source commit the promoted standby applied:
	// what the old primary committed after it never reached DR.
	PromotedLSN uint64 `json:"promoted_lsn,omitempty"`
	// Observations of the primary by controller node.
	Observations map[string]Observation `json:"observations,omitempty"`
	Alert        string                 `json:"alert,omitempty"`
	// What the DR standby last reported: its last applied source commit,
	// and the stream messages it has not applied.
	AppliedLSN        uint64 `json:"applied_lsn,omitempty"`
	UnappliedMessages uint64 `json:"unapplied_messages,omitempty"`
	// Drills (drill.go): the one under way, the objectives they are judged
	// against (seconds, 0: none), when each kind last passed, and why
	// drills alert.
	Drill         *ActiveDrill     `json:"drill,omitempty"`
	RTOObjective  float64          `json:"rto_objective,omitempty"`
	RPOObjective  float64          `json:"rpo_objective,omitempty"`
	DrillPassedMs map[string]int64 `json:"drill_passed_ms,omitempty"`
	DrillAlert    string           `json:"drill_alert,omitempty"`
}

// Observation is one controller node's view of a group's primary.
type Observation struct {
	Up      bool   `json:"up"`
	SinceMs int64  `json:"since_ms"` // when the view last changed
	AtMs    int64  `json:"at_ms"`    // when it last probed
	Error   string `json:"error,omitempty"`
}

// fresh says whether the observation is recent enough to count: a node
// probes every ProbeInterval, so three missed probes make it stale.
func (o Observation) fresh(nowMs int64, p Policy) bool {
	return nowMs-o.AtMs <= (3 * p.ProbeInterval).Milliseconds()
}

// NodeInfo is how to reach a controller node's API, and the version of
// the rules it applies commands by (0: a node older than versioning).
type NodeInfo struct {
	APIURL       string `json:"api_url"`
	RulesVersion int    `json:"rules_version,omitempty"`
}

// RulesVersion is the version of the rules by which this build applies
// commands to the state. A quorum being upgraded runs nodes of two
// versions, and each must reach the same state from the same commands: a
// change to apply that would make them differ raises RulesVersion and is
// gated on State.RulesVersion, which the leader raises once every voter
// runs the new version (see quorumRulesVersion). Version 2 is the first
// that nodes report: its rules are those of the builds before it back to
// the one where DR's reported incompleteness began to hold a switchover,
// so it gates nothing. A build older than that rule must not share a
// quorum with this one. Version 3 adds the remove-node command, which a
// node of version 2 would refuse: the leader proposes it only once every
// voter that stays runs version 3. Version 4 records the report of the
// check-in that ends a site's rejoin. From version 4, a build that finds
// the state on newer rules than its own stops applying (fsm.behind).
const RulesVersion = 4

// quorumRulesVersion is the version of the rules every voter runs: the
// oldest among them, a node that has not said counting as version 1.
func quorumRulesVersion(nodes map[string]NodeInfo, voters []string) int {
	if len(voters) == 0 {
		return 1
	}
	v := RulesVersion
	for _, id := range voters {
		v = min(v, max(nodes[id].RulesVersion, 1))
	}
	return v
}

// AuditEntry records one operator action or decision; entries form a hash
// chain, so an edited or removed entry shows.
type AuditEntry struct {
	Index   uint64 `json:"index"`
	AtMs    int64  `json:"at_ms"`
	Actor   string `json:"actor"`
	Action  string `json:"action"`
	Group   string `json:"group"`
	Outcome string `json:"outcome"`
	Hash    string `json:"hash"`
}

// maxAudit is how many audit entries the state keeps, recentAudit how many
// a read of it returns.
const (
	maxAudit    = 10000
	recentAudit = 50
)

// State is what the quorum agrees on.
type State struct {
	Groups map[string]*Group   `json:"groups"`
	Nodes  map[string]NodeInfo `json:"nodes"`
	Audit  []AuditEntry        `json:"audit"`
	// Drill schedules by id, and reports, oldest first; NextID numbers
	// both.
	Schedules map[string]*Schedule `json:"schedules,omitempty"`
	Reports   []*Report            `json:"reports,omitempty"`
	NextID    uint64               `json:"next_id,omitempty"`
	// RulesVersion is the version of the rules commands are applied by,
	// 0 until the leader first raises it; see RulesVersion.
	RulesVersion int `json:"rules_version,omitempty"`
}

func newState() *State {
	return &State{Groups: map[string]*Group{}, Nodes: map[string]NodeInfo{}, Schedules: map[string]*Schedule{}}
}

// clone copies the state deeply enough for readers to keep.
func (s *State) clone() *State {
	// Readers see the recent audit only: the whole trail (up to maxAudit
	// entries) goes into snapshots, not into every read.
	c := &State{Groups: make(map[string]*Group, len(s.Groups)), Nodes: maps.Clone(s.Nodes),
		Audit: slices.Clone(s.Audit[max(0, len(s.Audit)-recentAudit):]), Schedules: make(map[string]*Schedule, len(s.Schedules)),
		// A stored report is replaced, never changed: they are shared.
		Reports: slices.Clone(s.Reports), NextID: s.NextID, RulesVersion: s.RulesVersion}
	for id, sc := range s.Schedules {
		c.Schedules[id] = new(*sc)
	}
	for name, g := range s.Groups {
		cg := *g
		cg.AgentURLs = maps.Clone(g.AgentURLs)
		cg.StandbyURLs = maps.Clone(g.StandbyURLs)
		cg.Observations = maps.Clone(g.Observations)
		cg.Deposed = maps.Clone(g.Deposed)
		cg.DrillPassedMs = maps.Clone(g.DrillPassedMs)
		if g.Drill != nil {
			cg.Drill = new(*g.Drill)
			cg.Drill.Steps = slices.Clone(g.Drill.Steps)
		}
		c.Groups[name] = &cg
	}
	return c
}

func (s *State) audit(atMs int64, actor, action, group, outcome string) {
	e := AuditEntry{AtMs: atMs, Actor: actor, Action: action, Group: group, Outcome: outcome}
	prev := ""
	if n := len(s.Audit); n > 0 {
		e.Index = s.Audit[n-1].Index + 1
		prev = s.Audit[n-1].Hash
	}
	sum := sha256.Sum256(fmt.Appendf(nil, "%s|%d|%d|%s|%s|%s|%s", prev, e.Index, e.AtMs, e.Actor, e.Action, e.Group, e.Outcome))
	e.Hash = hex.EncodeToString(sum[:])
	s.Audit = append(s.Audit, e)
	if len(s.Audit) > maxAudit {
		s.Audit = slices.Delete(s.Audit, 0, len(s.Audit)-maxAudit)
	}
}

// Command kinds.
const (
	cmdCheckIn         = "checkin"
	cmdObserve         = "observe"
	cmdFailover        = "failover"
	cmdPause           = "pause"
	cmdResume          = "resume"
	cmdNode            = "node"
	cmdAlert           = "alert"
	cmdRejoin          = "rejoin"
	cmdSwitchover      = "switchover"
	cmdRulesVersion    = "rules-version"
	cmdAbortSwitchover = "abort-switchover"
	cmdRemoveNode      = "remove-node" // rules version 3
)

// Rejoin and switchover phases.
const (
	phaseCatchUp = "catch-up" // a switchover waits for DR to be current before it stops writes
	phaseFence   = "fence"    // the primary's agent fences its database and drains its changes
	phaseReport  = "report"   // the deposed agent writes its report and drops its slot
	phaseReseed  = "reseed"   // the site's standby loads the new primary's snapshot
)

// command is one change to the state, as the leader proposes it; it carries
// the leader's clock so that every node applies it alike.
type command struct {
	Kind  string `json:"kind"`
	AtMs  int64  `json:"at_ms"`
	Group string `json:"group,omitempty"`
	Actor string `json:"actor,omitempty"`

	// checkin
	Site       string  `json:"site,omitempty"`
	Agent      bool    `json:"agent,omitempty"`
	Epoch      uint64  `json:"epoch,omitempty"`
	URL        string  `json:"url,omitempty"`
	LagSeconds float64 `json:"lag_seconds,omitempty"`
	Promoted   uint64  `json:"promoted,omitempty"`
	AppliedLSN uint64  `json:"applied_lsn,omitempty"`
	LeaseTTLMs int64   `json:"lease_ttl_ms,omitempty"`
	GrantLease bool    `json:"grant_lease,omitempty"`
	Reported   bool    `json:"reported,omitempty"`
	Report     string  `json:"report,omitempty"`
	Reseeded   bool    `json:"reseeded,omitempty"`
	StandbyDB  bool    `json:"standby_db,omitempty"`
	DrainedLSN uint64  `json:"drained_lsn,omitempty"`
	Unapplied  uint64  `json:"unapplied,omitempty"`
	DrillID    string  `json:"drill_id,omitempty"`
	HeldLSN    uint64  `json:"held_lsn,omitempty"`
	AtCut      bool    `json:"at_cut,omitempty"`
	DrillSteps []Step  `json:"drill_steps,omitempty"`
	DrillDone  bool    `json:"drill_done,omitempty"`
	DrillError string  `json:"drill_error,omitempty"`
	Incomplete string  `json:"incomplete,omitempty"`

	Drill *drillCommand `json:"drill,omitempty"`

	Observation *Observation `json:"observation,omitempty"`
	Node        string       `json:"node,omitempty"`
	Info        *NodeInfo    `json:"info,omitempty"`
	Reason      string       `json:"reason,omitempty"`
	// rules-version
	RulesVersion int `json:"rules_version,omitempty"`
}

// forget drops what the state knows of a node that left the quorum.
func (s *State) forget(node string) {
	delete(s.Nodes, node)
	for _, g := range s.Groups {
		delete(g.Observations, node)
	}
}

// apply changes the state by one command and returns what the caller needs.
func (s *State) apply(c command) any {
	g := s.Groups[c.Group]
	switch c.Kind {
	case cmdNode:
		s.Nodes[c.Node] = *c.Info
		return nil
	case cmdRemoveNode:
		// The leader has taken the node out of Raft's configuration: what
		// the state knows of it goes too, so that its last probes count
		// for nothing.
		s.forget(c.Node)
		outcome := "node " + c.Node + " removed from the quorum"
		if c.Reason != "" {
			outcome += ": " + c.Reason
		}
		s.audit(c.AtMs, c.Actor, "remove-node", "", outcome)
		return nil
	case cmdRulesVersion:
		// The leader proposes it once every voter says it runs that
		// version (a build from before this command returns an error for
		// it and keeps its state; one older than the version stops:
		// fsm.checkRules).
		if c.RulesVersion > s.RulesVersion {
			s.RulesVersion = c.RulesVersion
			s.audit(c.AtMs, c.Actor, "rules-version", "", fmt.Sprintf("every controller node runs version %d of the state's rules: the quorum applies them from here", c.RulesVersion))
		}
		return nil
	case cmdCheckIn:
		return s.checkIn(c)
	case cmdSchedule, cmdUnschedule, cmdObjectives, cmdDrillStart, cmdDrillPhase, cmdDrillFinish, cmdDrillAlert:
		return s.applyDrill(c, g)
	case cmdObserve:
		if g == nil {
			return nil
		}
		o := *c.Observation
		if prev, ok := g.Observations[c.Node]; ok && prev.Up == o.Up {
			o.SinceMs = prev.SinceMs
		}
		if g.Observations == nil {
			g.Observations = map[string]Observation{}
		}
		g.Observations[c.Node] = o
		return nil
	case cmdAlert:
		if g != nil {
			g.Alert = c.Reason
		}
		return nil
	case cmdPause, cmdResume:
		if g == nil {
			return fmt.Errorf("no group %q", c.Group)
		}
		g.Paused = c.Kind == cmdPause
		s.audit(c.AtMs, c.Actor, c.Kind, c.Group, "ok")
		return nil
	case cmdRejoin:
		if g == nil {
			return fmt.Errorf("no group %q", c.Group)
		}
		if g.State != StateActive {
			return fmt.Errorf("group %q is %s: wait for the promotion to finish", c.Group, g.State)
		}
		if _, ok := g.Deposed[g.DRSite]; !ok {
			s.audit(c.AtMs, c.Actor, "rejoin", c.Group, "refused: nothing to rejoin")
			return fmt.Errorf("group %q has no deposed primary to rejoin: its DR site %s is a standby already", c.Group, g.DRSite)
		}
		g.RejoinSite, g.RejoinPhase = g.DRSite, phaseReport
		s.audit(c.AtMs, c.Actor, "rejoin", c.Group, "site "+g.DRSite+" rejoins as standby")
		return nil
	case cmdFailover:
		if g == nil {
			return fmt.Errorf("no group %q", c.Group)
		}
		if g.Epoch != c.Epoch {
			// Decided on an older state: another change came first.
			s.audit(c.AtMs, c.Actor, "failover", c.Group, fmt.Sprintf("refused: epoch is %d, not %d", g.Epoch, c.Epoch))
			return fmt.Errorf("group %q is at epoch %d now, not %d: check status and retry", c.Group, g.Epoch, c.Epoch)
		}
		if g.State != StateActive || g.DRSite == "" {
			s.audit(c.AtMs, c.Actor, "failover", c.Group, "refused: "+g.State)
			return fmt.Errorf("group %q cannot fail over: state %s, DR site %q", c.Group, g.State, g.DRSite)
		}
		if _, stale := g.Deposed[g.DRSite]; stale {
			s.audit(c.AtMs, c.Actor, "failover", c.Group, "refused: DR site deposed, not rejoined")
			return fmt.Errorf("group %q cannot fail over to site %s: it is a deposed primary that has not rejoined, so its data is stale", c.Group, g.DRSite)
		}
		s.interruptDrill(c.AtMs, g, "a failover began")
		g.promote()
		s.audit(c.AtMs, c.Actor, "failover", c.Group, fmt.Sprintf("site %s promoted to primary at epoch %d: %s", g.PrimarySite, g.Epoch, c.Reason))
		return nil
	case cmdSwitchover:
		if g == nil {
			return fmt.Errorf("no group %q", c.Group)
		}
		if _, deposed := g.Deposed[g.DRSite]; g.State != StateActive || g.DRSite == "" || deposed || g.Switchover != "" {
			s.audit(c.AtMs, c.Actor, "switchover", c.Group, "refused")
			return fmt.Errorf("group %q cannot switch over now: state %s, DR site %q (deposed: %v), switchover %q; it needs a DR site that follows the primary",
				c.Group, g.State, g.DRSite, deposed, g.Switchover)
		}
		if g.DRIncomplete != "" {
			s.audit(c.AtMs, c.Actor, "switchover", c.Group, "refused: DR's copy is incomplete: "+g.DRIncomplete)
			return fmt.Errorf("group %q cannot switch over now: DR site %s cannot vouch for its copy (%s), and a switchover could lose what it lacks; "+
				"switch over once the standby has loaded it (haven ctl status shows when)", c.Group, g.DRSite, g.DRIncomplete)
		}
		if g.Drill != nil && g.Drill.Kind != DrillSwitchover {
			s.interruptDrill(c.AtMs, g, "a switchover began")
		}
		// The fence waits for the standby's next check-in, even with DR
		// current: that check-in's answer has it check in faster (see
		// api.checkInMs), so that it hears of its promotion soon after
		// writes stop, not up to a whole slow check-in interval later.
		g.Switchover, g.SwitchoverStarted = phaseCatchUp, c.AtMs
		s.audit(c.AtMs, c.Actor, "switchover", c.Group, fmt.Sprintf("from site %s to site %s: waiting for DR's next report before fencing the primary",
			g.PrimarySite, g.DRSite))
		return nil
	case cmdAbortSwitchover:
		if g == nil || g.Switchover == "" {
			return nil
		}
		g.Switchover = ""
		s.audit(c.AtMs, c.Actor, "switchover aborted", c.Group, c.Reason)
		return nil
	}
	return fmt.Errorf("unknown command %q", c.Kind)
}

// checkInResult is what a check-in tells the site.
type checkInResult struct {
	Epoch           uint64
	PrimarySite     string
	Lease           bool
	Fence           bool
	Promote         bool
	Apply           bool
	Reseed          bool
	Report          bool
	PromotedLSN     uint64
	SwitchoverFence bool
	DrillHold       string
	DrillCutLSN     uint64
	DrillRehearse   string
}

func (s *State) checkIn(c command) any {
	g := s.Groups[c.Group]
	if g == nil {
		if !c.Agent {
			return fmt.Errorf("group %q is unknown to the controllers: start its primary's agent with --controllers first", c.Group)
		}
		if c.StandbyDB {
			return fmt.Errorf("group %q is unknown to the controllers, and site %s's database is a DR copy (a standby applies to it): start the primary site's agent first", c.Group, c.Site)
		}
		g = &Group{Name: c.Group, PrimarySite: c.Site, Epoch: c.Epoch, State: StateActive}
		s.Groups[c.Group] = g
		s.audit(c.AtMs, "agent@"+c.Site, "register", c.Group, fmt.Sprintf("primary site %s at epoch %d", c.Site, c.Epoch))
	}
	if c.URL != "" {
		urls := &g.StandbyURLs
		if c.Agent {
			urls = &g.AgentURLs
		}
		if *urls == nil {
			*urls = map[string]string{}
		}
		(*urls)[c.Site] = c.URL
	}
	r := checkInResult{Epoch: g.Epoch, PrimarySite: g.PrimarySite, PromotedLSN: g.PromotedLSN}
	_, deposed := g.Deposed[c.Site]
	rejoining := deposed && c.Site == g.RejoinSite
	if c.Agent {
		if c.Site == g.PrimarySite {
			g.AgentSeenMs = c.AtMs
		}
		switch {
		case rejoining:
			// Its database is reopened for the report and the reload.
			if g.RejoinPhase == phaseReport {
				if c.Reported {
					g.RejoinPhase = phaseReseed
					s.audit(c.AtMs, "agent@"+c.Site, "rejoin report", c.Group, "report written: "+c.Report)
				} else {
					r.Report = true
				}
			}
		case deposed:
			r.Fence = true
		case c.Site == g.PrimarySite && g.Switchover == phaseFence && c.DrainedLSN > 0:
			// Fenced and drained: DR gets everything, then takes over; the
			// old primary rejoins as its standby.
			old := g.PrimarySite
			g.Switchover = ""
			g.promote()
			g.AutoRejoin = old
			s.audit(c.AtMs, "agent@"+old, "switchover", c.Group, fmt.Sprintf("site %s fenced and drained through %d: site %s promoted at epoch %d",
				old, c.DrainedLSN, g.PrimarySite, g.Epoch))
			r = checkInResult{Epoch: g.Epoch, PrimarySite: g.PrimarySite, Fence: true}
		case c.Site == g.PrimarySite && c.GrantLease && g.State == StateActive:
			// The agent counts its lease from when it sent the request, a
			// little earlier: it runs out there first.
			g.LeaseExpiresMs = max(g.LeaseExpiresMs, c.AtMs+c.LeaseTTLMs)
			r.Lease = true
			r.SwitchoverFence = g.Switchover == phaseFence
		}
		return r
	}
	if c.Site == g.PrimarySite {
		// The standby of the promoted site.
		if g.State == StatePromoting && c.Promoted >= g.Epoch {
			g.State = StateActive
			g.PromotedLSN = c.AppliedLSN
			s.audit(c.AtMs, "standby@"+c.Site, "promoted", c.Group, fmt.Sprintf("site %s is primary at epoch %d", c.Site, g.Epoch))
			if g.AutoRejoin != "" {
				g.RejoinSite, g.RejoinPhase, g.AutoRejoin = g.AutoRejoin, phaseReport, ""
				s.audit(c.AtMs, "controller", "rejoin", c.Group, "site "+g.RejoinSite+" rejoins as standby after the switchover")
			}
		}
		r.Promote = g.State == StatePromoting
		return r
	}
	if g.DRSite == "" {
		g.DRSite = c.Site
		s.audit(c.AtMs, "standby@"+c.Site, "register", c.Group, "DR site "+c.Site)
	}
	if c.Site != g.DRSite {
		return r
	}
	// A deposed site's standby applies nothing: its lag means nothing,
	// until the check-in that ends its rejoin, its first report as DR
	// (from rules version 4: before, it was dropped, and a switchover asked
	// for at once was refused as if DR had not reported for as long as the
	// site had been deposed).
	rejoined := rejoining && g.RejoinPhase == phaseReseed && c.Reseeded && s.RulesVersion >= 4
	if !deposed || rejoined {
		g.StandbySeenMs = c.AtMs
		g.LagSeconds, g.DRIncomplete = c.LagSeconds, c.Incomplete
		g.AppliedLSN, g.UnappliedMessages = c.AppliedLSN, c.Unapplied
		if d := g.Drill; d != nil {
			switch {
			case c.DrillID != d.ID:
			case d.Kind == DrillPromote:
				d.Steps, d.Done, d.Error = c.DrillSteps, c.DrillDone, c.DrillError
			default:
				if d.HeldMs == 0 {
					d.HeldMs = c.AtMs
				}
				d.HeldLSN, d.AtCut = c.HeldLSN, c.AtCut && d.CutLSN != 0
			}
			switch d.Phase {
			case drillHold:
				r.DrillHold = d.ID
			case drillCut:
				r.DrillHold, r.DrillCutLSN = d.ID, d.CutLSN
			case drillRehearse:
				r.DrillRehearse = d.ID
			}
		}
		if g.Switchover == phaseCatchUp && g.current(c.AtMs) {
			// Writes stop only now: the pause is the drain of what is in
			// flight, not of a backlog.
			g.Switchover, g.SwitchoverStarted = phaseFence, c.AtMs
			s.audit(c.AtMs, "standby@"+c.Site, "switchover", c.Group, fmt.Sprintf("DR lags %.2fs: fencing the primary", c.LagSeconds))
		}
	}
	switch {
	case !deposed:
		r.Apply = true
	case rejoining && g.RejoinPhase == phaseReseed:
		if c.Reseeded {
			delete(g.Deposed, c.Site)
			g.RejoinSite, g.RejoinPhase = "", ""
			s.audit(c.AtMs, "standby@"+c.Site, "rejoined", c.Group, "site "+c.Site+" is the standby, loaded from the primary's snapshot")
			r.Apply = true
		} else {
			r.Apply, r.Reseed = true, true
		}
	}
	return r
}

// promote makes the DR site primary at the next epoch; the old primary is
// deposed until it rejoins.
func (g *Group) promote() {
	if g.Deposed == nil {
		g.Deposed = map[string]uint64{}
	}
	g.Deposed[g.PrimarySite] = g.Epoch + 1
	g.PrimarySite, g.DRSite = g.DRSite, g.PrimarySite
	g.Epoch++
	g.RejoinSite, g.RejoinPhase, g.Switchover = "", "", ""
	g.State = StatePromoting
	g.LeaseExpiresMs, g.AgentSeenMs = 0, 0
	g.Observations = nil
	g.Alert, g.DRIncomplete = "", ""
}

// switchoverMaxLag is how far DR may lag when a switchover stops writes:
// the write pause is about that long, plus the hand-over.
const switchoverMaxLag = 300 * time.Millisecond

// current reports whether DR reported, within the last second, a lag small
// enough to stop writes for a switchover, and a complete copy.
func (g *Group) current(nowMs int64) bool {
	return nowMs-g.StandbySeenMs <= 1000 && g.LagSeconds <= switchoverMaxLag.Seconds() && g.DRIncomplete == ""
}

// PrimaryURL is the URL to probe the group's primary with: its agent's, or
// after a failover, the promoted standby's.
func (g *Group) PrimaryURL() string {
	if url := g.AgentURLs[g.PrimarySite]; url != "" {
		return url
	}
	return g.StandbyURLs[g.PrimarySite]
}

// DeposedURLs are the databases of former primaries that have not started
// to rejoin: they must stay fenced.
func (g *Group) DeposedURLs() map[string]string {
	out := map[string]string{}
	for site := range g.Deposed {
		if url := g.AgentURLs[site]; url != "" && site != g.RejoinSite {
			out[site] = url
		}
	}
	return out
}

// fsm is the raft.FSM over State.
type fsm struct {
	mu    sync.RWMutex
	state *State
	// behind is set once the state's rules version is newer than this
	// build's: the node was rolled back in place, or ran an older build
	// than the quorum moved to. From there it applies nothing and takes no
	// snapshot, so that its state does not drift from the other nodes',
	// and Run stops; a build of that version replays the log correctly.
	behind error
}

func newFSM() *fsm { return &fsm{state: newState()} }

func (f *fsm) Apply(l *raft.Log) any {
	var c command
	if err := json.Unmarshal(l.Data, &c); err != nil {
		return fmt.Errorf("decode command at index %d: %w", l.Index, err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.behind != nil {
		return f.behind
	}
	out := f.state.apply(c)
	f.checkRules()
	return out
}

// checkRules sets behind when the state's rules are newer than this
// build's (f.mu held).
func (f *fsm) checkRules() {
	if v := f.state.RulesVersion; v > RulesVersion {
		f.behind = fmt.Errorf("the quorum applies version %d of the state's rules and this build version %d, so this node would apply "+
			"the quorum's commands otherwise than the other nodes: it has stopped applying them; start it with a build of version %d or later "+
			"(its Raft data is kept, and replayed by the new build)", v, RulesVersion, v)
	}
}

// stopped is why the node must not go on, or nil.
func (f *fsm) stopped() error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.behind
}

// read returns a copy of the state, with the recent audit entries.
func (f *fsm) read() *State {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.clone()
}

func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	if f.behind != nil {
		f.mu.RUnlock()
		// What this state holds stopped at the rules change: recorded, it
		// would stand in for commands it never applied.
		return nil, f.behind
	}
	data, err := json.Marshal(f.state)
	f.mu.RUnlock()
	if err != nil {
		return nil, err
	}
	return snapshot(data), nil
}

func (f *fsm) Restore(r io.ReadCloser) error {
	defer r.Close()
	st := newState()
	if err := json.NewDecoder(r).Decode(st); err != nil {
		return fmt.Errorf("restore controller state: %w", err)
	}
	if st.Groups == nil {
		st.Groups = map[string]*Group{}
	}
	if st.Nodes == nil {
		st.Nodes = map[string]NodeInfo{}
	}
	f.mu.Lock()
	f.state, f.behind = st, nil
	f.checkRules()
	f.mu.Unlock()
	return nil
}

type snapshot []byte

func (s snapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s); err != nil {
		_ = sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s snapshot) Release() {}
