package replicator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"github.com/haven-dr/haven/internal/controlclient"
	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// The standby of the DR site checks in with the controller quorum; when the
// quorum orders it to promote, it drains the stream (applies every message
// the old primary's agent published before it was fenced), moves every
// sequence past what the primary can have handed out, makes the DR database
// writable, records the promotion, announces the new topology on NATS and
// runs the operator's hook. From then on it applies nothing: the database is
// the group's primary at the new epoch.

// promotionDDL records promotions on the DR database.
const promotionDDL = `CREATE TABLE IF NOT EXISTS haven.promotions (
	group_name  text PRIMARY KEY,
	epoch       bigint NOT NULL,
	promoted_at timestamptz NOT NULL DEFAULT now(),
	commit_lsn  pg_lsn NOT NULL,
	steps       jsonb NOT NULL
);
COMMENT ON TABLE haven.promotions IS 'haven: this database was promoted to primary of the group at this epoch; the standby applies nothing after it'`

// errPromoted ends an apply session once the database is primary.
var errPromoted = errors.New("promoted")

// controlState is what the standby shares with its check-ins.
type controlState struct {
	promoteTo atomic.Uint64 // epoch the quorum ordered a promotion to
	// ordered wakes apply at a new promotion order: with the primary
	// fenced, no message would, and writes wait for the promotion.
	ordered    chan struct{}
	promoted   atomic.Uint64 // epoch this database was promoted to
	appliedLSN atomic.Uint64 // last source commit applied
	unapplied  atomic.Uint64 // stream messages not applied yet
	lag        lagClock
	answered   atomic.Bool // the quorum answered a check-in
	apply      atomic.Bool // the quorum lets this site apply
	reseed     atomic.Bool // … replacing what the database holds
	reseeded   atomic.Bool // the replacement snapshot is loaded
	// What the DR copy lacks that the primary has ("" when complete; nil
	// until a session has read it).
	incomplete atomic.Pointer[string]
	// A drill's hold (drill.go): as ordered, as apply holds it, and the
	// drill whose hold ran out.
	drill   atomic.Pointer[drillOrder]
	held    atomic.Pointer[drillHeld]
	expired atomic.Pointer[string]
}

// incomplete says what the DR copy lacks that the primary has ("" when
// nothing): promoting it now would lose that.
func (a *applier) incomplete() string {
	switch {
	case !a.pos.snapshotDone && a.pos.snapshotLSN == 0:
		return "no initial snapshot is loaded"
	case !a.pos.snapshotDone:
		return fmt.Sprintf("the initial snapshot at %s is only partly loaded", a.pos.snapshotLSN)
	case len(a.backfilling) > 0:
		names := slices.Sorted(maps.Values(a.backfilling))
		more := ""
		if len(names) > 10 {
			names, more = names[:10], fmt.Sprintf(" and %d more", len(names)-10)
		}
		return fmt.Sprintf("%d table(s) joined with rows that are not all copied yet (backfill under way): %s%s", len(a.backfilling), strings.Join(names, ", "), more)
	}
	return ""
}

// reportCompleteness tells the check-ins what the DR copy lacks.
func (a *applier) reportCompleteness() {
	if a.control != nil {
		s := a.incomplete()
		a.control.incomplete.Store(&s)
	}
}

// checkIns reports to the controllers until ctx ends.
func (s *Standby) checkIns(ctx context.Context) {
	clients := controlclient.New(s.cfg.Controllers)
	warned := time.Time{}
	for {
		// Read before the applied position, which the applier stores
		// before it: a check-in that ends a rejoin carries the position the
		// reseed reached.
		reseeded := s.control.reseed.Load() && s.control.reseeded.Load()
		req := &havenpb.CheckInRequest{Group: s.cfg.Group, Site: s.cfg.Site, Component: havenpb.Component_COMPONENT_STANDBY,
			DatabaseUrl: s.cfg.TargetURL, LagSeconds: s.control.lag.seconds(), PromotedEpoch: s.control.promoted.Load(),
			Epoch: s.control.promoted.Load(), AppliedLsn: s.control.appliedLSN.Load(), Reseeded: reseeded,
			UnappliedMessages: s.control.unapplied.Load(), Incomplete: "not known yet: the standby has not read the DR database's position"}
		if p := s.control.incomplete.Load(); p != nil {
			req.Incomplete = *p
		}
		if h := s.control.held.Load(); h != nil {
			req.DrillId, req.DrillHeldLsn, req.DrillAtCut = h.id, uint64(h.lsn), h.atCut
		}
		s.rehearsalMu.Lock()
		if r := s.rehearsal; r != nil {
			r.report(req)
		}
		s.rehearsalMu.Unlock()
		resp, err := clients.CheckIn(ctx, req, time.Second)
		switch {
		case ctx.Err() != nil:
			return
		case resp == nil:
			if time.Since(warned) > 30*time.Second {
				warned = time.Now()
				s.log.Warn().Err(err).Msg("no controller answered the standby's check-in: the quorum cannot see DR's lag, so it will not fail over by itself")
			}
		default:
			// A drill's hold first: apply must know it before it may go on.
			if resp.DrillHold == "" {
				s.control.drill.Store(nil)
			} else {
				s.control.drill.Store(&drillOrder{id: resp.DrillHold, cut: pglogrepl.LSN(resp.DrillCutLsn)})
			}
			s.rehearse(ctx, resp.DrillRehearse)
			if s.control.apply.Swap(resp.Apply) != resp.Apply {
				s.log.Info().Bool("apply", resp.Apply).Bool("reseed", resp.Reseed).Str("primary_site", resp.PrimarySite).Uint64("epoch", resp.Epoch).
					Msg("the controllers changed this site's orders")
			}
			s.control.reseed.Store(resp.Reseed)
			s.control.answered.Store(true)

			if resp.Promote && s.control.promoted.Load() < resp.Epoch && s.control.promoteTo.Swap(resp.Epoch) != resp.Epoch {
				s.log.Warn().Uint64("epoch", resp.Epoch).Msg("the controllers ordered this site's promotion: draining the stream, then promoting")
				select {
				case s.control.ordered <- struct{}{}:
				default:
				}
			}
		}
		interval := 500 * time.Millisecond
		if resp != nil && resp.CheckInMs > 0 {
			interval = time.Duration(resp.CheckInMs) * time.Millisecond
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}

// loadPromotion reads whether the DR database was promoted already.
func (s *Standby) loadPromotion(ctx context.Context, conn *pgx.Conn) error {
	if _, err := conn.Exec(ctx, promotionDDL); err != nil {
		return fmt.Errorf("create haven.promotions: %w", err)
	}
	if s.control.reseed.Load() {
		// Rejoining: this database becomes a standby again.
		if _, err := conn.Exec(ctx, `DELETE FROM haven.promotions WHERE group_name = $1`, s.cfg.Group); err != nil {
			return fmt.Errorf("clear haven.promotions: %w", err)
		}
		s.control.promoted.Store(0)
		// An order to promote given before this site was deposed is spent:
		// kept, it would make the session check the stream's end after every
		// message and, once caught up, promote the database again at an epoch
		// already superseded. A new order is repeated at every check-in.
		s.control.promoteTo.Store(0)
		return nil
	}
	var epoch uint64
	err := conn.QueryRow(ctx, `SELECT epoch FROM haven.promotions WHERE group_name = $1`, s.cfg.Group).Scan(&epoch)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read haven.promotions: %w", err)
	}
	s.control.promoted.Store(epoch)
	return nil
}

// drained reports whether apply has reached the end of the stream, so that
// a promotion may run.
func (a *applier) drained(ctx context.Context) (bool, error) {
	info, err := a.stream.Info(ctx)
	if err != nil {
		return false, fmt.Errorf("read the stream's end: %w", err)
	}
	return a.lastSeq >= info.State.LastSeq, nil
}

// promote makes the DR database the group's primary at epoch.
func (s *Standby) promote(ctx context.Context, a *applier, nc *nats.Conn, epoch uint64) error {
	started := time.Now()
	steps := map[string]float64{}
	step := func(name string, since time.Time) { steps[name] = time.Since(since).Seconds() }
	if a.partial != nil {
		// The old primary's agent stopped in the middle of publishing a
		// transaction: it committed there but never fully reached DR.
		a.log.Error().Uint32("xid", a.partial.xid).Stringer("commit_lsn", pglogrepl.LSN(a.partial.commitLSN)).
			Msg("the stream ends inside a transaction: it committed on the old primary but is not applied here; it is in the old primary's slot (see the lost-transaction report after rejoin)")
		if err := a.rollback(ctx); err != nil {
			return err
		}
	}
	t := time.Now()
	if err := a.finishLoad(ctx); err != nil {
		return err
	}
	if err := a.commit(ctx); err != nil {
		return err
	}
	step("drain", t)
	if lacks := a.incomplete(); lacks != "" {
		// Only a forced failover orders this: the quorum does not promote
		// an incomplete copy by itself.
		a.log.Error().Str("incomplete", lacks).Uint64("epoch", epoch).
			Msg("promoting an INCOMPLETE DR copy, as ordered: the rows it lacks are only on the old primary; copy them from there once it is back")
	}
	if err := makePrimary(ctx, a.conn, s.cfg, epoch, a.pos.commitLSN, steps); err != nil {
		return err
	}
	s.control.appliedLSN.Store(uint64(a.pos.commitLSN))
	s.control.promoted.Store(epoch)
	topology, _ := json.Marshal(map[string]any{"group": s.cfg.Group, "primary_site": s.cfg.Site, "epoch": epoch, "at": time.Now().UTC()})
	if err := nc.Publish(wire.TopologySubject(s.cfg.Group), topology); err != nil {
		s.log.Warn().Err(err).Msg("could not announce the new topology on NATS")
	}
	s.log.Warn().Uint64("epoch", epoch).Stringer("applied_through", a.pos.commitLSN).Interface("steps_seconds", steps).
		Float64("took_seconds", time.Since(started).Seconds()).Msg("PROMOTED: the DR database is the group's primary and accepts writes; apply has stopped")
	if s.cfg.PromoteHook != "" {
		runHook(ctx, s.log, s.cfg.PromoteHook, s.cfg.Group, s.cfg.Site, epoch)
	}
	return errPromoted
}

// makePrimary runs the promotion's steps on a DR database (the DR copy, or
// a promote drill's clone of it): sequences moved past what the primary can
// have handed out, synchronous commit released, the database made writable
// and the promotion recorded, with steps (seconds by step), to which it
// adds its own.
func makePrimary(ctx context.Context, conn *pgx.Conn, cfg Config, epoch uint64, applied pglogrepl.LSN, steps map[string]float64) error {
	step := func(name string, since time.Time) { steps[name] = time.Since(since).Seconds() }
	t := time.Now()
	if err := advanceAllSequences(ctx, conn, cfg.SequenceGap); err != nil {
		return err
	}
	step("sequences", t)
	t = time.Now()
	var db string
	if err := conn.QueryRow(ctx, `SELECT current_database()`).Scan(&db); err != nil {
		return fmt.Errorf("read the database name: %w", err)
	}
	// A former primary in synchronous mode named its agent in
	// synchronous_standby_names: until that agent streams again, every
	// commit here would wait (and the agent's new slot would wait for those
	// commits). The agent names itself again once its slot exists.
	var names string
	if err := conn.QueryRow(ctx, `SELECT current_setting('synchronous_standby_names')`).Scan(&names); err != nil {
		return fmt.Errorf("read synchronous_standby_names: %w", err)
	}
	if names == `"haven_`+cfg.Group+`"` { // the agent's replication connection (wire.SlotName)
		if _, err := conn.Exec(ctx, `ALTER SYSTEM RESET synchronous_standby_names`); err != nil {
			return fmt.Errorf("clear synchronous_standby_names: %w", err)
		}
		if _, err := conn.Exec(ctx, `SELECT pg_reload_conf()`); err != nil {
			return fmt.Errorf("reload the configuration: %w", err)
		}
	}
	stepsJSON, _ := json.Marshal(steps)
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "ALTER DATABASE "+pgx.Identifier{db}.Sanitize()+" RESET default_transaction_read_only"); err != nil {
			return fmt.Errorf("make the DR database writable: %w", err)
		}
		// A former primary's write guard (haven agent) lets writes in
		// from now: the quorum made this site primary at epoch.
		if _, err := tx.Exec(ctx, `DO $$ BEGIN
			IF to_regclass('haven.write_grant') IS NOT NULL THEN
				UPDATE haven.write_grant SET postmaster_start = pg_postmaster_start_time(), unguarded = false, epoch = `+strconv.FormatUint(epoch, 10)+`, granted_at = now();
			END IF; END $$`); err != nil {
			return fmt.Errorf("let writes past the write guard: %w", err)
		}
		_, err := tx.Exec(ctx, `INSERT INTO haven.promotions (group_name, epoch, commit_lsn, steps) VALUES ($1, $2, $3::pg_lsn, $4)
			ON CONFLICT (group_name) DO UPDATE SET epoch = excluded.epoch, promoted_at = now(), commit_lsn = excluded.commit_lsn, steps = excluded.steps`,
			cfg.Group, epoch, applied.String(), string(stepsJSON))
		return err
	})
	if err != nil {
		return fmt.Errorf("promote: %w", err)
	}
	step("writable", t)
	return nil
}

// advanceAllSequences moves every sequence past the values the primary can
// have handed out since its last sampled position: past the largest value
// in the column it feeds, and then gap increments further.
func advanceAllSequences(ctx context.Context, conn *pgx.Conn, gap int64) error {
	rows, err := conn.Query(ctx, `
SELECT s.oid::regclass::text, q.seqincrement, c.tab, c.col
FROM pg_class s JOIN pg_sequence q ON q.seqrelid = s.oid JOIN pg_namespace n ON n.oid = s.relnamespace
LEFT JOIN LATERAL (SELECT d.refobjid::regclass::text AS tab, quote_ident(a.attname) AS col FROM pg_depend d
          JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
         WHERE d.classid = 'pg_class'::regclass AND d.objid = s.oid AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
         LIMIT 1) c ON true
WHERE s.relkind = 'S' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'haven')`)
	if err != nil {
		return fmt.Errorf("list sequences: %w", err)
	}
	type seq struct {
		name      string
		increment int64
		table     *string
		column    *string
	}
	seqs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (seq, error) {
		var s seq
		err := row.Scan(&s.name, &s.increment, &s.table, &s.column)
		return s, err
	})
	if err != nil {
		return fmt.Errorf("list sequences: %w", err)
	}
	for _, sq := range seqs {
		agg, past := "max", "greatest"
		if sq.increment < 0 {
			agg, past = "min", "least"
		}
		used := "NULL"
		if sq.table != nil && sq.column != nil {
			used = fmt.Sprintf("(SELECT %s(%s)::bigint FROM %s)", agg, *sq.column, *sq.table)
		}
		sql := fmt.Sprintf(`SELECT setval(%s, %s(s.last_value, %s, s.start_value) + %d * %d) FROM pg_sequences s WHERE format('%%I.%%I', s.schemaname, s.sequencename)::regclass = %s::regclass`,
			quote(sq.name), past, used, sq.increment, gap, quote(sq.name))
		if _, err := conn.Exec(ctx, sql); err != nil {
			return fmt.Errorf("move sequence %s past the primary's values: %w", sq.name, err)
		}
	}
	return nil
}

func quote(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// runHook runs the operator's promotion hook with the group, site and epoch
// in its environment; its failure is reported, the promotion stands.
func runHook(ctx context.Context, log zerolog.Logger, hook, group, site string, epoch uint64) {
	hctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := exec.CommandContext(hctx, "sh", "-c", hook)
	cmd.Env = append(os.Environ(), "HAVEN_GROUP="+group, "HAVEN_SITE="+site, "HAVEN_EPOCH="+strconv.FormatUint(epoch, 10))
	out, err := cmd.CombinedOutput()
	ev := log.Info()
	if err != nil {
		ev = log.Error().Err(err)
	}
	ev.Str("hook", hook).Str("output", strings.TrimSpace(string(out))).Msg("promotion hook ran")
}

// waitForOrders blocks, with controllers, until the quorum lets this site
// apply: not while it is primary, nor while its database is a deposed
// primary that has not been told to rejoin. It returns false when ctx ends.
func (s *Standby) waitForOrders(ctx context.Context) bool {
	said := ""
	for {
		if s.control.apply.Load() || s.control.promoteTo.Load() > s.control.promoted.Load() {
			// Applying, or promoting: a session drains the stream first.
			return true
		}
		why := "waiting for the controllers to answer"
		switch {
		case s.control.promoted.Load() > 0:
			why = fmt.Sprintf("promoted: this database is the primary of group %s at epoch %d; apply has stopped", s.cfg.Group, s.control.promoted.Load())
		case s.control.answered.Load():
			why = "this site's database is primary, or a deposed primary waiting for haven ctl rejoin: nothing is applied to it"
		}
		if why != said {
			s.log.Warn().Msg(why)
			s.health.Set("")
			said = why
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(100 * time.Millisecond):
		}
	}
}
