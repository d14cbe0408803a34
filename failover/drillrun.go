package failover

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/nats-io/nats.go"

	"github.com/haven-dr/haven/proto/wire"
)

// The leader fires due schedules, runs drills, and ends as interrupted any
// drill that no running node owns (its node crashed or lost the lead): the
// standby sees no drill at its next check-in and applies again, and a
// leftover temporary slot on the primary is dropped.

// Bounds of a verify drill's waits.
const (
	drillHoldTimeout = 30 * time.Second // for the standby to hold apply
	drillCutTimeout  = time.Minute      // for it to reach the cut (a transaction or heartbeat after it must arrive)
	drillTimeout     = time.Hour        // for the whole drill (a promote drill copies the DR cluster)
)

// drillSlotPrefix names the temporary slots of verify drills.
const drillSlotPrefix = "haven_drill_"

// drillLoop runs on every node and acts while the node leads.
func (c *Controller) drillLoop(ctx context.Context) {
	ticker := time.NewTicker(200 * time.Millisecond)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		if !c.isLeader() {
			c.stopDrills()
			continue
		}
		now := time.Now()
		c.endOrphanDrills(ctx)
		st := c.fsm.read()
		for _, sc := range st.Schedules {
			slot, missed, ok := sc.dueSlot(now)
			if !ok {
				continue
			}
			trigger := fmt.Sprintf("schedule %s (%q), slot %s", sc.ID, sc.Cron, slot.UTC().Format(time.RFC3339))
			skip := ""
			if sc.Kind == DrillSwitchover && now.Sub(slot) > time.Minute {
				// A disruptive drill runs in its window or not at all.
				skip = fmt.Sprintf("the slot's maintenance window began %s ago, with no controller leading", now.Sub(slot).Round(time.Second))
			}
			if _, err := c.startDrill(ctx, sc.Group, sc.Kind, trigger, "controller@"+c.cfg.ID, &Schedule{ID: sc.ID}, slot.UnixMilli(), missed, skip); err != nil && !errors.Is(err, errSlotFired) {
				c.log.Error().Err(err).Str("schedule", sc.ID).Msg("could not start a scheduled drill")
			}
		}
		c.overdueDrills(st, now)
	}
}

// stopDrills cancels the drills this node runs: it no longer leads, and
// their reads on the sites' databases must not linger.
func (c *Controller) stopDrills() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, cancel := range c.drills {
		cancel()
	}
}

// endOrphanDrills interrupts the drills this node does not run.
func (c *Controller) endOrphanDrills(ctx context.Context) {
	c.mu.Lock()
	if c.drillStarting > 0 {
		c.mu.Unlock()
		return
	}
	mine := maps.Clone(c.drills)
	c.mu.Unlock()
	// Read after the runners: a drill that ended meanwhile is gone from it.
	st := c.fsm.read()
	for _, g := range st.Groups {
		d := g.Drill
		if d == nil {
			continue
		}
		if _, ok := mine[d.ID]; ok && d.Node == c.cfg.ID {
			continue
		}
		c.log.Warn().Str("group", g.Name).Str("drill", d.ID).Msg("drill interrupted: the controller that ran it stopped or lost the lead; cleaning up")
		r := st.report(d.ID)
		if r == nil {
			r = &Report{ID: d.ID, Group: g.Name, Kind: d.Kind}
		}
		final := *r
		final.Outcome, final.EndedMs = OutcomeInterrupted, time.Now().UnixMilli()
		switch d.Kind {
		case DrillVerify:
			final.Reason = "the controller running it stopped or lost the lead; DR apply resumed" + c.dropDrillSlots(ctx, g)
		case DrillPromote:
			final.Reason = "the controller running it stopped or lost the lead; the standby drops its clone"
		default:
			final.Reason = fmt.Sprintf("the controller running it stopped or lost the lead; site %s is the primary (haven ctl status)", g.PrimarySite)
		}
		c.finish(ctx, &final)
	}
}

// dropDrillSlots drops the temporary slots of verify drills left on a
// group's primary (they end with their connection, but a connection that
// was cut without a word lingers until the server notices).
func (c *Controller) dropDrillSlots(ctx context.Context, g *Group) string {
	url := c.route(g.PrimaryURL())
	if url == "" {
		return ""
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(cctx, url)
	if err != nil {
		return "; the primary could not be reached to drop a drill's leftover slot (haven_drill_*): it goes with its connection"
	}
	defer conn.Close(context.Background())
	var dropped []string
	rows, err := conn.Query(cctx, `SELECT slot_name, pg_drop_replication_slot(slot_name) IS NULL FROM pg_replication_slots
		WHERE starts_with(slot_name, $1) AND NOT active`, drillSlotPrefix)
	if err == nil {
		for rows.Next() {
			var name string
			var ignored bool
			if rows.Scan(&name, &ignored) == nil {
				dropped = append(dropped, name)
			}
		}
		rows.Close()
	}
	if len(dropped) > 0 {
		return fmt.Sprintf("; dropped leftover slots %v", dropped)
	}
	return ""
}

// overdueDrills alerts when a scheduled kind of drill has not passed
// within two of its intervals.
func (c *Controller) overdueDrills(st *State, now time.Time) {
	for _, sc := range st.Schedules {
		if why := overdue(sc, st.Groups[sc.Group], now); why != "" {
			c.log.Error().Str("group", sc.Group).Msg(why)
			_, _ = c.propose(command{Kind: cmdDrillAlert, AtMs: now.UnixMilli(), Group: sc.Group, Reason: why, Drill: &drillCommand{}})
		}
	}
}

// overdue says why a schedule's kind of drill is overdue on its group: none
// passed within two intervals (and a minute) since the last that did, or
// since the schedule began. "" when it is not, or the group alerts already.
func overdue(sc *Schedule, g *Group, now time.Time) string {
	if g == nil || g.DrillAlert != "" || g.Drill != nil {
		return ""
	}
	since := time.UnixMilli(max(g.DrillPassedMs[sc.Kind], sc.CreatedMs))
	window := 2*sc.interval(since) + time.Minute
	if now.Sub(since) <= window {
		return ""
	}
	return fmt.Sprintf("no %s drill of group %s has passed since %s; schedule %s (%q) expects one within %s",
		sc.Kind, sc.Group, since.UTC().Format(time.RFC3339), sc.ID, sc.Cron, window)
}

// startDrill starts a drill on the leader and runs it in the background;
// it returns the report as started (or skipped).
func (c *Controller) startDrill(ctx context.Context, group, kind, trigger, actor string, sc *Schedule, slotMs int64, missed int, skip string) (*Report, error) {
	st := c.fsm.read()
	g := st.Groups[group]
	if g == nil {
		return nil, fmt.Errorf("no group %q", group)
	}
	c.mu.Lock()
	c.drillStarting++
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.drillStarting--
		c.mu.Unlock()
	}()
	rpo := c.measureRPO(ctx, g)
	res, err := c.propose(command{Kind: cmdDrillStart, AtMs: time.Now().UnixMilli(), Group: group, Actor: actor, Node: c.cfg.ID,
		Drill: &drillCommand{Kind: kind, Trigger: trigger, Schedule: sc, SlotMs: slotMs, Missed: missed, RPO: &rpo, Skip: skip}})
	if err != nil {
		return nil, err
	}
	r := res.(Report)
	if r.Outcome != OutcomeRunning {
		c.log.Warn().Str("group", group).Str("drill", r.ID).Str("reason", r.Reason).Msg("drill skipped")
		c.publish(&r)
		return &r, nil
	}
	c.mu.Lock()
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), drillTimeout)
	c.drills[r.ID] = cancel
	c.mu.Unlock()
	c.log.Info().Str("group", group).Str("drill", r.ID).Str("kind", kind).Str("trigger", trigger).Msg("drill started")
	go func() {
		defer cancel()
		final := c.runDrill(dctx, r)
		// Recorded even when the drill ran out of time.
		c.finish(context.WithoutCancel(dctx), final)
		c.mu.Lock()
		delete(c.drills, r.ID)
		c.mu.Unlock()
	}()
	return &r, nil
}

// measureRPO is how far DR is behind: the primary's WAL position against
// the standby's last report.
func (c *Controller) measureRPO(ctx context.Context, g *Group) RPO {
	rpo := RPO{UnappliedMessages: g.UnappliedMessages, SecondsBehind: g.LagSeconds, Incomplete: g.DRIncomplete}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	conn, err := pgx.Connect(cctx, c.route(g.PrimaryURL()))
	if err != nil {
		return rpo
	}
	defer conn.Close(context.Background())
	var current uint64
	if conn.QueryRow(cctx, `SELECT (pg_current_wal_lsn() - '0/0')::bigint`).Scan(&current) == nil && current > g.AppliedLSN && g.AppliedLSN > 0 {
		rpo.BytesBehind = current - g.AppliedLSN
	}
	return rpo
}

// finish records a drill's final report, publishes it and logs it.
func (c *Controller) finish(ctx context.Context, r *Report) {
	r.judge()
	if r.EndedMs == 0 {
		r.EndedMs = time.Now().UnixMilli()
	}
	for attempt := 0; ; attempt++ {
		_, err := c.propose(command{Kind: cmdDrillFinish, AtMs: time.Now().UnixMilli(), Group: r.Group, Drill: &drillCommand{Report: r}})
		if err == nil {
			break
		}
		if attempt == 10 || ctx.Err() != nil {
			c.log.Error().Err(err).Str("drill", r.ID).Msg("could not record the drill's report; the next leader ends it as interrupted")
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	ev := c.log.Info()
	if r.Outcome != OutcomePassed {
		ev = c.log.Error()
	}
	ev.Str("group", r.Group).Str("drill", r.ID).Str("kind", r.Kind).Str("outcome", r.Outcome).Str("reason", r.Reason).
		Float64("apply_held_seconds", r.HeldSeconds).Msg("drill ended; haven ctl drill show " + r.ID + " has the report")
	c.publish(r)
}

// publish sends a report to haven.drills.<group> when the node has NATS.
func (c *Controller) publish(r *Report) {
	if c.cfg.NATSURL == "" {
		return
	}
	c.natsMu.Lock()
	defer c.natsMu.Unlock()
	if c.nc == nil {
		nc, err := nats.Connect(c.cfg.NATSURL, nats.Name("haven-controller-"+c.cfg.ID), nats.MaxReconnects(-1))
		if err != nil {
			c.log.Warn().Err(err).Msg("could not connect to NATS to publish a drill report; it is kept in the controllers' state")
			return
		}
		c.nc = nc
	}
	data, err := json.Marshal(r)
	if err == nil {
		err = c.nc.Publish(wire.DrillSubject(r.Group), data)
	}
	if err != nil {
		c.log.Warn().Err(err).Msg("could not publish a drill report on NATS; it is kept in the controllers' state")
	}
}

// runDrill runs a drill and returns its final report.
func (c *Controller) runDrill(ctx context.Context, r Report) *Report {
	var err error
	switch r.Kind {
	case DrillVerify:
		err = c.verify(ctx, &r)
	case DrillPromote:
		err = c.promoteDrill(ctx, &r)
	case DrillSwitchover:
		err = c.switchoverDrill(ctx, &r)
	default:
		err = fmt.Errorf("%s drills are not available yet", r.Kind)
	}
	if errors.Is(err, errDrillGone) {
		r.Outcome, r.Reason = OutcomeInterrupted, joinReason(err.Error(), r.Reason)
	} else if err != nil {
		r.Outcome, r.Reason = OutcomeFailed, joinReason(err.Error(), r.Reason)
	}
	return &r
}

// errDrillGone: the drill ended under its runner (a failover began).
var errDrillGone = errors.New("the drill was ended while it ran: a failover or switchover began")

// step times one step of a drill into its report.
func step(r *Report, name string, f func() (string, error)) error {
	started := time.Now()
	detail, err := f()
	r.Steps = append(r.Steps, Step{Name: name, Seconds: time.Since(started).Seconds(), Detail: detail})
	return err
}

// waitDrill polls the state, and cond, until cond holds for the group of
// the drill under way (or fails); context.DeadlineExceeded after timeout,
// errDrillGone once the drill has ended under its runner.
func (c *Controller) waitDrill(ctx context.Context, r *Report, timeout time.Duration, cond func(g *Group) (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		g := c.fsm.read().Groups[r.Group]
		if g == nil || g.Drill == nil || g.Drill.ID != r.ID {
			return errDrillGone
		}
		if ok, err := cond(g); ok || err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return context.DeadlineExceeded
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// connectDrill connects to a site's database for a drill, under the
// settings both sides print values with.
func connectDrill(ctx context.Context, url string, replication bool) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return nil, err
	}
	maps.Copy(cfg.RuntimeParams, wire.TextFormatSettings)
	cfg.RuntimeParams["application_name"] = "haven_drill"
	// Literals in the drill's SQL are quoted for it; a drill reads whole
	// tables, and holds its snapshots idle meanwhile.
	cfg.RuntimeParams["standard_conforming_strings"] = "on"
	maps.Copy(cfg.RuntimeParams, wire.SessionSettings)
	if replication {
		cfg.RuntimeParams["replication"] = "database"
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err == nil && !replication {
		_, _ = conn.Exec(ctx, "SET idle_session_timeout = 0") // PostgreSQL 14 and later
	}
	return conn, err
}

// verify runs a verify drill: check that a snapshot of the primary can
// be taken at once, hold DR, export the primary's snapshot at X, let DR
// apply up to X, export DR's snapshot there, let DR go on, compare.
func (c *Controller) verify(ctx context.Context, r *Report) error {
	g := c.fsm.read().Groups[r.Group]
	primaryURL, drURL := c.route(g.PrimaryURL()), c.route(g.StandbyURLs[g.DRSite])
	p, d := &side{name: "the primary"}, &side{name: "DR"}
	defer p.close()
	defer d.close()
	err := step(r, "check the primary for long transactions", func() (string, error) {
		return "", longTransactions(ctx, primaryURL)
	})
	if err != nil {
		return err
	}
	if err := c.drillPhase(r, drillHold, 0); err != nil {
		return err
	}
	err = step(r, "hold DR apply", func() (string, error) {
		err := c.waitDrill(ctx, r, drillHoldTimeout, func(g *Group) (bool, error) { return g.Drill.HeldMs > 0, nil })
		if errors.Is(err, context.DeadlineExceeded) {
			return "", fmt.Errorf("the standby of site %s did not hold apply within %s: is it running and checking in with the controllers?", g.DRSite, drillHoldTimeout)
		}
		return "", err
	})
	if err != nil {
		return err
	}
	var cut pglogrepl.LSN
	err = step(r, "export the primary's snapshot", func() (string, error) {
		var err error
		cut, err = exportPrimary(ctx, p, primaryURL, r.ID)
		return "", err
	})
	if err != nil {
		return err
	}
	r.LSN = cut.String()
	if err := c.drillPhase(r, drillCut, cut); err != nil {
		return err
	}
	var held uint64
	err = step(r, "apply DR up to the snapshot's LSN", func() (string, error) {
		err := c.waitDrill(ctx, r, drillCutTimeout, func(g *Group) (bool, error) { held = g.Drill.HeldLSN; return g.Drill.AtCut, nil })
		if errors.Is(err, context.DeadlineExceeded) {
			return "", fmt.Errorf("DR did not reach %s within %s: it stops there when a transaction or heartbeat committed after it arrives (the agent's --heartbeat-interval); is the agent running?", cut, drillCutTimeout)
		}
		return "", err
	})
	if err != nil {
		return err
	}
	err = step(r, "export DR's snapshot", func() (string, error) {
		return exportDR(ctx, d, drURL, r.Group, pglogrepl.LSN(held), cut)
	})
	if err != nil {
		return err
	}
	if err := c.drillPhase(r, drillCompare, 0); err != nil {
		return err
	}
	// From the order to hold, which the standby may have obeyed up to a
	// check-in later: an upper bound.
	r.HeldSeconds = time.Since(time.UnixMilli(r.StartedMs)).Seconds()
	return step(r, "compare the tables", func() (string, error) {
		var tables []checkedTable
		err := p.inSnapshot(ctx, func(tx pgx.Tx) error {
			var err error
			tables, err = verifyTables(ctx, tx, r.Group)
			return err
		})
		if err != nil {
			return "", err
		}
		if len(tables) == 0 {
			return "", fmt.Errorf("publication %s on the primary replicates no table", wire.PublicationName(r.Group))
		}
		var differ, skipped []string
		for _, t := range tables {
			if g := c.fsm.read().Groups[r.Group]; g == nil || g.Drill == nil || g.Drill.ID != r.ID {
				return "", errDrillGone // a failover: let go of DR at once
			}
			check := TableCheck{Table: t.String(), NotCompared: true, Detail: "not compared: its publication filters its rows (WHERE)"}
			if !t.filtered {
				check = compareTable(ctx, p, d, t)
			}
			r.Tables = append(r.Tables, check)
			switch {
			case check.NotCompared:
				skipped = append(skipped, check.Table)
			case !check.Match:
				differ = append(differ, check.Table)
			}
		}
		result := fmt.Sprintf("%d of %d tables equal at %s", len(tables)-len(skipped), len(tables), cut)
		r.Outcome = OutcomePassed
		if len(differ) > 0 {
			r.Outcome = OutcomeFailed
			result = fmt.Sprintf("%d of %d tables differ at %s: %v", len(differ), len(tables), cut, differ)
		}
		if len(skipped) > 0 {
			result += fmt.Sprintf("; not compared: %v", skipped)
		}
		r.Reason = joinReason(result, r.Reason)
		return fmt.Sprintf("%d tables", len(tables)), nil
	})
}

func (c *Controller) drillPhase(r *Report, phase string, cut pglogrepl.LSN) error {
	_, err := c.propose(command{Kind: cmdDrillPhase, AtMs: time.Now().UnixMilli(), Group: r.Group, Drill: &drillCommand{ID: r.ID, Phase: phase, CutLSN: uint64(cut)}})
	return err
}

// longTransactions refuses a snapshot that would hold DR: creating a slot
// waits for every transaction with an id that is running, so one open for
// long (or a prepared one) would keep DR apply held for as long.
func longTransactions(ctx context.Context, url string) error {
	conn, err := connectDrill(ctx, url, false)
	if err != nil {
		return fmt.Errorf("connect to the primary: %w", err)
	}
	defer conn.Close(context.Background())
	var open []string
	rows, err := conn.Query(ctx, `SELECT format('pid %s (%s, open %s)', pid, coalesce(nullif(application_name, ''), usename), date_trunc('second', now() - xact_start))
		FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND xact_start < now() - $1::interval
		UNION ALL SELECT format('prepared transaction %L (since %s)', gid, prepared) FROM pg_prepared_xacts WHERE prepared < now() - $1::interval`,
		drillLongTransaction.String())
	if err == nil {
		open, err = pgx.CollectRows(rows, pgx.RowTo[string])
	}
	if err != nil {
		return fmt.Errorf("look for long transactions on the primary: %w", err)
	}
	if len(open) > 0 {
		return fmt.Errorf("transactions have been writing on the primary for over %s: %v; a consistent snapshot waits for them to end, and DR apply would be held as long: not started",
			drillLongTransaction, open)
	}
	return nil
}

// drillLongTransaction is how long a transaction may have been open on the
// primary for a verify drill to start, and drillSlotTimeout how long the
// snapshot may then take (DR is held meanwhile).
const (
	drillLongTransaction = 5 * time.Second
	drillSlotTimeout     = 10 * time.Second
)

// exportPrimary takes the primary's snapshot with a temporary slot, whose
// consistent point is the cut: the snapshot sees exactly the transactions
// that committed before it. The slot's replication connection holds the
// snapshot (and the slot) until the drill ends.
func exportPrimary(ctx context.Context, p *side, url, id string) (pglogrepl.LSN, error) {
	var err error
	if p.holder, err = connectDrill(ctx, url, true); err != nil {
		return 0, fmt.Errorf("open a replication connection to the primary: %w", err)
	}
	sctx, cancel := context.WithTimeout(ctx, drillSlotTimeout)
	defer cancel()
	slot, err := pglogrepl.CreateReplicationSlot(sctx, p.holder.PgConn(), drillSlotPrefix+id, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Temporary: true, SnapshotAction: "EXPORT_SNAPSHOT", Mode: pglogrepl.LogicalReplication})
	if err != nil {
		var pgErr *pgconn.PgError
		switch {
		case sctx.Err() != nil:
			return 0, fmt.Errorf("the primary's snapshot waited %s for transactions running there to end; DR apply is not held longer", drillSlotTimeout)
		case errors.As(err, &pgErr) && pgErr.Code == "53400":
			return 0, fmt.Errorf("create a temporary slot on the primary: %w: a verify drill needs one free replication slot and WAL sender (max_replication_slots, max_wal_senders)", err)
		}
		return 0, fmt.Errorf("create a temporary slot on the primary: %w", err)
	}
	cut, err := pglogrepl.ParseLSN(slot.ConsistentPoint)
	if err != nil {
		return 0, fmt.Errorf("the slot's consistent point %q: %w", slot.ConsistentPoint, err)
	}
	p.snapshot = slot.SnapshotName
	if p.reader, err = connectDrill(ctx, url, false); err != nil {
		return 0, fmt.Errorf("connect to the primary: %w", err)
	}
	return cut, nil
}

// exportDR takes DR's snapshot where apply holds, once it holds at the cut
// (held: its last applied commit, which DR's position must show). The
// exporting transaction holds the snapshot until the drill ends.
func exportDR(ctx context.Context, d *side, url, group string, held, cut pglogrepl.LSN) (string, error) {
	var err error
	if d.holder, err = connectDrill(ctx, url, false); err != nil {
		return "", fmt.Errorf("connect to the DR database: %w", err)
	}
	tx, err := d.holder.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return "", err
	}
	var applied pglogrepl.LSN
	var lsn string
	if err := tx.QueryRow(ctx, `SELECT pg_export_snapshot(), commit_lsn::text FROM haven.apply_position WHERE group_name = $1`, group).Scan(&d.snapshot, &lsn); err != nil {
		return "", fmt.Errorf("read DR's apply position: %w", err)
	}
	if applied, err = pglogrepl.ParseLSN(lsn); err != nil {
		return "", err
	}
	if applied != held || applied >= cut {
		return "", fmt.Errorf("DR applied through %s when read, not %s where it said it held before the cut %s: its hold ran out, or another standby applies there", applied, held, cut)
	}
	if d.reader, err = connectDrill(ctx, url, false); err != nil {
		return "", fmt.Errorf("connect to the DR database: %w", err)
	}
	return "DR applied through " + lsn, nil
}

// promoteDrill has the DR standby rehearse the promotion on a clone of its
// cluster (replicator/rehearse.go) and predicts the RTO: detection
// (failover_after), the standby hearing the order (a check-in), draining
// DR's lag, and the promotion's steps as timed on the clone.
func (c *Controller) promoteDrill(ctx context.Context, r *Report) error {
	var d ActiveDrill
	err := c.waitDrill(ctx, r, drillTimeout, func(g *Group) (bool, error) { d = *g.Drill; return d.Done, nil })
	r.Steps = append(r.Steps, d.Steps...)
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("the standby did not finish the rehearsal within %s", drillTimeout)
	}
	if err != nil {
		return err
	}
	if d.Error != "" {
		return fmt.Errorf("the rehearsal failed: %s", d.Error)
	}
	predicted := []Step{
		{Name: "predicted: detection", Seconds: c.cfg.Policy.FailoverAfter.Seconds(), Detail: "failover_after: a majority sees the primary down this long"},
		{Name: "predicted: the standby hears the order", Seconds: 0.5, Detail: "at most one check-in"},
		{Name: "predicted: drain DR's lag", Seconds: r.RPO.SecondsBehind, Detail: "DR's lag when the drill started"},
	}
	r.RTOSeconds, r.RTOPredicted = 0, true
	for _, s := range predicted {
		r.RTOSeconds += s.Seconds
	}
	for _, s := range d.Steps {
		if s.Name == "promotion: sequences" || s.Name == "promotion: writable" {
			r.RTOSeconds += s.Seconds
		}
	}
	r.Steps = append(r.Steps, predicted...)
	r.Outcome = OutcomePassed
	r.Reason = joinReason(fmt.Sprintf("the promotion ran on a clone of the DR cluster; predicted RTO %.2fs", r.RTOSeconds), r.Reason)
	return nil
}
