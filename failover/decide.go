package failover

import (
	"fmt"
	"slices"
	"sort"
	"time"
)

// Policy is when a group fails over by itself.
type Policy struct {
	// FailoverAfter is how long a majority of controller nodes must have
	// seen the primary down.
	FailoverAfter time.Duration
	// MaxRPO is the most DR may lag for an automatic failover.
	MaxRPO time.Duration
	// ProbeInterval is how often each node probes; an observation older
	// than three intervals no longer counts.
	ProbeInterval time.Duration
	// ClockMargin is added to a lease before it counts as expired, for
	// the clocks of controller nodes disagreeing.
	ClockMargin time.Duration
	// StandbyTimeout is how recently the DR standby must have reported
	// for its lag to be trusted.
	StandbyTimeout time.Duration
}

// Decision is what the leader does about a group now.
type Decision struct {
	Failover bool
	// Alert says why a failover that looks due does not happen (empty: no
	// reason to alert).
	Alert string
}

// Decide is the failover rule, a pure function of the group's state, the
// quorum's voting controller nodes and the time: a group fails over when
// a majority of the voters have seen its primary down for FailoverAfter, its
// primary's lease has expired, and its DR standby reported recently with a
// lag within MaxRPO and a complete copy. When the primary is down but one
// of the others does not hold, it alerts instead and waits for an
// operator's forced failover. It also alerts when the primary is up but its
// agent has gone silent.
func Decide(g *Group, voters []string, now time.Time, p Policy) Decision {
	if g.State != StateActive || g.DRSite == "" {
		return Decision{}
	}
	_, staleDR := g.Deposed[g.DRSite]
	nowMs := now.UnixMilli()
	var down []string
	for node, o := range g.Observations {
		if !slices.Contains(voters, node) {
			continue // a node no longer in the quorum
		}
		if o.fresh(nowMs, p) && !o.Up && nowMs-o.SinceMs >= p.FailoverAfter.Milliseconds() {
			down = append(down, node)
		}
	}
	if len(down) < len(voters)/2+1 {
		if g.AgentSeenMs != 0 && nowMs-g.AgentSeenMs > p.StandbyTimeout.Milliseconds() {
			return Decision{Alert: fmt.Sprintf("the agent of primary site %s has not checked in for %s: changes are not captured (DR falls behind), "+
				"and should the primary restart it refuses writes until its agent holds the lease again; start or fix the agent",
				g.PrimarySite, time.Duration(nowMs-g.AgentSeenMs)*time.Millisecond)}
		}
		return Decision{}
	}
	sort.Strings(down)
	if nowMs < g.LeaseExpiresMs+p.ClockMargin.Milliseconds() {
		// The agent may still be writing: its lease runs out first.
		return Decision{}
	}
	switch {
	case staleDR:
		return Decision{Alert: fmt.Sprintf("primary site %s down (seen by %v) and the other site %s is a deposed primary that has not rejoined: its data is stale, so it is not promoted; "+
			"bring %s back, or restore from a backup", g.PrimarySite, down, g.DRSite, g.PrimarySite)}
	case g.Paused:
		return Decision{Alert: fmt.Sprintf("primary site %s down (seen by %v) but automatic failover is paused: resume, or haven ctl failover --group %s", g.PrimarySite, down, g.Name)}
	case nowMs-g.StandbySeenMs > p.StandbyTimeout.Milliseconds():
		return Decision{Alert: fmt.Sprintf("primary site %s down (seen by %v) but DR site %s has not reported for %s: its lag is unknown; check the standby, or haven ctl failover --group %s --force",
			g.PrimarySite, down, g.DRSite, time.Duration(nowMs-g.StandbySeenMs)*time.Millisecond, g.Name)}
	case g.DRIncomplete != "":
		return Decision{Alert: fmt.Sprintf("primary site %s down (seen by %v) but DR site %s cannot vouch for its copy (%s): promoting it could lose rows the primary has; "+
			"bring %s back, or haven ctl failover --group %s --force accepts the loss", g.PrimarySite, down, g.DRSite, g.DRIncomplete, g.PrimarySite, g.Name)}
	case g.LagSeconds > p.MaxRPO.Seconds():
		return Decision{Alert: fmt.Sprintf("primary site %s down (seen by %v) but DR lags %.1fs, more than max_rpo %s: failing over would lose that; haven ctl failover --group %s --force accepts it",
			g.PrimarySite, down, g.LagSeconds, p.MaxRPO, g.Name)}
	}
	return Decision{Failover: true}
}
