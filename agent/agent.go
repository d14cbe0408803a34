package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync/atomic"
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

// Agent captures one group's changes. Create it with New, run it with Run.
type Agent struct {
	confirmed atomic.Uint64 // what JetStream holds of the slot, last session
	// acked is the commit LSN of the last transaction of which JetStream
	// acknowledged a chunk, in any session (0 from a snapshot on).
	acked   atomic.Uint64
	cfg     Config
	log     zerolog.Logger
	metrics *metrics
	health  opshttp.Health
}

// Healthy returns nil while the agent streams, or what keeps it from it.
func (a *Agent) Healthy() error { return a.health.Err() }

// New checks cfg and registers the agent's metrics on reg.
func New(cfg Config, log zerolog.Logger, reg prometheus.Registerer) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log = log.With().Str("component", "agent").Str("group", cfg.Group).Logger()
	a := &Agent{cfg: cfg, log: log, metrics: newMetrics(reg, cfg.Group)}
	a.health.Set("starting")
	return a, nil
}

// Run captures until ctx ends. Failures that a retry can cure (a database or
// NATS server unreachable, a dropped connection) restart the session after a
// backoff; it returns only when ctx ends or an operator must act.
func (a *Agent) Run(ctx context.Context) error {
	backoff := newBackoff(500*time.Millisecond, 30*time.Second)
	var keeper *leaseKeeper
	if len(a.cfg.Controllers) > 0 {
		keeper = newLeaseKeeper(a.cfg, a.log, &a.confirmed)
		if err := keeper.loadFenced(ctx); err != nil {
			a.log.Warn().Err(err).Msg("could not read whether the database is fenced")
		}
		go keeper.run(ctx)
	}
	for {
		sessCtx, cancel := context.WithCancel(ctx)
		if keeper != nil {
			if !keeper.waitCapture(ctx, a.health.Set) {
				cancel()
				return nil
			}
			epoch, _, changed := keeper.state()
			a.cfg.Epoch = epoch
			go func() {
				select {
				case <-changed: // deposed, or a new epoch: start over
					cancel()
				case <-sessCtx.Done():
				}
			}()
		}
		started, confirmed := time.Now(), a.confirmed.Load()
		err := a.runSession(sessCtx)
		roleChanged := sessCtx.Err() != nil
		cancel()
		a.metrics.connected.Set(0)
		if ctx.Err() != nil {
			return nil
		}
		if roleChanged {
			continue // deposed, or a new epoch
		}
		if err == nil {
			err = errors.New("capture session ended")
		}
		a.health.Set(err.Error())
		if IsOperatorError(err) {
			a.log.Error().Err(err).Msg("capture stopped: this needs an operator")
			return err
		}
		a.metrics.errors.WithLabelValues(errorKind(err)).Inc()
		if time.Since(started) > time.Minute || a.confirmed.Load() != confirmed {
			backoff.reset() // it ran a while or captured something
		}
		wait := backoff.next()
		a.log.Warn().Err(err).Dur("retry_in", wait).Msg("capture session ended; retrying (changes stay in the slot meanwhile)")
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}

func errorKind(err error) string {
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr):
		return "postgres"
	case errors.Is(err, nats.ErrConnectionClosed), errors.Is(err, nats.ErrNoServers), errors.Is(err, nats.ErrTimeout),
		errors.Is(err, jetstream.ErrNoStreamResponse):
		return "nats"
	default:
		return "other"
	}
}

// session is everything one capture session holds open.
type session struct {
	cfg       Config
	log       zerolog.Logger
	metrics   *metrics
	info      sourceInfo
	ctrl      *pgx.Conn
	repl      *pgconn.PgConn
	publisher *publisher
	stream    jetstream.Stream
	state     jetstream.KeyValue // the group's snapshot state (wire.StateBucket)
	tables    []table
	published map[uint32]bool // published tables by OID: true for partitioned ones (streamer only)
	streaming func()          // called once streaming has started
	hub       *backfillHub
	confirmed *atomic.Uint64 // the confirmed position, for a switchover's drain
	acked     *atomic.Uint64 // see Agent.acked

	lastWALWarning time.Time // heartbeats goroutine only
}

func (a *Agent) runSession(ctx context.Context) error {
	s := &session{cfg: a.cfg, log: a.log, metrics: a.metrics, streaming: func() { a.health.Set("") }, hub: newBackfillHub(), confirmed: &a.confirmed, acked: &a.acked}
	ctrl, err := s.connectSource(ctx)
	if err != nil {
		return err
	}
	defer ctrl.Close(context.Background())
	s.ctrl = ctrl
	if s.info, err = checkSource(ctx, ctrl); err != nil {
		return err
	}
	s.log = s.log.With().Uint64("system_id", s.info.systemID).Logger()

	nc, err := nats.Connect(a.cfg.NATSURL, nats.Name("haven-agent-"+a.cfg.Group), nats.MaxReconnects(-1),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			ev := s.log.Warn().Err(err)
			if sub != nil {
				ev = ev.Str("subject", sub.Subject)
			}
			ev.Msg("NATS client error; a lost acknowledgement makes the agent republish after --publish-timeout")
		}),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				s.log.Warn().Err(err).Msg("disconnected from NATS; reconnecting")
			}
		}),
		nats.ReconnectHandler(func(c *nats.Conn) { s.log.Info().Str("server", c.ConnectedUrlRedacted()).Msg("reconnected to NATS") }))
	if err != nil {
		return fmt.Errorf("connect to NATS at %s: %w", a.cfg.NATSURL, err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(a.cfg.MaxInFlight+16),
		jetstream.WithPublishAsyncTimeout(a.cfg.PublishTimeout))
	if err != nil {
		return fmt.Errorf("JetStream context: %w", err)
	}
	if s.stream, err = ensureStream(ctx, js, a.cfg); err != nil {
		return err
	}
	if s.state, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: wire.StateBucket,
		Description: "haven: state of each group's initial snapshot", History: 5, Storage: jetstream.FileStorage,
		Replicas: a.cfg.StreamReplicas}); err != nil {
		return fmt.Errorf("open key-value bucket %s: %w", wire.StateBucket, err)
	}
	s.warnDurability(ctx)
	s.publisher = &publisher{js: js, stream: wire.StreamName(a.cfg.Group), compress: a.cfg.Compress, maxPayload: nc.MaxPayload(), objects: objectStoreConfig(a.cfg.Group, s.stream.CachedInfo().Config)}
	if int64(a.cfg.ChunkBytes) > nc.MaxPayload()*3/4 {
		s.cfg.ChunkBytes = int(nc.MaxPayload() * 3 / 4)
	}

	if s.tables, err = selectTables(ctx, ctrl, s.log, a.cfg.Tables, a.cfg.SetReplicaIdentityFull, a.cfg.PublishViaRoot, wire.PublicationName(a.cfg.Group)); err != nil {
		return err
	}
	// Before the first snapshot only: once streaming, a table the agent may
	// not read holds its own backfill (runBackfills) and the stream goes on
	// (prepareSlot checks again before a snapshot taken over).
	var streamed bool
	if err := ctrl.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)`, wire.SlotName(a.cfg.Group)).Scan(&streamed); err != nil {
		return fmt.Errorf("look up slot %q: %w", wire.SlotName(a.cfg.Group), err)
	}
	if !streamed {
		if err := refuseUnreadable(ctx, ctrl, s.tables); err != nil {
			return err
		}
	}
	capturing, err := s.installDDLCapture(ctx)
	if err != nil {
		return err
	}
	if capturing {
		t, err := ddlLog(ctx, ctrl)
		if err != nil {
			return fmt.Errorf("look up haven.ddl_log: %w", err)
		}
		s.tables = append(s.tables, t)
	}
	missing, err := ensurePublication(ctx, ctrl, wire.PublicationName(a.cfg.Group), s.tables, a.cfg.PublishViaRoot)
	if err != nil {
		return err
	}
	if i := slices.Index(missing, "haven."+ddlLogTable); i >= 0 {
		// DDL history needs no backfill: capture starts now.
		if _, err := ctrl.Exec(ctx, "ALTER PUBLICATION "+pgx.Identifier{wire.PublicationName(a.cfg.Group)}.Sanitize()+" ADD TABLE haven."+ddlLogTable); err != nil {
			return fmt.Errorf("add haven.ddl_log to the publication: %w", err)
		}
		missing = slices.Delete(missing, i, i+1)
	}
	if missing, err = s.backfillMissing(ctx, s.tables, missing); err != nil {
		return err
	}
	if s.tables, err = publishedTables(ctx, ctrl, wire.PublicationName(a.cfg.Group)); err != nil {
		return err
	}
	s.published = map[uint32]bool{}
	for _, t := range s.tables {
		s.published[t.oid] = t.partitioned
	}
	if capturing && a.cfg.PublishViaRoot {
		if err := s.capturePartitionTruncates(ctx); err != nil {
			return err
		}
	}
	a.metrics.unreplicated.Set(float64(len(missing)))
	if len(missing) > 0 {
		s.log.Error().Strs("tables", missing).Msg("these tables are not in the group's publication and cannot be backfilled (REPLICA IDENTITY FULL without a key to copy them by), so their changes are NOT replicated; " +
			"give them a primary key and restart the agent, or re-seed the group: stop the agent, DROP PUBLICATION and pg_drop_replication_slot('" + wire.SlotName(a.cfg.Group) + "'), start the agent")
	}

	startLSN, err := s.prepareSlot(ctx)
	if err != nil {
		return err
	}
	if a.cfg.Synchronous {
		// Only once the slot exists: creating it waits for every running
		// transaction, and in synchronous mode those would wait for it.
		if err := s.ensureSynchronous(ctx); err != nil {
			return err
		}
	}
	defer s.repl.Close(context.Background())

	hbCtx, stopHeartbeats := context.WithCancel(ctx)
	heartbeatsDone := make(chan struct{})
	go func() {
		defer close(heartbeatsDone)
		s.heartbeats(hbCtx)
	}()
	defer func() {
		stopHeartbeats()
		<-heartbeatsDone
	}()
	// A backfill that fails ends the session, which starts over.
	streamCtx, fail := context.WithCancelCause(ctx)
	backfillsDone := make(chan struct{})
	go func() {
		defer close(backfillsDone)
		s.runBackfills(streamCtx, fail)
	}()
	defer func() {
		fail(nil)
		<-backfillsDone
	}()
	if err := s.streamChanges(streamCtx, startLSN); err != nil {
		return err
	}
	if ctx.Err() == nil {
		return context.Cause(streamCtx)
	}
	return nil
}

// ensureSynchronous makes the primary wait for the agent at each commit:
// it names the agent's replication connection in synchronous_standby_names
// when that is empty, and refuses to go on when it names others only.
func (s *session) ensureSynchronous(ctx context.Context) error {
	name := wire.SlotName(s.cfg.Group)
	var names, commit string
	// synchronous_commit as other sessions get it (this one runs with local).
	if err := s.ctrl.QueryRow(ctx, `SELECT current_setting('synchronous_standby_names'),
		coalesce((SELECT f.setting FROM pg_file_settings f WHERE f.name = 'synchronous_commit' AND f.applied ORDER BY f.seqno DESC LIMIT 1),
		         (SELECT boot_val FROM pg_settings WHERE name = 'synchronous_commit'))`).Scan(&names, &commit); err != nil {
		return fmt.Errorf("read synchronous_standby_names: %w", err)
	}
	switch {
	case names == "":
		if _, err := s.ctrl.Exec(ctx, `ALTER SYSTEM SET synchronous_standby_names = '"`+name+`"'`); err != nil {
			return needsOperator("--synchronous: set synchronous_standby_names = '%s' on the primary (the agent could not: %v)", name, err)
		}
		if _, err := s.ctrl.Exec(ctx, `SELECT pg_reload_conf()`); err != nil {
			return fmt.Errorf("reload the configuration: %w", err)
		}
		s.log.Warn().Str("synchronous_standby_names", name).Msg("synchronous mode: commits on the primary now wait until JetStream has them; " +
			"while the agent is down they wait (the lease and failover handle a lost agent)")
	case !strings.Contains(names, name):
		return needsOperator("--synchronous: synchronous_standby_names is %q and does not name the agent; add %s to it (e.g. 'FIRST 1 (%s, …)'), or run without --synchronous", names, name, name)
	}
	if commit == "off" || commit == "local" {
		s.log.Warn().Str("synchronous_commit", commit).Msg("synchronous mode is on but synchronous_commit is " + commit + ": commits do not wait for the agent")
	}
	return nil
}

// warnDurability says plainly when a JetStream acknowledgement does not mean
// the change is on disk.
func (s *session) warnDurability(ctx context.Context) {
	info, err := s.stream.Info(ctx)
	if err != nil {
		return
	}
	if info.Config.Replicas < 3 {
		s.log.Warn().Int("replicas", info.Config.Replicas).Msg("stream has fewer than 3 replicas: an acknowledged change lives on one server, " +
			"and with the default sync_interval it may not be on disk yet; production streams should be R3 (--stream-replicas 3) or sync every write")
	} else {
		s.log.Info().Int("replicas", info.Config.Replicas).Msg("stream replicated: an acknowledged change is on a quorum of servers")
	}
}

// connectSource opens a connection to the source whose text output and type
// names match the stream's.
func (s *session) connectSource(ctx context.Context, options ...func(*pgx.ConnConfig)) (*pgx.Conn, error) {
	config, err := pgx.ParseConfig(s.cfg.SourceURL)
	if err != nil {
		return nil, needsOperator("parse source URL: %v", err)
	}
	for _, o := range options {
		o(config)
	}
	maps.Copy(config.RuntimeParams, wire.TextFormatSettings)
	maps.Copy(config.RuntimeParams, wire.SessionSettings)
	config.RuntimeParams["search_path"] = wire.TypeNameSearchPath
	// The agent's own commits never wait for a synchronous standby: in
	// synchronous mode that standby is the agent itself.
	config.RuntimeParams["synchronous_commit"] = "local"
	// A rejoining primary is read-only by default; the agent still drops
	// its slot there, and a primary's agent must never be read-only.
	config.RuntimeParams["default_transaction_read_only"] = "off"
	// A switchover's fence ends every session but haven's.
	config.RuntimeParams["application_name"] = agentSessionName(s.cfg.Group)
	conn, err := pgx.ConnectConfig(ctx, config)
	if err != nil {
		return nil, fmt.Errorf("connect to source database: %w", err)
	}
	return conn, nil
}

// agentSessionName is the application_name of the agent's sessions (its
// replication connection's is SlotName).
func agentSessionName(group string) string { return "haven_agent_" + group }

// replicationConn opens a connection in logical replication mode.
func (s *session) replicationConn(ctx context.Context) (*pgconn.PgConn, error) {
	config, err := pgconn.ParseConfig(s.cfg.SourceURL)
	if err != nil {
		return nil, needsOperator("parse source URL: %v", err)
	}
	maps.Copy(config.RuntimeParams, wire.TextFormatSettings)
	maps.Copy(config.RuntimeParams, wire.SessionSettings)
	config.RuntimeParams["search_path"] = wire.TypeNameSearchPath
	config.RuntimeParams["replication"] = "database"
	config.RuntimeParams["application_name"] = wire.SlotName(s.cfg.Group)
	conn, err := pgconn.ConnectConfig(ctx, config)
	if err != nil {
		return nil, fmt.Errorf("open replication connection: %w", err)
	}
	return conn, nil
}

type slotState struct {
	exists       bool
	plugin       string
	confirmedLSN pglogrepl.LSN
	walStatus    string
	active       bool
}

func (s *session) readSlot(ctx context.Context) (slotState, error) {
	var st slotState
	var confirmed *string
	var walStatus *string
	err := s.ctrl.QueryRow(ctx, `SELECT plugin, confirmed_flush_lsn::text, wal_status, active FROM pg_replication_slots
		WHERE slot_name = $1 AND database = current_database()`, wire.SlotName(s.cfg.Group)).Scan(&st.plugin, &confirmed, &walStatus, &st.active)
	if errors.Is(err, pgx.ErrNoRows) {
		return st, nil
	}
	if err != nil {
		return st, fmt.Errorf("read slot %q: %w", wire.SlotName(s.cfg.Group), err)
	}
	st.exists = true
	if walStatus != nil {
		st.walStatus = *walStatus
	}
	if confirmed != nil {
		if st.confirmedLSN, err = pglogrepl.ParseLSN(*confirmed); err != nil {
			return st, fmt.Errorf("parse confirmed_flush_lsn %q: %w", *confirmed, err)
		}
	}
	return st, nil
}

// prepareSlot opens the replication connection and returns where streaming
// starts: the existing slot's position, or, for a new slot, its consistent
// point after the initial snapshot has been published.
func (s *session) prepareSlot(ctx context.Context) (pglogrepl.LSN, error) {
	slot := wire.SlotName(s.cfg.Group)
	st, err := s.readSlot(ctx)
	if err != nil {
		return 0, err
	}
	if st.exists {
		if st.active {
			return 0, fmt.Errorf("slot %q is in use by another process (another agent of group %q?); waiting for it to be released", slot, s.cfg.Group)
		}
		if st.plugin != "pgoutput" {
			return 0, needsOperator("slot %q uses plugin %q, not pgoutput: it is not haven's; drop it or pick another group name", slot, st.plugin)
		}
		if st.walStatus == "lost" {
			return 0, needsOperator("slot %q was invalidated (wal_status = lost): PostgreSQL removed WAL it still needed, probably because of max_slot_wal_keep_size, "+
				"so changes after %s are gone from the source's WAL and the DR copy cannot be brought up to date from it. "+
				"Re-seed: run SELECT pg_drop_replication_slot('%s'); on the primary and restart the agent; it takes a fresh snapshot and the standby reloads it",
				slot, st.confirmedLSN, slot)
		}
		done, err := s.snapshotCompleted(ctx, st.confirmedLSN)
		if err != nil {
			return 0, err
		}
		if done {
			s.repl, err = s.replicationConn(ctx)
			if err != nil {
				return 0, err
			}
			s.log.Info().Str("slot", slot).Stringer("confirmed_lsn", st.confirmedLSN).Msg("resuming from the slot")
			return st.confirmedLSN, nil
		}
		s.log.Warn().Str("slot", slot).Msg("slot exists but its initial snapshot never completed (or is not in this stream); dropping the slot and taking a new snapshot")
		if _, err := s.ctrl.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, slot); err != nil {
			return 0, fmt.Errorf("drop incomplete slot %q: %w", slot, err)
		}
		// The session's start checked readability only without a slot; a
		// snapshot under row-level security would miss rows silently.
		if err := refuseUnreadable(ctx, s.ctrl, s.tables); err != nil {
			return 0, err
		}
	}
	// Say a snapshot is under way before the slot exists: if anything fails
	// from here until its end marker is stored, the next start knows the
	// slot it finds is not to be trusted.
	if err := s.putSnapshotState(ctx, wire.SnapshotState{SystemID: s.info.systemID, Database: s.info.database, Slot: slot, StreamCreated: s.stream.CachedInfo().Created}); err != nil {
		return 0, err
	}
	s.repl, err = s.replicationConn(ctx)
	if err != nil {
		return 0, err
	}
	created, err := pglogrepl.CreateReplicationSlot(ctx, s.repl, slot, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{SnapshotAction: "EXPORT_SNAPSHOT", Mode: pglogrepl.LogicalReplication})
	if err != nil {
		s.repl.Close(context.Background())
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) {
			switch pgErr.Code {
			case "42710":
				return 0, needsOperator("create slot %q: %v: a slot of that name exists in another database of the cluster; give this group another name", slot, err)
			case "53400":
				return 0, needsOperator("create slot %q: %v: raise max_replication_slots (and max_wal_senders) on the primary and restart it, or drop an unused slot", slot, err)
			}
		}
		return 0, fmt.Errorf("create slot %q: %w", slot, err)
	}
	consistent, err := pglogrepl.ParseLSN(created.ConsistentPoint)
	if err != nil {
		s.repl.Close(context.Background())
		return 0, fmt.Errorf("parse consistent point %q: %w", created.ConsistentPoint, err)
	}
	s.log.Info().Str("slot", slot).Stringer("consistent_lsn", consistent).Str("snapshot", created.SnapshotName).
		Int("tables", len(s.tables)).Msg("created slot; copying tables under its snapshot")
	if err := s.snapshot(ctx, created.SnapshotName, consistent); err != nil {
		s.repl.Close(context.Background())
		return 0, fmt.Errorf("initial snapshot: %w", err)
	}
	return consistent, nil
}

// snapshotCompleted reports whether the group's recorded snapshot was
// finished, for this slot on this system, at or before the slot's position.
func (s *session) snapshotCompleted(ctx context.Context, slotConfirmed pglogrepl.LSN) (bool, error) {
	st, err := s.snapshotState(ctx)
	if err != nil {
		return false, err
	}
	if st == nil {
		// No record (the bucket was lost or recreated): the stream's own
		// end marker, if it is the last snapshot message, still tells.
		return s.snapshotEndInStream(ctx, slotConfirmed)
	}
	return st.Done && st.SystemID == s.info.systemID && st.Slot == wire.SlotName(s.cfg.Group) &&
		st.SameStream(s.stream.CachedInfo().Created) && pglogrepl.LSN(st.SnapshotLSN) <= slotConfirmed, nil
}

// snapshotEndInStream reports whether the stream's last snapshot message is
// the end marker of a snapshot of this slot on this system, and records it.
func (s *session) snapshotEndInStream(ctx context.Context, slotConfirmed pglogrepl.LSN) (bool, error) {
	msg, err := s.stream.GetLastMsgForSubject(ctx, wire.SnapshotSubject(s.cfg.Group))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read the last snapshot message: %w", err)
	}
	c, err := s.decode(ctx, msg)
	if err != nil || c.Kind != havenpb.Kind_KIND_SNAPSHOT_END || c.SystemId != s.info.systemID ||
		c.Slot != wire.SlotName(s.cfg.Group) || pglogrepl.LSN(c.SnapshotLsn) > slotConfirmed {
		return false, nil
	}
	s.log.Warn().Msg("no snapshot state recorded in " + wire.StateBucket + "; the stream's end marker shows the snapshot finished: recording it")
	return true, s.putSnapshotState(ctx, wire.SnapshotState{SystemID: c.SystemId, Database: s.info.database, Slot: c.Slot, SnapshotLSN: c.SnapshotLsn,
		Done: true, StreamCreated: s.stream.CachedInfo().Created})
}

// snapshotState reads the group's snapshot state; nil when none is recorded.
func (s *session) snapshotState(ctx context.Context) (*wire.SnapshotState, error) {
	entry, err := s.state.Get(ctx, wire.SnapshotKey(s.cfg.Group))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read snapshot state of group %q: %w", s.cfg.Group, err)
	}
	var st wire.SnapshotState
	if err := json.Unmarshal(entry.Value(), &st); err != nil {
		return nil, fmt.Errorf("decode snapshot state of group %q: %w", s.cfg.Group, err)
	}
	return &st, nil
}

func (s *session) putSnapshotState(ctx context.Context, st wire.SnapshotState) error {
	value, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("encode snapshot state: %w", err)
	}
	if _, err := s.state.Put(ctx, wire.SnapshotKey(s.cfg.Group), value); err != nil {
		return fmt.Errorf("record snapshot state of group %q: %w", s.cfg.Group, err)
	}
	return nil
}

// backoff doubles a wait up to a bound.
type backoff struct{ cur, min, max time.Duration }

func newBackoff(min, max time.Duration) *backoff { return &backoff{min: min, max: max} }

func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else {
		b.cur = min(b.cur*2, b.max)
	}
	return b.cur
}

func (b *backoff) reset() { b.cur = 0 }
