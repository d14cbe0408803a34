package failover

import (
	"strings"
	"testing"
	"time"
)

// TestDecideScenarios plays scripted timelines against the rule with an
// injected clock: what each step's observations lead to.
func TestDecideScenarios(t *testing.T) {
	p := DefaultConfig().Policy
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	ms := func(d time.Duration) int64 { return t0.Add(d).UnixMilli() }
	healthy := func() *Group {
		return &Group{Name: "crm", PrimarySite: "a", DRSite: "b", Epoch: 1, State: StateActive, LeaseExpiresMs: ms(2 * time.Second)}
	}
	// down marks a node's view: down since since, last probed at at.
	down := func(g *Group, node string, since, at time.Duration) {
		if g.Observations == nil {
			g.Observations = map[string]Observation{}
		}
		g.Observations[node] = Observation{Up: false, SinceMs: ms(since), AtMs: ms(at)}
	}
	up := func(g *Group, node string, at time.Duration) {
		if g.Observations == nil {
			g.Observations = map[string]Observation{}
		}
		g.Observations[node] = Observation{Up: true, SinceMs: ms(0), AtMs: ms(at)}
	}
	standby := func(g *Group, seen time.Duration, lag float64) {
		g.StandbySeenMs, g.LagSeconds = ms(seen), lag
	}
	cases := []struct {
		name     string
		setup    func(g *Group)
		now      time.Duration
		failover bool
		alert    string
	}{
		{"all up", func(g *Group) {
			up(g, "n1", 10*time.Second)
			up(g, "n2", 10*time.Second)
			up(g, "n3", 10*time.Second)
			standby(g, 10*time.Second, 0)
		},
			10 * time.Second, false, ""},
		{"primary up, its agent silent", func(g *Group) {
			up(g, "n1", 10*time.Second)
			up(g, "n2", 10*time.Second)
			g.AgentSeenMs = ms(4 * time.Second)
			standby(g, 10*time.Second, 0)
		}, 10 * time.Second, false, "has not checked in for 6s"},
		{"primary up, its agent checked in lately", func(g *Group) {
			up(g, "n1", 10*time.Second)
			up(g, "n2", 10*time.Second)
			g.AgentSeenMs = ms(9 * time.Second)
			standby(g, 10*time.Second, 0)
		}, 10 * time.Second, false, ""},
		{"majority down long enough", func(g *Group) {
			down(g, "n1", 1*time.Second, 5*time.Second)
			down(g, "n2", 1*time.Second, 5*time.Second)
			up(g, "n3", 5*time.Second)
			standby(g, 5*time.Second, 0.2)
		}, 5 * time.Second, true, ""},
		{"majority down, not yet for failover_after", func(g *Group) {
			down(g, "n1", 3*time.Second, 5*time.Second)
			down(g, "n2", 3*time.Second, 5*time.Second)
			standby(g, 5*time.Second, 0)
		}, 5 * time.Second, false, ""},
		{"one node cut off from the primary alone", func(g *Group) {
			down(g, "n1", 0, 10*time.Second)
			up(g, "n2", 10*time.Second)
			up(g, "n3", 10*time.Second)
			standby(g, 10*time.Second, 0)
		}, 10 * time.Second, false, ""},
		{"a node out of the quorum does not count", func(g *Group) {
			down(g, "n1", 0, 5*time.Second)
			down(g, "n4", 0, 5*time.Second)
			standby(g, 5*time.Second, 0)
		}, 5 * time.Second, false, ""},
		{"stale observations do not count", func(g *Group) {
			down(g, "n1", 0, 2*time.Second)
			down(g, "n2", 0, 2*time.Second)
			standby(g, 10*time.Second, 0)
		}, 10 * time.Second, false, ""},
		{"lease not yet expired", func(g *Group) {
			g.LeaseExpiresMs = ms(6 * time.Second)
			down(g, "n1", 0, 5*time.Second)
			down(g, "n2", 0, 5*time.Second)
			standby(g, 5*time.Second, 0)
		}, 5 * time.Second, false, ""},
		{"lease expired within the clock margin", func(g *Group) {
			g.LeaseExpiresMs = ms(4800 * time.Millisecond)
			down(g, "n1", 0, 5*time.Second)
			down(g, "n2", 0, 5*time.Second)
			standby(g, 5*time.Second, 0)
		}, 5 * time.Second, false, ""},
		{"DR lags more than max_rpo", func(g *Group) {
			down(g, "n1", 0, 5*time.Second)
			down(g, "n2", 0, 5*time.Second)
			standby(g, 5*time.Second, 42)
		}, 5 * time.Second, false, "more than max_rpo"},
		{"DR copy incomplete", func(g *Group) {
			down(g, "n1", 0, 5*time.Second)
			down(g, "n2", 0, 5*time.Second)
			standby(g, 5*time.Second, 0)
			g.DRIncomplete = "1 table(s) joined with rows that are not all copied yet (backfill under way): public.deals"
		}, 5 * time.Second, false, "cannot vouch for its copy (1 table(s) joined with rows that are not all copied yet (backfill under way): public.deals)"},
		{"DR standby silent", func(g *Group) {
			down(g, "n1", 0, 20*time.Second)
			down(g, "n2", 0, 20*time.Second)
			standby(g, 1*time.Second, 0)
		}, 20 * time.Second, false, "has not reported"},
		{"paused", func(g *Group) {
			g.Paused = true
			down(g, "n1", 0, 5*time.Second)
			down(g, "n2", 0, 5*time.Second)
			standby(g, 5*time.Second, 0)
		}, 5 * time.Second, false, "paused"},
		{"already promoting", func(g *Group) {
			g.State = StatePromoting
			down(g, "n1", 0, 5*time.Second)
			down(g, "n2", 0, 5*time.Second)
			standby(g, 5*time.Second, 0)
		}, 5 * time.Second, false, ""},
		{"the other site is a deposed primary, not rejoined", func(g *Group) {
			g.Deposed = map[string]uint64{"b": 2}
			down(g, "n1", 0, 5*time.Second)
			down(g, "n2", 0, 5*time.Second)
			standby(g, 5*time.Second, 0)
		}, 5 * time.Second, false, "deposed primary"},
		{"no DR site yet", func(g *Group) {
			g.DRSite = ""
			down(g, "n1", 0, 5*time.Second)
			down(g, "n2", 0, 5*time.Second)
		}, 5 * time.Second, false, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			g := healthy()
			c.setup(g)
			d := Decide(g, []string{"n1", "n2", "n3"}, t0.Add(c.now), p)
			if d.Failover != c.failover {
				t.Errorf("failover = %v, want %v (alert %q)", d.Failover, c.failover, d.Alert)
			}
			if (c.alert == "") != (d.Alert == "") || !strings.Contains(d.Alert, c.alert) {
				t.Errorf("alert = %q, want one containing %q", d.Alert, c.alert)
			}
		})
	}
}
