package replicator

import (
	"context"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/haven-dr/haven/proto/havenpb"
)

// Verify drills (failover/verify.go) compare DR with the primary at one
// LSN: the controllers tell the standby, at check-in, to hold apply at the
// next transaction boundary, then to apply every transaction that
// committed before the cut LSN and hold there, until they have read DR. The
// hold is bounded here too: a standby that hears nothing more applies
// again after maxDrillHold.

// maxDrillHold is the longest apply holds for one drill.
const maxDrillHold = 2 * time.Minute

// drillOrder is a drill's hold, as the last check-in gave it.
type drillOrder struct {
	id  string
	cut pglogrepl.LSN // 0: hold at the next transaction boundary
}

// drillHeld is what apply reports back: it holds for drill id, at lsn
// (its last applied commit), and whether that is at the cut.
type drillHeld struct {
	id    string
	lsn   pglogrepl.LSN
	atCut bool
	since time.Time
}

// holdForDrill is called before each message (next; nil when none came):
// it returns true while apply must hold, next kept for later. A hold
// commits what is applied, so that the controllers read it.
func (s *Standby) holdForDrill(ctx context.Context, a *applier, next *inbound) (bool, error) {
	o := s.control.drill.Load()
	held := s.control.held.Load()
	if expired := s.control.expired.Load(); o != nil && expired != nil && *expired == o.id {
		o = nil
	}
	if o == nil || s.control.promoteTo.Load() > s.control.promoted.Load() ||
		!a.next.snapshotDone || a.load != nil || a.partial != nil {
		if o == nil && held != nil {
			s.log.Info().Str("drill", held.id).Dur("held", time.Since(held.since)).Msg("drill: applying again")
			s.control.held.Store(nil)
		}
		return false, nil
	}
	if o.cut != 0 {
		if next == nil {
			// Whether the cut is reached shows with the next transaction.
			return held != nil && held.atCut, nil
		}
		if next.chunk == nil || next.chunk.Kind != havenpb.Kind_KIND_TRANSACTION || next.chunk.CommitLsn < uint64(o.cut) {
			// Committed before the cut (DR must have it), or not a
			// transaction at all (apply says what it is).
			return false, nil
		}
	}
	since := time.Now()
	if held != nil && held.id == o.id {
		since = held.since
		if time.Since(since) > maxDrillHold {
			s.log.Error().Str("drill", o.id).Dur("held", time.Since(since)).
				Msg("drill: apply held this long without word from the controllers; applying again (the drill fails)")
			s.control.expired.Store(&o.id)
			s.control.held.Store(nil)
			return false, nil
		}
	}
	if a.open || len(a.sent) > 0 {
		if err := a.commit(ctx); err != nil {
			return false, err
		}
	}
	atCut := o.cut != 0
	if held == nil || held.id != o.id || held.atCut != atCut {
		s.log.Info().Str("drill", o.id).Stringer("applied_lsn", a.pos.commitLSN).Stringer("cut_lsn", o.cut).Bool("at_cut", atCut).Msg("drill: apply holds")
	}
	s.control.held.Store(&drillHeld{id: o.id, lsn: a.pos.commitLSN, atCut: atCut, since: since})
	return true, nil
}
