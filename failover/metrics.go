package failover

import (
	"errors"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are read from the node's copy of the state at each scrape, so
// they never drift from it.
var (
	leaderDesc     = prometheus.NewDesc("haven_controller_leader", "1 on the node that leads the quorum.", nil, nil)
	epochDesc      = prometheus.NewDesc("haven_controller_group_epoch", "A group's epoch (fencing token); it grows at every change of primary.", []string{"group"}, nil)
	primaryDesc    = prometheus.NewDesc("haven_controller_group_primary", "1 for the site that is a group's primary.", []string{"group", "site"}, nil)
	alertDesc      = prometheus.NewDesc("haven_controller_group_alert", "1 while a group's primary looks lost but it is not failed over automatically (see haven ctl status).", []string{"group"}, nil)
	stateDesc      = prometheus.NewDesc("haven_controller_group_changing", "1 while a group changes hands: a promotion, switchover or rejoin under way.", []string{"group"}, nil)
	lagDesc        = prometheus.NewDesc("haven_controller_group_dr_lag_seconds", "DR lag as the group's standby last reported it.", []string{"group"}, nil)
	incompleteDesc = prometheus.NewDesc("haven_controller_group_dr_incomplete", "1 while the group's DR copy lacks rows the primary has (initial snapshot or a backfill under way): a failover is not automatic, and would lose them.", []string{"group"}, nil)
	leaseDesc      = prometheus.NewDesc("haven_controller_group_lease_seconds", "Time left on the primary agent's lease (negative: expired).", []string{"group"}, nil)
	deposedDesc    = prometheus.NewDesc("haven_controller_group_deposed_sites", "Former primaries of a group that have not rejoined (the group runs without DR).", []string{"group"}, nil)

	drillAlertDesc   = prometheus.NewDesc("haven_drill_alert", "1 while a group's drills alert: the last one failed or was skipped, or none passed within its schedule's window (haven ctl status says which).", []string{"group"}, nil)
	drillSuccessDesc = prometheus.NewDesc("haven_drill_last_success_timestamp_seconds", "When a kind of drill last passed on a group.", []string{"group", "kind"}, nil)
	drillResultDesc  = prometheus.NewDesc("haven_drill_last_result", "Outcome of a group's last drill of a kind: 1 passed, 0 anything else.", []string{"group", "kind"}, nil)
	drillRTODesc     = prometheus.NewDesc("haven_drill_last_rto_seconds", "RTO measured or predicted by a group's last drill of a kind that has one.", []string{"group", "kind"}, nil)
	drillRPODesc     = prometheus.NewDesc("haven_drill_last_rpo_seconds", "How far DR was behind when a group's last drill of a kind started.", []string{"group", "kind"}, nil)
)

func (c *Controller) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{leaderDesc, epochDesc, primaryDesc, alertDesc, stateDesc, lagDesc, incompleteDesc, leaseDesc, deposedDesc,
		drillAlertDesc, drillSuccessDesc, drillResultDesc, drillRTODesc, drillRPODesc} {
		ch <- d
	}
}

func (c *Controller) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	flag := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	gauge(leaderDesc, flag(c.isLeader()))
	now := time.Now()
	st := c.fsm.read()
	type groupKind struct{ group, kind string }
	last := map[groupKind]*Report{}
	for _, r := range st.Reports {
		if r.Outcome != OutcomeRunning {
			last[groupKind{r.Group, r.Kind}] = r // reports are oldest first
		}
	}
	for k, r := range last {
		gauge(drillResultDesc, flag(r.Outcome == OutcomePassed), k.group, k.kind)
		gauge(drillRPODesc, r.RPO.SecondsBehind, k.group, k.kind)
		if r.RTOSeconds > 0 {
			gauge(drillRTODesc, r.RTOSeconds, k.group, k.kind)
		}
	}
	for name, g := range st.Groups {
		gauge(drillAlertDesc, flag(g.DrillAlert != ""), name)
		for kind, ms := range g.DrillPassedMs {
			gauge(drillSuccessDesc, float64(ms)/1000, name, kind)
		}
		gauge(epochDesc, float64(g.Epoch), name)
		gauge(primaryDesc, 1, name, g.PrimarySite)
		gauge(alertDesc, flag(g.Alert != ""), name)
		gauge(stateDesc, flag(g.State != StateActive || g.Switchover != "" || g.RejoinSite != ""), name)
		gauge(lagDesc, g.LagSeconds, name)
		gauge(incompleteDesc, flag(g.DRIncomplete != ""), name)
		gauge(leaseDesc, time.UnixMilli(g.LeaseExpiresMs).Sub(now).Seconds(), name)
		gauge(deposedDesc, float64(len(g.Deposed)), name)
	}
}

// Healthy returns nil while the node is part of a quorum with a leader.
func (c *Controller) Healthy() error {
	if _, id := c.raft.LeaderWithID(); id == "" {
		return errors.New("no leader: this node does not reach a majority of the quorum")
	}
	if c.raft.State() == raft.Shutdown {
		return errors.New("raft is shut down")
	}
	return nil
}
