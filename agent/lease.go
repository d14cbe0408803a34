package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/haven-dr/haven/internal/controlclient"
	"github.com/haven-dr/haven/internal/fence"
	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// The agent of the primary site holds a lease from the controller quorum,
// renewed at every check-in. Without a renewal for the lease's time to live,
// or told that another site is primary at a newer epoch, it fences its
// database: the controllers promote the DR site only after the lease has run
// out, so there are never two writable primaries.
//
// The fence (internal/fence) stops writes for good, not just by default, and
// outlives a restart. Only an agent whose check-in is granted the current
// epoch's lease lifts it.

// leaseKeeper checks in with the controllers and fences or unfences the
// source database.
type leaseKeeper struct {
	cfg     Config
	log     zerolog.Logger
	clients *controlclient.Clients

	mu         sync.Mutex
	validUntil time.Time // the lease, by this process's clock
	epoch      uint64
	primary    string
	deposed    bool // another site is primary: capture stops
	fenced     bool
	reported   string // the lost-transaction report written for a rejoin
	standbyDB  bool   // a standby applies to the database: it is a DR copy
	confirmed  *atomic.Uint64
	drainTo    pglogrepl.LSN // a switchover's fence: everything before it must reach the stream
	drained    pglogrepl.LSN // … and does
	// A switchover's look at capture before its fence (captureCaughtUp),
	// kept by the check-in loop alone.
	fenceAsked time.Time
	leadMark   pglogrepl.LSN
	leadMarkAt time.Time
	grantedFor time.Time     // the server start the write guard lets writes in for
	changed    chan struct{} // closed and replaced when deposed or epoch change
}

func newLeaseKeeper(cfg Config, log zerolog.Logger, confirmed *atomic.Uint64) *leaseKeeper {
	k := &leaseKeeper{cfg: cfg, log: log.With().Str("site", cfg.Site).Logger(), epoch: cfg.Epoch, changed: make(chan struct{}), confirmed: confirmed}
	k.clients = controlclient.New(cfg.Controllers)
	return k
}

// state returns the epoch to stamp and whether this site may capture.
func (k *leaseKeeper) state() (epoch uint64, deposed bool, changed <-chan struct{}) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.epoch, k.deposed, k.changed
}

// checkIn asks the quorum, every node at once: the lease must not run
// out because one node hangs.
func (k *leaseKeeper) checkIn(ctx context.Context) (*havenpb.CheckInResponse, error) {
	k.mu.Lock()
	req := &havenpb.CheckInRequest{Group: k.cfg.Group, Site: k.cfg.Site, Component: havenpb.Component_COMPONENT_AGENT,
		Epoch: k.epoch, DatabaseUrl: k.cfg.ProbeURL, Reported: k.reported != "", Report: k.reported, StandbyDatabase: k.standbyDB,
		DrainedLsn: uint64(k.drained)}
	k.mu.Unlock()
	if req.DatabaseUrl == "" {
		req.DatabaseUrl = k.cfg.SourceURL
	}
	return k.clients.CheckIn(ctx, req, time.Second)
}

// run checks in every quarter of the lease until ctx ends.
func (k *leaseKeeper) run(ctx context.Context) {
	interval := 500 * time.Millisecond
	var failing, lastWarned time.Time
	lostSaid := false
	handOver := false
	var serverStart time.Time
	for {
		sent := time.Now()
		var err error
		// A lease is for a primary that works: while the database does not
		// answer, the agent does not renew it, so that DR can take over.
		// Not asked right after a switchover's drain: the database answered
		// a moment ago, and writes wait for this check-in.
		if !handOver {
			pctx, cancel := context.WithTimeout(ctx, time.Second)
			serverStart, err = fence.Ping(pctx, k.cfg.SourceURL)
			cancel()
		}
		handOver = false
		var resp *havenpb.CheckInResponse
		if err != nil {
			err = fmt.Errorf("the database does not answer, so the lease is not renewed: %w", err)
		} else {
			resp, err = k.checkIn(ctx)
		}
		if ctx.Err() != nil {
			return
		}
		switch {
		case err != nil:
			if failing.IsZero() || time.Since(lastWarned) > 30*time.Second {
				lastWarned = time.Now()
				k.log.Warn().Err(err).Msg("check-in failed; the lease runs out if none succeeds in time, and the database is then fenced")
			}
			if failing.IsZero() {
				failing = time.Now()
			}
		case resp.Fence:
			k.depose(ctx, resp)
		case resp.Report:
			k.rejoin(ctx, pglogrepl.LSN(resp.PromotedLsn))
		case resp.LeaseGranted:
			if !failing.IsZero() {
				k.log.Info().Dur("after", time.Since(failing)).Msg("check-in succeeds again")
				failing = time.Time{}
			}
			lostSaid = false
			ttl := time.Duration(resp.LeaseTtlMs) * time.Millisecond
			interval = max(ttl/4, 100*time.Millisecond)
			k.grant(ctx, resp, sent.Add(ttl), serverStart)
			handOver = resp.SwitchoverFence && k.switchoverFence(ctx)
		}
		if err == nil && resp.CheckInMs > 0 {
			interval = time.Duration(resp.CheckInMs) * time.Millisecond
		}
		wait := interval
		if handOver {
			wait = 0 // drained: say so now
		}
		k.mu.Lock()
		// A deposed site's fence is the quorum's business (it is lifted
		// for a rejoin).
		expired := !k.validUntil.IsZero() && time.Now().After(k.validUntil) && !k.fenced && !k.deposed
		k.mu.Unlock()
		if expired {
			if !lostSaid {
				lostSaid = true
				k.log.Error().Msg("lease lost: no controller renewed it in time; fencing the database until one does (writes stop, so that DR can be promoted safely)")
			}
			k.fence(ctx, "lease lost")
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

func (k *leaseKeeper) grant(ctx context.Context, resp *havenpb.CheckInResponse, until, serverStart time.Time) {
	k.mu.Lock()
	k.validUntil = until
	if k.deposed {
		// Rejoined as a standby, and primary again since.
		k.deposed, k.reported = false, ""
		k.drainTo, k.drained = 0, 0
		k.changeLocked()
	}
	epochChanged := resp.Epoch != k.epoch
	k.epoch, k.primary = resp.Epoch, resp.PrimarySite
	// A switchover's fence stays until the site is deposed; an aborted
	// switchover's is lifted.
	fenced := k.fenced && !resp.SwitchoverFence
	if !resp.SwitchoverFence {
		k.fenceAsked, k.leadMark = time.Time{}, 0
	}
	if !resp.SwitchoverFence && k.drainTo != 0 {
		k.drainTo, k.drained, fenced = 0, 0, true
		k.log.Warn().Msg("switchover aborted by the controllers: lifting the fence, this site stays primary")
	}
	if epochChanged {
		k.changeLocked()
	}
	k.mu.Unlock()
	if fenced {
		if err := fence.Lift(ctx, k.cfg.SourceURL); err != nil {
			k.log.Error().Err(err).Msg("lease regained but the fence could not be lifted; retrying at the next check-in")
			return
		}
		k.mu.Lock()
		k.fenced = false
		k.mu.Unlock()
		k.log.Warn().Uint64("epoch", resp.Epoch).Msg("lease regained: fence lifted, the database accepts writes again")
	}
	k.grantWrites(ctx, resp.Epoch, serverStart)
}

// grantWrites lets the write guard pass writes from the server's current
// start on (once per start: after a restart, the database takes no write
// until then).
func (k *leaseKeeper) grantWrites(ctx context.Context, epoch uint64, serverStart time.Time) {
	k.mu.Lock()
	done := k.grantedFor.Equal(serverStart) || k.drainTo != 0
	k.mu.Unlock()
	if done {
		return
	}
	conn, err := (&session{cfg: k.cfg}).connectSource(ctx)
	if err != nil {
		k.log.Warn().Err(err).Msg("could not connect to let writes in after the server's start; retrying at the next check-in")
		return
	}
	defer conn.Close(context.Background())
	if err := grantWrites(ctx, conn, epoch); err != nil {
		// Before the first capture session installed the guard, there is
		// no guard to pass.
		if !isUndefinedTable(err) {
			k.log.Warn().Err(err).Msg("could not let writes in after the server's start; retrying at the next check-in")
		}
		return
	}
	k.mu.Lock()
	k.grantedFor = serverStart
	k.mu.Unlock()
	k.log.Info().Time("server_start", serverStart).Uint64("epoch", epoch).Msg("lease held: the write guard lets writes in until the server restarts")
}

// switchoverFence fences the database for a planned switchover but keeps
// haven's own sessions, so that capture drains every change committed
// before the fence into the stream. It reports whether the drain just
// completed, for the next check-in to say so at once.
func (k *leaseKeeper) switchoverFence(ctx context.Context) bool {
	if k.drainTo == 0 {
		conn, err := (&session{cfg: k.cfg}).connectSource(ctx)
		if err != nil {
			k.log.Error().Err(err).Msg("switchover: could not connect to fence the database; retrying at the next check-in")
			return false
		}
		defer conn.Close(context.Background())
		if !k.captureCaughtUp(ctx, conn) {
			return false
		}
		// Connected before writes stop: they wait for the fence.
		fs, err := fence.Connect(ctx, k.cfg.SourceURL)
		if err != nil {
			k.log.Error().Err(err).Msg("switchover: could not connect to fence the database; retrying at the next check-in")
			return false
		}
		defer fs.Close()
		if err := k.withdrawGrantOn(ctx, conn); err != nil {
			k.log.Error().Err(err).Msg("switchover: could not withdraw the write grant; retrying at the next check-in")
			return false
		}
		if err := fs.FenceKeeping(ctx, wire.SlotName(k.cfg.Group), agentSessionName(k.cfg.Group)); err != nil {
			k.log.Error().Err(err).Msg("switchover: fencing failed; retrying at the next check-in")
			return false
		}
		// Everything committed before this message is decoded before it.
		lsn, err := k.markWAL(ctx, conn)
		if err != nil {
			k.log.Error().Err(err).Msg("switchover: could not mark the fence in the WAL; retrying at the next check-in")
			return false
		}
		k.mu.Lock()
		k.drainTo = lsn
		k.mu.Unlock()
		k.log.Warn().Stringer("fence_lsn", lsn).Msg("switchover: database fenced for writes; draining its last changes into the stream")
	}
	// Writes are stopped: wait here for the drain (a moment: the fence
	// ended every writer) rather than a check-in interval, but not into
	// the lease's last half second.
	k.mu.Lock()
	deadline := time.Now().Add(time.Second)
	if last := k.validUntil.Add(-500 * time.Millisecond); last.Before(deadline) {
		deadline = last
	}
	k.mu.Unlock()
	for ; k.drained == 0 && time.Now().Before(deadline) && ctx.Err() == nil; time.Sleep(2 * time.Millisecond) {
		if confirmed := pglogrepl.LSN(k.confirmed.Load()); confirmed >= k.drainTo {
			k.mu.Lock()
			k.drained = confirmed
			k.mu.Unlock()
			k.log.Warn().Stringer("drained_lsn", confirmed).Msg("switchover: every change is in the stream; handing over")
			return true
		}
	}
	return false
}

// switchoverCaptureLag is how far capture may be behind the database when
// a switchover stops its writes (the controllers ask DR for as much).
const switchoverCaptureLag = 300 * time.Millisecond

// captureCatchUpFor bounds how long a switchover waits for capture to catch
// up before it stops writes regardless: the controllers give the fence and
// the drain 15 s.
const captureCatchUpFor = 5 * time.Second

// captureCaughtUp reports whether capture is close enough behind the
// database for a switchover to stop its writes: a mark written to the WAL
// reaches the stream within switchoverCaptureLag. DR being current with
// the stream is not enough: what capture has not read yet would be drained
// with writes stopped (seconds, right after the snapshot of a site that
// rejoined). Writes go on meanwhile; one look per check-in.
func (k *leaseKeeper) captureCaughtUp(ctx context.Context, conn *pgx.Conn) bool {
	if k.fenceAsked.IsZero() {
		k.fenceAsked = time.Now()
	}
	if time.Since(k.fenceAsked) > captureCatchUpFor {
		k.log.Warn().Dur("waited", captureCatchUpFor).Msg("switchover: capture is still behind the database; stopping writes anyway, so the drain and the write pause take longer")
		return true
	}
	if k.leadMark == 0 {
		lsn, err := k.markWAL(ctx, conn)
		if err != nil {
			k.log.Error().Err(err).Msg("switchover: could not mark the WAL to see how far behind capture is; retrying at the next check-in")
			return false
		}
		k.leadMark, k.leadMarkAt = lsn, time.Now()
	}
	k.mu.Lock()
	deadline := k.leadMarkAt.Add(switchoverCaptureLag)
	if last := k.validUntil.Add(-500 * time.Millisecond); last.Before(deadline) {
		deadline = last
	}
	k.mu.Unlock()
	for {
		if pglogrepl.LSN(k.confirmed.Load()) >= k.leadMark {
			if time.Since(k.leadMarkAt) <= switchoverCaptureLag {
				return true
			}
			// In, but late: capture was behind. A new mark tells
			// whether it still is.
			k.leadMark = 0
			return false
		}
		if !time.Now().Before(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// markWAL writes a heartbeat message (one transaction) to the WAL and
// returns its position.
func (k *leaseKeeper) markWAL(ctx context.Context, conn *pgx.Conn) (pglogrepl.LSN, error) {
	var mark string
	if err := conn.QueryRow(ctx, `SELECT pg_logical_emit_message(true, $1, '{}')::text`, heartbeatPrefix(k.cfg.Group)).Scan(&mark); err != nil {
		return 0, err
	}
	return pglogrepl.ParseLSN(mark)
}

// changeLocked wakes whoever waits for a change of role (k.mu held).
func (k *leaseKeeper) changeLocked() {
	close(k.changed)
	k.changed = make(chan struct{})
}

func (k *leaseKeeper) depose(ctx context.Context, resp *havenpb.CheckInResponse) {
	k.mu.Lock()
	first := !k.deposed
	k.deposed = true
	k.epoch, k.primary = resp.Epoch, resp.PrimarySite
	fenced := k.fenced
	if first {
		k.changeLocked()
	}
	k.mu.Unlock()
	if first {
		k.log.Error().Str("primary_site", resp.PrimarySite).Uint64("epoch", resp.Epoch).
			Msg("another site is primary now: fencing this database and stopping capture; it must rejoin as a standby")
	}
	if !fenced {
		k.fence(ctx, fmt.Sprintf("site %s is primary at epoch %d", resp.PrimarySite, resp.Epoch))
	}
}

// rejoin prepares the deposed primary to become a standby: it lets
// connections in (read-only by default), writes the report of what it
// committed that DR never applied, and drops its slot and publication.
func (k *leaseKeeper) rejoin(ctx context.Context, promotedLSN pglogrepl.LSN) {
	k.mu.Lock()
	done := k.reported != ""
	if !k.deposed {
		k.deposed = true
		k.changeLocked()
	}
	k.mu.Unlock()
	if done {
		return
	}
	if err := fence.Reopen(ctx, k.cfg.SourceURL); err != nil {
		k.log.Error().Err(err).Msg("rejoin: could not reopen the deposed database; retrying at the next check-in")
		return
	}
	if err := k.withdrawGrant(ctx); err != nil {
		k.log.Error().Err(err).Msg("rejoin: could not withdraw the write grant; retrying at the next check-in")
		return
	}
	path, n, err := lostReport(ctx, k.cfg, promotedLSN, k.cfg.ReportDir)
	if err != nil {
		k.log.Error().Err(err).Msg("rejoin: could not write the lost-transaction report; retrying at the next check-in (the slot is kept until it is written)")
		return
	}
	ev := k.log.Info()
	if n > 0 {
		ev = k.log.Error()
	}
	ev.Str("report", path).Int("transactions", n).Stringer("promoted_lsn", promotedLSN).
		Msg("rejoin: transactions this database committed that the new primary lacks are in the report; reconcile them by hand")
	sess := &session{cfg: k.cfg}
	conn, err := sess.connectSource(ctx)
	if err != nil {
		k.log.Error().Err(err).Msg("rejoin: could not connect to drop the slot; retrying at the next check-in")
		return
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()`,
		wire.SlotName(k.cfg.Group)); err != nil {
		k.log.Error().Err(err).Msg("rejoin: could not drop the slot; retrying at the next check-in")
		return
	}
	if _, err := conn.Exec(ctx, "DROP PUBLICATION IF EXISTS "+pgx.Identifier{wire.PublicationName(k.cfg.Group)}.Sanitize()); err != nil {
		k.log.Error().Err(err).Msg("rejoin: could not drop the publication; retrying at the next check-in")
		return
	}
	k.mu.Lock()
	k.reported = path
	k.fenced = false
	k.mu.Unlock()
}

// withdrawGrant makes the write guard refuse writes: the deposed database
// is reopened for its standby, which alone may write (as a replica).
func (k *leaseKeeper) withdrawGrant(ctx context.Context) error {
	conn, err := (&session{cfg: k.cfg}).connectSource(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	return k.withdrawGrantOn(ctx, conn)
}

func (k *leaseKeeper) withdrawGrantOn(ctx context.Context, conn *pgx.Conn) error {
	if _, err := conn.Exec(ctx, `UPDATE haven.write_grant SET postmaster_start = NULL`); err != nil && !isUndefinedTable(err) {
		return err
	}
	k.mu.Lock()
	k.grantedFor = time.Time{}
	k.mu.Unlock()
	return nil
}

// isUndefinedTable reports a missing table (SQLSTATE 42P01).
func isUndefinedTable(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "42P01"
}

func (k *leaseKeeper) fence(ctx context.Context, why string) {
	// First the grant, while connections still work: should the fence be
	// lifted by hand, writes stay refused until a lease grants them again.
	if err := k.withdrawGrant(ctx); err != nil {
		k.log.Debug().Err(err).Msg("could not withdraw the write grant before fencing")
	}
	if err := fence.Fence(ctx, k.cfg.SourceURL); err != nil {
		k.log.Debug().Err(err).Msg("could not fence the database (is it down?); retrying at the next check-in")
		return
	}
	k.log.Warn().Str("why", why).Msg("database fenced: read-only by default, no connections, its sessions ended")
	k.mu.Lock()
	k.fenced = true
	k.mu.Unlock()
}

// waitCapture blocks until this site may capture: it holds the lease, is
// primary and its database is not fenced. It returns false when ctx ends.
func (k *leaseKeeper) waitCapture(ctx context.Context, health func(string)) bool {
	said := ""
	for {
		k.mu.Lock()
		var why string
		switch {
		case k.deposed:
			why = fmt.Sprintf("deposed: site %s is primary at epoch %d; this database is fenced", k.primary, k.epoch)
		case k.fenced:
			why = "fenced: waiting for the lease to lift the fence"
		case time.Now().After(k.validUntil):
			why = "waiting for a lease from the controllers"
		}
		k.mu.Unlock()
		if why == "" {
			return true
		}
		if why != said {
			k.log.Warn().Msg("capture waits: " + why)
			health(why)
			said = why
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// loadFenced reads whether the database is fenced from its persistent state:
// a database that came up fenced before this agent started is fenced.
func (k *leaseKeeper) loadFenced(ctx context.Context) error {
	fenced, err := fence.IsFenced(ctx, k.cfg.SourceURL)
	if err != nil {
		return err
	}
	standbyDB := false
	if !fenced {
		conn, err := (&session{cfg: k.cfg}).connectSource(ctx)
		if err != nil {
			return err
		}
		defer conn.Close(context.Background())
		if err := conn.QueryRow(ctx, `SELECT to_regclass('haven.apply_position') IS NOT NULL AND
			EXISTS (SELECT 1 FROM haven.apply_position WHERE group_name = $1)`, k.cfg.Group).Scan(&standbyDB); err != nil {
			// The table is missing: the query fails only then.
			standbyDB = false
		}
	}
	k.mu.Lock()
	k.fenced, k.standbyDB = fenced, standbyDB
	k.mu.Unlock()
	return nil
}
