package replicator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/haven-dr/haven/internal/opshttp"
	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// Standby applies one group's stream to the DR database. Create it with New,
// run it with Run.
type Standby struct {
	cfg     Config
	log     zerolog.Logger
	metrics *metrics
	health  opshttp.Health
	// isolateThrough is handed to each session's applier (Run's goroutine
	// only).
	isolateThrough uint64
	control        controlState
	// A promote drill's rehearsal under way (rehearse.go).
	rehearsalMu sync.Mutex
	rehearsal   *rehearsal
	rehearsals  sync.WaitGroup
}

// New checks cfg and registers the standby's metrics on reg.
func New(cfg Config, log zerolog.Logger, reg prometheus.Registerer) (*Standby, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log = log.With().Str("component", "standby").Str("group", cfg.Group).Logger()
	s := &Standby{cfg: cfg, log: log, metrics: newMetrics(reg, cfg.Group)}
	s.health.Set("starting")
	s.control.lag.start(position{}) // behind since now, until shown otherwise
	s.control.ordered = make(chan struct{}, 1)
	return s, nil
}

// Healthy returns nil while the standby applies, or what stops it.
func (s *Standby) Healthy() error { return s.health.Err() }

// operatorError is a setup problem only an operator can fix.
type operatorError struct{ err error }

func (e *operatorError) Error() string { return e.err.Error() }
func (e *operatorError) Unwrap() error { return e.err }

// Run applies until ctx ends. Unreachable servers and dropped connections
// are retried with backoff; a message that cannot be applied blocks apply
// (retried every BlockedRetry, in case it was fixed); a setup problem only
// an operator can fix ends Run with an error.
func (s *Standby) Run(ctx context.Context) error {
	if len(s.cfg.Controllers) > 0 {
		s.dropLeftoverClone()
		go s.checkIns(ctx)
		// A rehearsal stops with ctx, and drops its clone on the way.
		defer s.rehearsals.Wait()
	}
	wait := time.Duration(0)
	for {
		if len(s.cfg.Controllers) > 0 && !s.waitForOrders(ctx) {
			return nil
		}
		started, applied := time.Now(), s.control.appliedLSN.Load()
		err := s.runSession(ctx)
		s.metrics.connected.Set(0)
		if time.Since(started) > time.Minute || s.control.appliedLSN.Load() != applied {
			wait = 0 // a session that ran a while or applied something: the next failure starts the backoff over
		}
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, errPromoted) {
			if len(s.cfg.Controllers) == 0 {
				<-ctx.Done()
				return nil
			}
			s.control.apply.Store(false)
			continue
		}
		var oe *operatorError
		var be *blockedError
		switch {
		case errors.As(err, &oe):
			s.health.Set(err.Error())
			s.log.Error().Err(err).Msg("apply stopped: this needs an operator")
			return err
		case errors.As(err, &be):
			// Retry one source transaction at a time past this point: the
			// transactions before the failing one then commit, and the
			// message named is exactly the one after the stored position.
			s.isolateThrough = max(s.isolateThrough, be.seq+uint64(s.cfg.GroupChanges)+1)
			s.health.Set(err.Error())
			s.metrics.blocked.Set(1)
			s.log.Error().Err(err).Uint64("seq", be.seq).Str("reason", be.reason).Dur("retry_in", s.cfg.BlockedRetry).
				Msg("apply is blocked: nothing after this message is applied and it is not acknowledged; fix the cause (see the error), apply resumes by itself")
			wait = s.cfg.BlockedRetry
		case errors.Is(err, errNoNewSnapshot):
			s.health.Set(err.Error())
			if wait == 0 {
				s.log.Info().Msg(err.Error())
			}
			wait = 500 * time.Millisecond
		case errors.Is(err, errNotDelivered), errors.Is(err, errReconnected):
			// Nothing is wrong yet: no backoff.
			s.log.Warn().Err(err).Msg("apply session ended; reading the stream again")
			wait = 0
		default:
			var df *drFailure
			if errors.As(err, &df) && df.isolate {
				s.isolateThrough = max(s.isolateThrough, df.seq+uint64(s.cfg.GroupChanges)+1)
			}
			s.health.Set(err.Error())
			s.metrics.errors.Inc()
			wait = min(max(2*wait, 500*time.Millisecond), 30*time.Second)
			s.log.Warn().Err(err).Dur("retry_in", wait).Msg("apply session ended; retrying")
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}

// writerConfig is the configuration of haven's sessions that write to the
// DR database.
func writerConfig(targetURL string) (*pgx.ConnConfig, error) {
	config, err := pgx.ParseConfig(targetURL)
	if err != nil {
		return nil, fmt.Errorf("parse --target-url: %w", err)
	}
	// The DR database is read-only for every session but haven's own.
	config.RuntimeParams["default_transaction_read_only"] = "off"
	// A DR database that was a primary in synchronous mode keeps its
	// synchronous_standby_names: apply must not wait for a standby of its own.
	config.RuntimeParams["synchronous_commit"] = "local"
	maps.Copy(config.RuntimeParams, wire.SessionSettings)
	return config, nil
}

func (s *Standby) runSession(ctx context.Context) error {
	connConfig, err := writerConfig(s.cfg.TargetURL)
	if err != nil {
		return &operatorError{err}
	}
	// Parse values under the settings the agent produced them with.
	maps.Copy(connConfig.RuntimeParams, wire.TextFormatSettings)
	if _, ok := connConfig.RuntimeParams["application_name"]; !ok {
		connConfig.RuntimeParams["application_name"] = "haven_standby_" + s.cfg.Group
	}
	conn, err := pgx.ConnectConfig(ctx, connConfig)
	if err != nil {
		return fmt.Errorf("connect to DR database: %w", err)
	}
	defer conn.Close(context.Background())
	var inRecovery bool
	if err := conn.QueryRow(ctx, `SELECT pg_is_in_recovery()`).Scan(&inRecovery); err != nil {
		return fmt.Errorf("ask the DR database whether it is in recovery: %w", err)
	}
	if inRecovery {
		return errors.New("the DR database is in recovery (a physical standby, or a server restoring a backup), so it takes no writes: " +
			"point --target-url at a PostgreSQL server that accepts writes (a cluster of its own for haven, or this one promoted); apply starts once it does")
	}
	if _, err := conn.Exec(ctx, "SET session_replication_role = replica"); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42501" {
			return &operatorError{fmt.Errorf("the DR role %q may not set session_replication_role: make it a superuser, or (PostgreSQL 15+) "+
				"GRANT SET ON PARAMETER session_replication_role TO %s", conn.Config().User, pgx.Identifier{conn.Config().User}.Sanitize())}
		}
		return fmt.Errorf("set session_replication_role: %w", err)
	}
	nc, err := nats.Connect(s.cfg.NATSURL, nats.Name("haven-standby-"+s.cfg.Group), nats.MaxReconnects(-1),
		nats.ErrorHandler(natsErrorLogger(s.log)),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				s.log.Warn().Err(err).Msg("disconnected from NATS; reconnecting")
			}
		}))
	if err != nil {
		return fmt.Errorf("connect to NATS at %s: %w", s.cfg.NATSURL, err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("JetStream context: %w", err)
	}
	streamName := wire.StreamName(s.cfg.Group)
	stream, err := wire.LookupStream(ctx, js, s.cfg.Group)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return fmt.Errorf("stream %s does not exist yet: start the agent of group %q (it creates the stream), or check --nats-url", streamName, s.cfg.Group)
	}
	if err != nil {
		return err
	}
	// Before anything is written to the target: it must not be the source.
	known, err := s.refuseSource(ctx, conn, js)
	if err != nil {
		return err
	}
	var locked bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock(hashtext('haven standby ' || $1))`, s.cfg.Group).Scan(&locked); err != nil {
		return fmt.Errorf("take the apply lock: %w", err)
	}
	if !locked {
		// pg_locks shows a bigint key as its high and low halves.
		var holder string
		_ = conn.QueryRow(ctx, `SELECT format('DR session %s from %s, connected at %s', a.pid, coalesce(host(a.client_addr), 'a local socket'), a.backend_start)
			FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
			WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
			  AND l.objsubid = 1 AND l.classid::bigint = (hashtext('haven standby ' || $1)::bigint >> 32) & 4294967295
			  AND l.objid::bigint = hashtext('haven standby ' || $1)::bigint & 4294967295`, s.cfg.Group).Scan(&holder)
		if holder == "" {
			holder = "a DR session"
		}
		return fmt.Errorf("another standby is applying group %q to this database (%s holds the apply lock); this one waits. "+
			"If no other standby runs, that is the session of one that stopped without closing it: DR ends it once it notices "+
			"(tcp_keepalives_idle), or end it yourself with pg_terminate_backend", s.cfg.Group, holder)
	}
	pos, found, err := loadPosition(ctx, conn, s.cfg.Group)
	if err != nil {
		return err
	}
	if err := s.loadPromotion(ctx, conn); err != nil {
		return err
	}
	if s.control.promoted.Load() > 0 {
		// A primary now: nothing more is applied here.
		return errPromoted
	}
	if known || found {
		// Not yet a target that may be the source (refuseSource); else at
		// the snapshot's first message.
		protectDR(ctx, conn, s.log)
	}
	id, err := standbyID(ctx, conn)
	if err != nil {
		return err
	}

	info, err := stream.Info(ctx)
	if err != nil {
		return fmt.Errorf("read stream %s: %w", streamName, err)
	}
	// PostgreSQL keeps microseconds.
	created := info.Created.Truncate(time.Microsecond)
	var own uint64
	if s.control.reseed.Load() {
		if err := conn.QueryRow(ctx, `SELECT system_identifier FROM pg_control_system()`).Scan(&own); err != nil {
			return fmt.Errorf("read the DR cluster's system identifier: %w", err)
		}
	}
	from, err := s.startAfter(ctx, js, stream, info, created, pos, found, own)
	if err != nil {
		return err
	}
	consumer, err := s.consumer(ctx, stream, wire.ConsumerName(s.cfg.Group, id), from)
	if err != nil {
		return err
	}
	// A bound on the bytes buffered, not on the messages: the client's buffer
	// holds as many messages as it may request, and a batch requested with
	// both limits ends with a status message the server adds, for which there
	// is no room when apply is behind ("slow consumer, messages dropped", and
	// now and then a message missing). Each request then asks for at least
	// half of this: room for the largest message the server accepts, or one
	// would never be delivered.
	iter, err := consumer.Messages(jetstream.PullMaxBytes(max(8<<20, 2*int(nc.MaxPayload()))))
	if err != nil {
		return fmt.Errorf("pull from %s: %w", streamName, err)
	}
	defer iter.Stop()
	aheadCtx, stopReading := context.WithCancel(ctx)
	ahead := startReadAhead(aheadCtx, iter, js, s.cfg.Group)
	defer func() {
		stopReading()
		for range ahead.messages { // until the reader is gone
		}
	}()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	reconnects := nc.Stats().Reconnects
	// A message read while a drill holds apply, handled once it lets go.
	var kept *inbound

	a := newApplier(s.cfg, s.log, s.metrics, conn, stream, pos, found)
	a.lag = &s.control.lag
	a.control = &s.control
	a.lag.start(pos)
	if s.control.reseed.Load() {
		// A deposed primary rejoining: what it holds is replaced.
		a.replace = true
		a.snapshotLoaded = func() { s.control.reseeded.Store(true) }
	}
	if err := a.loadBackfills(ctx); err != nil {
		return err
	}
	a.isolateThrough = s.isolateThrough
	a.streamCreated = created
	a.lastSeq = from
	s.metrics.connected.Set(1)
	s.metrics.blocked.Set(0)
	a.showApplied() // what DR holds, from the session's start
	s.health.Set("")
	s.log.Info().Uint64("stream_seq", pos.streamSeq).Stringer("commit_lsn", pos.commitLSN).Bool("snapshot_done", pos.snapshotDone).
		Msg("applying from the stored position")
	defer func() {
		// On the way out, keep complete transactions already applied, and
		// acknowledge those committed.
		a.abandonLoad() // its lanes stop with ctx; a restart loads it again
		if (a.open && a.partial == nil) || (!a.open && len(a.sent) > 0) {
			stopCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = a.commit(stopCtx)
		}
	}()
	for {
		// A message still pending after the last one means the stream's end
		// is not reached: no need to ask the server.
		if target := s.control.promoteTo.Load(); target > s.control.promoted.Load() && a.lastPending == 0 {
			drained, err := a.drained(ctx)
			if err != nil {
				return err
			}
			if drained {
				return s.promote(ctx, a, nc, target)
			}
		}
		wait := time.Second
		if len(s.cfg.Controllers) > 0 {
			// An order to promote is looked at between messages.
			wait = 100 * time.Millisecond
		}
		switch {
		case a.open && a.partial == nil && a.lastPending == 0:
			// The stream held nothing more when the group's last message
			// came: waiting for more would only keep it from DR.
			wait = 0
		case (a.open && a.partial == nil) || len(a.sent) > 0:
			// A group to commit, or a commit to confirm, when nothing comes.
			wait = time.Millisecond
		case a.load != nil:
			// Snapshot groups to end or to confirm (load.go).
			wait = 10 * time.Millisecond
		}
		var in inbound
		if kept != nil {
			in, kept = *kept, nil
		} else {
			var open, got bool
			in, open, got = ahead.next(timer, wait, s.control.ordered)
			if !got {
				held, err := s.holdForDrill(ctx, a, nil)
				if err == nil && !held {
					err = a.idle(ctx)
				}
				if err != nil {
					return err
				}
				continue
			}
			switch {
			case ctx.Err() != nil:
				return nil
			case !open:
				return fmt.Errorf("reading %s stopped", streamName)
			case in.fail != nil:
				return fmt.Errorf("next message from %s: %w", streamName, in.fail)
			}
		}
		held, err := s.holdForDrill(ctx, a, &in)
		if err != nil {
			return err
		}
		if held {
			kept = &in
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		if nc.Stats().Reconnects != reconnects {
			return errReconnected
		}
		if err := a.handle(ctx, in); err != nil {
			return err
		}
	}
}

// readAhead reads and decodes the stream's messages in a goroutine of its
// own, so that decoding runs beside apply and messages are at hand while
// apply waits for DR. What waits decoded is bounded in bytes (aheadBytes):
// a chunk sent uncompressed shares its message's bytes (wire.Decode), and
// a compressed one counts as its rows' size. A chunk larger than the bound
// (a row read from the object store, up to 64 MiB) waits alone, so that a
// standby holds at most about three such: the one waiting, the one being
// applied and the one being read. A failure to read ends the reader: its
// last value carries it.
type readAhead struct {
	messages chan inbound
	// credit holds a token per aheadUnit bytes of the messages waiting.
	credit chan struct{}
}

// aheadBytes counts encoded bytes; decoded, a change takes several times
// its size, and all of it is for the garbage collector to scan: 2 MiB
// (about 8,000 changes) keeps apply fed at a small live heap.
const (
	aheadUnit  = 1 << 10
	aheadBytes = 2 << 20
)

func startReadAhead(ctx context.Context, iter jetstream.MessagesContext, js jetstream.JetStream, group string) *readAhead {
	r := &readAhead{messages: make(chan inbound, aheadBytes/aheadUnit), credit: make(chan struct{}, aheadBytes/aheadUnit)}
	go func() {
		defer close(r.messages)
		var d wire.Decoder
		for ctx.Err() == nil {
			msg, err := iter.Next(jetstream.NextContext(ctx))
			if ctx.Err() != nil {
				return
			}
			var in inbound
			if err == nil {
				in, err = decode(ctx, js, group, msg, &d)
			}
			if err != nil {
				in = inbound{fail: err}
			}
			for range in.units() {
				select {
				case r.credit <- struct{}{}:
				case <-ctx.Done():
					return
				}
			}
			select {
			case r.messages <- in:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return r
}

// units is what a message takes of the read-ahead budget.
func (in inbound) units() int {
	if in.msg == nil {
		return 1
	}
	size := in.size
	c := in.chunk
	switch copied := len(c.GetCopyText()) + len(c.GetCopyBinary()); {
	case c == nil || in.plain:
	case copied > 0:
		size = max(size, copied)
	default:
		size *= 4 // changes compress about this much
	}
	return min(1+size/aheadUnit, aheadBytes/aheadUnit)
}

// next returns the next message, waiting at most wait, and not past a
// signal on wake; false when none came. open is false once the reader is
// gone.
func (r *readAhead) next(timer *time.Timer, wait time.Duration, wake <-chan struct{}) (in inbound, open, got bool) {
	select {
	case in, open = <-r.messages:
	default:
		if wait <= 0 {
			return in, true, false
		}
		timer.Reset(wait)
		select {
		case in, open = <-r.messages:
		case <-timer.C:
			return in, true, false
		case <-wake:
			return in, true, false
		}
	}
	if open {
		for range in.units() {
			<-r.credit
		}
	}
	return in, open, true
}

// refuseSource stops a standby whose target is the group's source database
// (same system, same database): applying there would feed the primary its
// own changes in a loop, and making it read-only would stop production.
// Before the agent has recorded its snapshot, the target is refused if it
// holds the group's slot (the agent's first step), and it is not made
// read-only (see runSession); a snapshot's first message is checked again
// (refuseSnapshotOfTarget).
func (s *Standby) refuseSource(ctx context.Context, conn *pgx.Conn, js jetstream.JetStream) (known bool, err error) {
	st := s.snapshotState(ctx, js)
	if st == nil || st.SystemID == 0 || st.Database == "" {
		if s.control.reseed.Load() {
			return false, nil
		}
		var holds bool
		if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database())`,
			wire.SlotName(s.cfg.Group)).Scan(&holds); err != nil {
			return false, fmt.Errorf("look for the group's slot in the target database: %w", err)
		}
		if holds {
			return false, &operatorError{fmt.Errorf("--target-url points at a database that holds slot %s: the source database group %q captures; "+
				"point it at the DR database", wire.SlotName(s.cfg.Group), s.cfg.Group)}
		}
		return false, nil
	}
	var systemID, database string
	if err := conn.QueryRow(ctx, `SELECT (SELECT system_identifier::text FROM pg_control_system()), current_database()`).Scan(&systemID, &database); err != nil {
		s.log.Warn().Err(err).Msg("could not read the target's system identifier to check that it is not the source database")
		return true, nil
	}
	if systemID == strconv.FormatUint(st.SystemID, 10) && database == st.Database {
		if s.control.reseed.Load() {
			// A deposed primary rejoining: the latest snapshot is its own
			// until the new primary's agent has put one in the stream.
			return true, errNoNewSnapshot
		}
		return true, &operatorError{fmt.Errorf("--target-url points at database %q of the source cluster (system %s), the very database group %q captures: "+
			"point it at the DR database", database, systemID, s.cfg.Group)}
	}
	return true, nil
}

// refuseSnapshotOfTarget stops apply before a snapshot empties the target's
// tables when the snapshot was taken of the target itself: the same
// cluster, and its database holds the snapshot's slot. (A standby whose
// session began before the agent recorded the snapshot was not checked.)
func refuseSnapshotOfTarget(ctx context.Context, conn *pgx.Conn, c *havenpb.Chunk) error {
	var source bool
	err := conn.QueryRow(ctx, `SELECT (SELECT system_identifier FROM pg_control_system()) = $1::bigint
		AND EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $2 AND database = current_database())`, int64(c.SystemId), c.Slot).Scan(&source)
	if err != nil {
		return fmt.Errorf("check that the snapshot is not of the target database itself: %w", err)
	}
	if source {
		return &operatorError{fmt.Errorf("the snapshot in the stream was taken of the target database itself (system %d, slot %s): --target-url points at "+
			"the source database; point it at the DR database", c.SystemId, c.Slot)}
	}
	return nil
}

// protectDR makes new sessions on the DR database read-only by default, so
// that an application pointed at the DR site by mistake cannot make it
// drift from the primary. It is a default, not a barrier (a session may SET
// it off); failing to set it is reported, not fatal.
func protectDR(ctx context.Context, conn *pgx.Conn, log zerolog.Logger) {
	var db string
	if err := conn.QueryRow(ctx, `SELECT current_database()`).Scan(&db); err != nil {
		return
	}
	if _, err := conn.Exec(ctx, "ALTER DATABASE "+pgx.Identifier{db}.Sanitize()+" SET default_transaction_read_only = on"); err != nil {
		log.Warn().Err(err).Msg("could not make the DR database read-only for other sessions (the DR role must own it): writes there would make it drift from the primary")
	}
}

// errNoNewSnapshot: a rejoining site waits for the new primary's agent to
// put its initial snapshot in the stream.
var errNoNewSnapshot = errors.New("rejoining: waiting for the new primary's initial snapshot to be complete in the stream")

// startAfter decides after which stream sequence apply starts: after the
// stored position when the stream continues it; else, when the stream holds
// a newer initial snapshot (the agent was re-seeded), just before that
// snapshot, which replaces the DR copy; else apply is blocked.
func (s *Standby) startAfter(ctx context.Context, js jetstream.JetStream, stream jetstream.Stream, info *jetstream.StreamInfo, created time.Time, pos position, found bool, own uint64) (uint64, error) {
	if s.control.reseed.Load() {
		// A deposed primary rejoining: the new primary's snapshot replaces
		// what its database holds. Not an older one (its own, from before it
		// was deposed): its database has every table and row it wrote since,
		// which what the stream holds after that snapshot would be applied
		// on top of (a table created later exists already, with its rows).
		latest := s.latestSnapshot(ctx, js, info, created)
		if latest == nil || latest.SystemID == own {
			return 0, errNoNewSnapshot
		}
		s.log.Info().Uint64("seq", latest.BeginSeq).Uint64("system_id", latest.SystemID).Msg("rejoining: loading the new primary's initial snapshot")
		return latest.BeginSeq - 1, nil
	}
	var problem string
	switch {
	case found && !created.Equal(pos.streamCreated):
		problem = fmt.Sprintf("stream %s was created at %s, but the DR copy was applied from a stream created at %s: its sequence numbers do not continue what was applied",
			info.Config.Name, created.UTC().Format(time.RFC3339Nano), pos.streamCreated.UTC().Format(time.RFC3339Nano))
	case info.State.Msgs > 0 && info.State.FirstSeq > pos.streamSeq+1:
		problem = fmt.Sprintf("stream %s begins at message %d, but the DR copy needs message %d next: messages were removed (retention limits or a purge) before it applied them",
			info.Config.Name, info.State.FirstSeq, pos.streamSeq+1)
	case !found:
		// A new DR copy starts at the latest snapshot, not at the stream's
		// first message: older snapshots would only be loaded to be replaced.
		if latest := s.latestSnapshot(ctx, js, info, created); latest != nil {
			s.log.Info().Uint64("seq", latest.BeginSeq).Msg("new DR copy: starting at the group's latest initial snapshot")
			return latest.BeginSeq - 1, nil
		}
		return 0, nil
	default:
		var err error
		if problem, err = checkPositionMessage(ctx, js, s.cfg.Group, stream, info, pos); err != nil {
			return 0, err
		}
		if problem == "" {
			return pos.streamSeq, nil
		}
	}
	if latest := s.latestSnapshot(ctx, js, info, created); latest != nil && (latest.BeginSeq > pos.streamSeq || !created.Equal(pos.streamCreated)) {
		s.log.Warn().Str("problem", problem).Uint64("seq", latest.BeginSeq).
			Msg("re-seeding the DR copy from the group's latest initial snapshot, which replaces it")
		return latest.BeginSeq - 1, nil
	}
	return 0, &blockedError{seq: pos.streamSeq + 1, reason: "cannot continue", err: fmt.Errorf(
		"%s; re-seed the DR copy: drop the agent's slot (SELECT pg_drop_replication_slot('haven_%s') on the primary) so it takes a new snapshot, "+
			"which this standby then loads by itself", problem, s.cfg.Group)}
}

// checkPositionMessage makes sure the message at the stored position is the
// one applied there. A JetStream server that lost acknowledged messages (one
// replica, no sync to disk, a crash) hands their sequence numbers out again:
// continuing after the position would skip whatever now stands there.
//
// It returns the problem found, or an error when it could not look (NATS
// failing for a moment: the session retries, nothing is re-seeded).
func checkPositionMessage(ctx context.Context, js jetstream.JetStream, group string, stream jetstream.Stream, info *jetstream.StreamInfo, pos position) (string, error) {
	if pos.streamSeq == 0 || pos.streamSeq < info.State.FirstSeq {
		return "", nil
	}
	if pos.streamSeq > info.State.LastSeq {
		return fmt.Sprintf("stream %s ends at message %d, but the DR copy applied up to message %d: the stream lost messages it had acknowledged "+
			"(a single server without sync to disk that crashed?)", info.Config.Name, info.State.LastSeq, pos.streamSeq), nil
	}
	msg, err := stream.GetMsg(ctx, pos.streamSeq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return "", nil // deleted on its own: nothing to compare
	}
	if err != nil {
		return "", fmt.Errorf("read message %d: %w", pos.streamSeq, err)
	}
	encoding, payload, err := wire.Payload(ctx, js, group, msg.Header, msg.Data)
	if err != nil && !errors.Is(err, wire.ErrCorrupt) && !errors.Is(err, wire.ErrTooLarge) {
		return "", fmt.Errorf("read message %d: %w", pos.streamSeq, err)
	}
	c, err := wire.Decode(encoding, msg.Header.Get(wire.HeaderFormat), payload)
	if err != nil {
		return "", nil // a message skipped on purpose may be undecodable
	}
	same := c.SystemId == pos.systemID && (c.Kind != havenpb.Kind_KIND_TRANSACTION || pglogrepl.LSN(c.CommitLsn) == pos.commitLSN)
	if !same {
		return fmt.Sprintf("message %d of stream %s is not the one the DR copy applied there (commit %s, now %s): the stream lost messages it had acknowledged "+
			"and handed their sequence numbers out again", pos.streamSeq, info.Config.Name, pos.commitLSN, pglogrepl.LSN(c.CommitLsn)), nil
	}
	return "", nil
}

// latestSnapshot returns the group's latest complete initial snapshot when
// this stream still holds its beginning, or nil.
func (s *Standby) latestSnapshot(ctx context.Context, js jetstream.JetStream, info *jetstream.StreamInfo, created time.Time) *wire.SnapshotState {
	st := s.snapshotState(ctx, js)
	if st == nil || !st.Done || st.BeginSeq == 0 || !st.SameStream(created) ||
		st.BeginSeq < info.State.FirstSeq || st.BeginSeq > info.State.LastSeq {
		return nil
	}
	return st
}

// snapshotState reads the group's snapshot state the agent records, or nil
// when there is none (or it cannot be read: callers then decide without it).
func (s *Standby) snapshotState(ctx context.Context, js jetstream.JetStream) *wire.SnapshotState {
	kv, err := js.KeyValue(ctx, wire.StateBucket)
	if err != nil {
		return nil
	}
	entry, err := kv.Get(ctx, wire.SnapshotKey(s.cfg.Group))
	if err != nil {
		return nil
	}
	var st wire.SnapshotState
	if json.Unmarshal(entry.Value(), &st) != nil {
		return nil
	}
	return &st
}

// consumer recreates the durable consumer at the message after the stored
// position. The DR database, not the consumer, is the truth: a consumer
// left by a crash may be ahead of it (acknowledged, not yet committed) or
// behind it.
func (s *Standby) consumer(ctx context.Context, stream jetstream.Stream, name string, appliedSeq uint64) (jetstream.Consumer, error) {
	if err := stream.DeleteConsumer(ctx, name); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		return nil, fmt.Errorf("reset consumer %s: %w", name, err)
	}
	cfg := jetstream.ConsumerConfig{
		Durable:       name,
		Description:   "haven standby of group " + s.cfg.Group,
		AckPolicy:     jetstream.AckAllPolicy,
		AckWait:       5 * time.Minute,
		MaxAckPending: 1 << 20,
		// The DR database, not the consumer, holds the position: a consumer
		// left by a DR database that is gone may be cleaned up.
		InactiveThreshold: 7 * 24 * time.Hour,
		DeliverPolicy:     jetstream.DeliverAllPolicy,
	}
	if appliedSeq > 0 {
		cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		cfg.OptStartSeq = appliedSeq + 1
	}
	c, err := stream.CreateConsumer(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("create consumer %s: %w", name, err)
	}
	return c, nil
}

// natsErrorLogger reports asynchronous NATS client errors (such as a slow
// consumer dropping messages) in the process's log instead of on stderr.
func natsErrorLogger(log zerolog.Logger) nats.ErrHandler {
	return func(_ *nats.Conn, sub *nats.Subscription, err error) {
		ev := log.Warn().Err(err)
		if sub != nil {
			ev = ev.Str("subject", sub.Subject)
		}
		ev.Msg("NATS client error; anything it dropped is read again from the stream")
	}
}
