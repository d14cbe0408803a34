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
	drillTimeout     = time.Hour        // for the whole drill
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
			continue
		}
		now := time.Now()
		st := c.fsm.read()
		c.endOrphanDrills(ctx, st)
		for _, sc := range st.Schedules {
			slot, missed, ok := sc.dueSlot(now)
			if !ok {
				continue
			}
			trigger := fmt.Sprintf("schedule %s (%q), slot %s", sc.ID, sc.Cron, slot.UTC().Format(time.RFC3339))
			if _, err := c.startDrill(ctx, sc.Group, sc.Kind, trigger, "controller@"+c.cfg.ID, &Schedule{ID: sc.ID}, slot.UnixMilli(), missed); err != nil && !errors.Is(err, errSlotFired) {
				c.log.Error().Err(err).Str("schedule", sc.ID).Msg("could not start a scheduled drill")
			}
		}
		c.overdueDrills(st, now)
	}
}

// endOrphanDrills interrupts the drills this node does not run.
func (c *Controller) endOrphanDrills(ctx context.Context, st *State) {
	c.mu.Lock()
	starting := c.drillStarting > 0
	c.mu.Unlock()
	if starting {
		return
	}
	for _, g := range st.Groups {
		d := g.Drill
		if d == nil {
			continue
		}
		c.mu.Lock()
		_, mine := c.drills[d.ID]
		c.mu.Unlock()
		if mine && d.Node == c.cfg.ID {
			continue
		}
		c.log.Warn().Str("group", g.Name).Str("drill", d.ID).Msg("drill interrupted: the controller that ran it stopped or lost the lead; cleaning up")
		r := st.report(d.ID)
		if r == nil {
			r = &Report{ID: d.ID, Group: g.Name, Kind: d.Kind}
		}
		final := *r
		final.Outcome, final.EndedMs, final.Reason = OutcomeInterrupted, time.Now().UnixMilli(),
			"the controller running it stopped or lost the lead; DR apply resumed"
		final.Reason += c.dropDrillSlots(ctx, g)
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
		WHERE slot_name LIKE $1 AND NOT active`, drillSlotPrefix+"%")
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
		g := st.Groups[sc.Group]
		if g == nil || g.DrillAlert != "" || g.Drill != nil {
			continue
		}
		since := max(g.DrillPassedMs[sc.Kind], sc.CreatedMs)
		window := 2*sc.interval(time.UnixMilli(since)) + time.Minute
		if now.Sub(time.UnixMilli(since)) <= window {
			continue
		}
		why := fmt.Sprintf("no %s drill of group %s has passed since %s; schedule %s (%q) expects one within %s",
			sc.Kind, sc.Group, time.UnixMilli(since).UTC().Format(time.RFC3339), sc.ID, sc.Cron, window)
		c.log.Error().Str("group", sc.Group).Msg(why)
		_, _ = c.propose(command{Kind: cmdDrillAlert, AtMs: now.UnixMilli(), Group: sc.Group, Reason: why, Drill: &drillCommand{}})
	}
}

// startDrill starts a drill on the leader and runs it in the background;
// it returns the report as started (or skipped).
func (c *Controller) startDrill(ctx context.Context, group, kind, trigger, actor string, sc *Schedule, slotMs int64, missed int) (*Report, error) {
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
		Drill: &drillCommand{Kind: kind, Trigger: trigger, Schedule: sc, SlotMs: slotMs, Missed: missed, RPO: &rpo}})
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
		c.finish(dctx, final)
		c.mu.Lock()
		delete(c.drills, r.ID)
		c.mu.Unlock()
	}()
	return &r, nil
}

// measureRPO is how far DR is behind: the primary's WAL position against
// the standby's last report.
func (c *Controller) measureRPO(ctx context.Context, g *Group) RPO {
	rpo := RPO{UnappliedMessages: g.UnappliedMessages, SecondsBehind: g.LagSeconds}
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
	c.mu.Lock()
	defer c.mu.Unlock()
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

// waitDrill polls the state until cond holds for the group's drill.
func (c *Controller) waitDrill(ctx context.Context, r *Report, timeout time.Duration, cond func(*ActiveDrill) bool) error {
	deadline := time.Now().Add(timeout)
	for {
		g := c.fsm.read().Groups[r.Group]
		if g == nil || g.Drill == nil || g.Drill.ID != r.ID {
			return errDrillGone
		}
		if cond(g.Drill) {
			return nil
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
	if replication {
		cfg.RuntimeParams["replication"] = "database"
	}
	return pgx.ConnectConfig(ctx, cfg)
}

// verify runs a verify drill: hold DR, export the primary's snapshot at X,
// let DR apply up to X, take DR's snapshot, let DR go on, compare.
func (c *Controller) verify(ctx context.Context, r *Report) error {
	g := c.fsm.read().Groups[r.Group]
	var primary, dr pgx.Tx
	defer func() {
		for _, tx := range []pgx.Tx{primary, dr} {
			if tx != nil {
				_ = tx.Rollback(context.Background())
				tx.Conn().Close(context.Background())
			}
		}
	}()
	err := step(r, "hold DR apply", func() (string, error) {
		err := c.waitDrill(ctx, r, drillHoldTimeout, func(d *ActiveDrill) bool { return d.HeldMs > 0 })
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
		primary, cut, err = exportSnapshot(ctx, c.route(g.PrimaryURL()), r.ID)
		return "", err
	})
	if err != nil {
		return err
	}
	r.LSN = cut.String()
	if _, err := c.propose(command{Kind: cmdDrillPhase, AtMs: time.Now().UnixMilli(), Group: r.Group, Drill: &drillCommand{ID: r.ID, Phase: drillCut, CutLSN: uint64(cut)}}); err != nil {
		return err
	}
	err = step(r, "apply DR up to the snapshot's LSN", func() (string, error) {
		err := c.waitDrill(ctx, r, drillCutTimeout, func(d *ActiveDrill) bool { return d.AtCut })
		if errors.Is(err, context.DeadlineExceeded) {
			return "", fmt.Errorf("DR did not reach %s within %s: it stops there when a transaction or heartbeat committed after it arrives (the agent's --heartbeat-interval); is the agent running?", cut, drillCutTimeout)
		}
		return "", err
	})
	if err != nil {
		return err
	}
	err = step(r, "take DR's snapshot", func() (string, error) {
		var err error
		dr, err = beginRead(ctx, c.route(g.StandbyURLs[g.DRSite]))
		if err != nil {
			return "", fmt.Errorf("read the DR database of site %s: %w", g.DRSite, err)
		}
		var applied string
		if err := dr.QueryRow(ctx, `SELECT commit_lsn::text FROM haven.apply_position WHERE group_name = $1`, r.Group).Scan(&applied); err != nil {
			return "", fmt.Errorf("read DR's apply position: %w", err)
		}
		return "DR applied through " + applied, nil
	})
	if err != nil {
		return err
	}
	if _, err := c.propose(command{Kind: cmdDrillPhase, AtMs: time.Now().UnixMilli(), Group: r.Group, Drill: &drillCommand{ID: r.ID, Phase: drillCompare}}); err != nil {
		return err
	}
	// From the order to hold, which the standby may have obeyed up to a
	// check-in later: an upper bound.
	r.HeldSeconds = time.Since(time.UnixMilli(r.StartedMs)).Seconds()
	return step(r, "compare the tables", func() (string, error) {
		tables, err := verifyTables(ctx, primary, r.Group)
		if err != nil {
			return "", err
		}
		if len(tables) == 0 {
			return "", fmt.Errorf("publication %s on the primary replicates no table", wire.PublicationName(r.Group))
		}
		var differ []string
		for _, t := range tables {
			check := compareTable(ctx, primary, dr, t)
			r.Tables = append(r.Tables, check)
			if !check.Match {
				differ = append(differ, check.Table)
			}
		}
		if len(differ) > 0 {
			r.Outcome = OutcomeFailed
			r.Reason = joinReason(fmt.Sprintf("%d of %d tables differ at %s: %v", len(differ), len(tables), cut, differ), r.Reason)
		} else {
			r.Outcome = OutcomePassed
			r.Reason = joinReason(fmt.Sprintf("%d tables equal at %s", len(tables), cut), r.Reason)
		}
		return fmt.Sprintf("%d tables", len(tables)), nil
	})
}

// exportSnapshot opens a read-only transaction on the primary under the
// snapshot of a new temporary slot, and returns it with the slot's LSN:
// the transaction sees exactly the transactions that committed before it.
// The slot goes with its connection, closed here once the snapshot is in
// use.
func exportSnapshot(ctx context.Context, url, id string) (pgx.Tx, pglogrepl.LSN, error) {
	repl, err := connectDrill(ctx, url, true)
	if err != nil {
		return nil, 0, fmt.Errorf("open a replication connection to the primary: %w", err)
	}
	defer repl.Close(context.Background())
	slot, err := pglogrepl.CreateReplicationSlot(ctx, repl.PgConn(), drillSlotPrefix+id, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Temporary: true, SnapshotAction: "EXPORT_SNAPSHOT", Mode: pglogrepl.LogicalReplication})
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "53400" {
			return nil, 0, fmt.Errorf("create a temporary slot on the primary: %w: a verify drill needs one free replication slot and WAL sender (max_replication_slots, max_wal_senders)", err)
		}
		return nil, 0, fmt.Errorf("create a temporary slot on the primary: %w", err)
	}
	cut, err := pglogrepl.ParseLSN(slot.ConsistentPoint)
	if err != nil {
		return nil, 0, fmt.Errorf("the slot's consistent point %q: %w", slot.ConsistentPoint, err)
	}
	tx, err := beginRead(ctx, url)
	if err != nil {
		return nil, 0, fmt.Errorf("read the primary: %w", err)
	}
	if _, err := tx.Exec(ctx, "SET TRANSACTION SNAPSHOT "+quoteLiteral(slot.SnapshotName)); err != nil {
		_ = tx.Rollback(context.Background())
		tx.Conn().Close(context.Background())
		return nil, 0, fmt.Errorf("import the slot's snapshot: %w", err)
	}
	return tx, cut, nil
}

// beginRead opens a read-only REPEATABLE READ transaction: its snapshot is
// taken by its first statement.
func beginRead(ctx context.Context, url string) (pgx.Tx, error) {
	conn, err := connectDrill(ctx, url, false)
	if err != nil {
		return nil, err
	}
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		conn.Close(context.Background())
		return nil, err
	}
	return tx, nil
}
