package replicator

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// blockedError stops apply at one message: retrying cannot help until an
// operator acts (or the message is re-sent correctly).
type blockedError struct {
	seq    uint64
	reason string
	err    error
}

func (e *blockedError) Error() string {
	return fmt.Sprintf("apply stopped at stream message %d (%s): %v", e.seq, e.reason, e.err)
}
func (e *blockedError) Unwrap() error { return e.err }

// drFailure is a failure of DR's own (passingOnDR) while it applied the
// batch of stream message seq (the first of a transaction in it). isolate:
// it may come of many source transactions in one target transaction (DR's
// lock table, temp_file_limit), so the retry gives each its own.
type drFailure struct {
	seq     uint64
	isolate bool
	err     error
}

func (e *drFailure) Error() string { return e.err.Error() }
func (e *drFailure) Unwrap() error { return e.err }

// blocked returns the error that stops apply at message seq. A failure
// that is DR's own and passes once DR is fixed or by itself (passingOnDR)
// is a drFailure instead, which apply retries with backoff as it does a
// lost connection: the message is not at fault, and stopping at it would
// invite skipping it, which would lose it.
func blocked(seq uint64, reason string, format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	if what := passingOnDR(err); what != "" {
		var pgErr *pgconn.PgError
		isolate := errors.As(err, &pgErr) && (pgErr.Code == "53200" || pgErr.Code == "53400")
		return &drFailure{seq: seq, isolate: isolate, err: fmt.Errorf("%s; apply retries by itself and loses nothing (what DR has not committed stays in the stream): %w", what, err)}
	}
	return &blockedError{seq: seq, reason: reason, err: err}
}

// passingOnDR says what err reports when it is a condition of the DR
// server that does not depend on the change being applied, "" otherwise.
func passingOnDR(err error) string {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return ""
	}
	switch pgErr.Code {
	case "53100": // disk_full
		return "DR's disk is full: free space where DR keeps its data and WAL"
	case "53200": // out_of_memory, and out of shared memory for locks
		return "DR ran out of memory (for \"out of shared memory\", raise max_locks_per_transaction on DR)"
	case "53400": // configuration_limit_exceeded
		return "DR refused the change under one of its limits (such as temp_file_limit): raise it on DR"
	case "40P01": // deadlock_detected
		return "apply and another session on DR deadlocked"
	case "40001": // serialization_failure
		return "DR cancelled apply's transaction on a serialization failure"
	case "55P03": // lock_not_available
		return "a lock apply needs on DR was not granted in time (a lock_timeout or NOWAIT in a replayed statement): a session on DR holds it"
	}
	return ""
}

// partialTxn is a source transaction whose first chunks are applied in the
// open target transaction and whose last chunk has not arrived yet.
type partialTxn struct {
	commitLSN uint64
	xid       uint32
	next      uint32 // ordinal of the next change to apply
}

// batchEntry remembers what a pipelined statement was, to judge its result.
type batchEntry struct {
	matchesRow, insertsRows bool
	// tolerateMissing: the table is being backfilled, its row may not be
	// on DR yet.
	tolerateMissing bool
	table           string
	// rel and changes describe the rows, rendered only if one is missing.
	rel     *havenpb.Relation
	changes []*havenpb.Change
}

// refused names the table and rows of a statement DR refused.
func (e batchEntry) refused(err error) error {
	if e.table == "" || len(e.changes) == 0 {
		return err
	}
	const named = 5
	var rows []string
	for _, ch := range e.changes[:min(len(e.changes), named)] {
		rows = append(rows, identityText(e.rel, ch))
	}
	if n := len(e.changes); n > named {
		rows = append(rows, fmt.Sprintf("%d more", n-named))
	}
	op := strings.ToLower(strings.TrimPrefix(e.changes[0].Op.String(), "OP_"))
	return fmt.Errorf("%s of %s (rows %s): %w", op, e.table, strings.Join(rows, "; "), err)
}

// applier applies messages to the DR database over one connection, from
// one goroutine (a snapshot also loads in lanes of their own, load.go).
type applier struct {
	cfg     Config
	log     zerolog.Logger
	metrics *metrics
	conn    *pgx.Conn        // applies, in the database's own search_path
	pg      *pgconn.PgConn   // conn's lower layer, for pipelining
	pipe    *pgconn.Pipeline // open while batches are in flight (see send)

	stream        jetstream.Stream
	found         bool      // the DR database has a position for the group
	streamCreated time.Time // identity of the stream being applied
	pos           position  // committed on DR
	next          position  // pos plus what the open target transaction holds

	lastSeq     uint64               // last stream sequence handled in this session
	lastPending uint64               // messages the stream still held for us after it
	statements  map[string]*prepared // by shape key
	build       *builder
	relations   map[uint32]knownRelation // by source relation id
	checked     map[string]bool          // relation keys whose DR table was checked
	partitioned map[string]bool          // relation keys whose DR table is partitioned
	targetOID   map[string]uint32        // relation keys' DR tables
	backfilling map[uint32]string        // DR tables being backfilled: their names
	lag         *lagClock                // where the lag is reported to the controllers (nil: nowhere)
	control     *controlState            // where the applied position is reported to them (nil: nowhere)
	// replace lets a snapshot empty DR tables that hold rows although
	// haven never applied to them (a deposed primary rejoining), and
	// snapshotLoaded is told when it is loaded.
	replace        bool
	snapshotLoaded func()
	sequences      map[string]bool // qualified sequence name: exists on DR

	open         bool
	queued       []queuedStatement          // waiting to be sent
	encoding     paramEncoding              // parameters as sent (see send)
	batchRows    int                        // row changes queued
	runs         map[string]*tableRuns      // changes waiting to be batched, by relation key
	unique       map[uint32]map[string]bool // by DR table: columns whose updates are not batched (uniqueColumns)
	sent         []*sentBatch               // sent, their results not read yet (oldest first)
	load         *parallelLoad              // a snapshot loading in lanes (see load.go)
	groupTxns    int
	groupChanges int
	groupStarted time.Time
	toAck        jetstream.Msg
	partial      *partialTxn
	replayedDDL  bool   // the open group replayed DDL
	txnFirstSeq  uint64 // stream sequence of the first chunk of the transaction being applied
	// isolateThrough: up to this stream sequence, every source transaction
	// gets a target transaction of its own, so that a failure names exactly
	// the transaction that failed (set after apply failed inside a group).
	isolateThrough uint64
	// broken is set once DR failed a batch: what the open target
	// transaction and any commit sent ahead held is lost, and nothing more
	// is written in this session (it ends; the next one restarts from the
	// committed position).
	broken error
}

func newApplier(cfg Config, log zerolog.Logger, m *metrics, conn *pgx.Conn, stream jetstream.Stream, pos position, found bool) *applier {
	return &applier{cfg: cfg, log: log, metrics: m, conn: conn, pg: conn.PgConn(), stream: stream, pos: pos, next: pos, found: found,
		lastSeq: pos.streamSeq, statements: map[string]*prepared{}, build: newBuilder(), relations: map[uint32]knownRelation{}, checked: map[string]bool{}, partitioned: map[string]bool{}, sequences: map[string]bool{},
		targetOID: map[string]uint32{}, backfilling: map[uint32]string{}, runs: map[string]*tableRuns{}, unique: map[uint32]map[string]bool{}}
}

// inbound is a stream message, decoded ahead of apply (see readAhead).
type inbound struct {
	msg   jetstream.Msg
	meta  *jetstream.MsgMetadata
	chunk *havenpb.Chunk
	size  int   // of its payload
	plain bool  // its payload is not compressed
	err   error // why it could not be decoded
	fail  error // why reading the stream failed (the last value)
}

// decode reads a message's metadata and decodes its chunk, read from the
// group's object store when stored there (a decoding failure is kept in
// err, for handle to report; the store failing ends the reader).
func decode(ctx context.Context, js jetstream.JetStream, group string, msg jetstream.Msg, d *wire.Decoder) (inbound, error) {
	meta, err := msg.Metadata()
	if err != nil {
		return inbound{}, fmt.Errorf("message metadata: %w", err)
	}
	in := inbound{msg: msg, meta: meta}
	encoding, payload, err := wire.Payload(ctx, js, group, msg.Headers(), msg.Data())
	switch {
	case errors.Is(err, wire.ErrCorrupt) || errors.Is(err, wire.ErrTooLarge):
		in.err = err
	case err != nil:
		return inbound{}, fmt.Errorf("message %d: %w", meta.Sequence.Stream, err)
	default:
		in.size, in.plain = len(payload), encoding == wire.EncodingProto
		in.chunk, in.err = d.Decode(encoding, msg.Headers().Get(wire.HeaderFormat), payload)
	}
	return in, nil
}

// handle applies one stream message (or skips a duplicate).
func (a *applier) handle(ctx context.Context, in inbound) error {
	seq := in.meta.Sequence.Stream
	if seq <= a.lastSeq {
		// A redelivery of something already handled in this session.
		return nil
	}
	if seq != a.lastSeq+1 {
		return a.stop(ctx, a.gap(ctx, seq))
	}
	msg, meta, chunk := in.msg, in.meta, in.chunk
	if in.err != nil {
		return a.stop(ctx, blocked(seq, "undecodable", "%w", in.err))
	}
	if chunk.Group != a.cfg.Group {
		return a.stop(ctx, blocked(seq, "foreign", "message of group %q on group %q's stream", chunk.Group, a.cfg.Group))
	}
	if chunk.Kind != havenpb.Kind_KIND_SNAPSHOT_BEGIN && a.next.systemID != 0 && chunk.SystemId != a.next.systemID {
		return a.stop(ctx, blocked(seq, "foreign", "message from source system %d, but the DR copy follows system %d", chunk.SystemId, a.next.systemID))
	}
	if chunk.Epoch < a.next.epoch {
		// Written by a primary deposed since: it must not reach DR.
		return a.stop(ctx, blocked(seq, "stale epoch", "message of epoch %d, but the DR copy follows epoch %d: a deposed primary's agent wrote it (fence it; haven skip drops the message)",
			chunk.Epoch, a.next.epoch))
	}
	a.metrics.pending.Set(float64(meta.NumPending))
	var err error
	switch chunk.Kind {
	case havenpb.Kind_KIND_TRANSACTION:
		if err = a.finishLoad(ctx); err == nil {
			err = a.transaction(ctx, seq, msg, chunk)
		}
	default:
		err = a.snapshot(ctx, seq, msg, chunk)
	}
	if err != nil {
		var be *blockedError
		if errors.As(err, &be) {
			if chunk.Kind == havenpb.Kind_KIND_TRANSACTION && a.partial != nil {
				// Name the transaction's first message: that is what an
				// operator inspects and, if need be, skips.
				be.seq = a.txnFirstSeq
			}
			return a.stop(ctx, err)
		}
		return err
	}
	a.lastSeq = seq
	a.lastPending = meta.NumPending
	if a.control != nil {
		a.control.unapplied.Store(meta.NumPending)
	}
	return nil
}

// errNotDelivered: a message still in the stream was skipped by the client;
// the next session reads it again, at once.
var errNotDelivered = errors.New("not delivered")

// errReconnected ends a session whose NATS connection was lost and made
// again before it handles another message: the server may have come back
// without messages it had acknowledged (one replica, not synced to disk),
// and handing their sequence numbers out again to new messages, which the
// session would take for ones it had applied and skip. The next session
// starts by checking the stream still holds what DR applied, at once.
var errReconnected = errors.New("reconnected to NATS: a new session checks that the stream still holds what DR applied before reading on")

// gap explains a message that arrived after a missing one. A message that
// is still in the stream was only not delivered (the client dropped it as a
// slow consumer): the session restarts and reads it again. One that is gone
// can never be applied.
func (a *applier) gap(ctx context.Context, got uint64) error {
	missing := a.lastSeq + 1
	_, err := a.stream.GetMsg(ctx, missing)
	switch {
	case err == nil:
		return fmt.Errorf("message %d was %w before message %d; reading the stream again from it", missing, errNotDelivered, got)
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return blocked(got, "gap", "expected stream sequence %d next but got %d: messages were removed from the stream "+
			"(retention limits or a purge) before the DR site applied them; the DR copy cannot be completed from this stream, re-seed it "+
			"(drop the agent's slot so it takes a new snapshot)", missing, got)
	default:
		return fmt.Errorf("look up message %d missing before message %d: %w", missing, got, err)
	}
}

// stop ends the open target transaction before apply halts at a message:
// complete source transactions in it are committed, a partial one is
// rolled back.
func (a *applier) stop(ctx context.Context, err error) error {
	if lerr := a.finishLoad(ctx); lerr != nil {
		return errors.Join(err, lerr)
	}
	if a.open {
		if a.partial == nil {
			if cerr := a.commit(ctx); cerr != nil {
				return errors.Join(err, cerr)
			}
		} else {
			_ = a.rollback(ctx) // the session ends with err
		}
	}
	return err
}

func (a *applier) transaction(ctx context.Context, seq uint64, msg jetstream.Msg, c *havenpb.Chunk) error {
	if !a.next.snapshotDone {
		return blocked(seq, "no snapshot", "transaction at %s before any complete initial snapshot: the stream does not begin with the group's snapshot "+
			"(it aged out, or was purged); re-seed the DR copy", pglogrepl.LSN(c.CommitLsn))
	}
	if c.CommitLsn <= uint64(a.next.commitLSN) {
		// Already applied: a copy the dedupe window let through.
		a.metrics.duplicates.Inc()
		a.skip(msg)
		return nil
	}
	switch {
	case a.partial != nil && a.partial.commitLSN != c.CommitLsn:
		return blocked(seq, "out of order", "transaction at %s starts while transaction at %s is incomplete",
			pglogrepl.LSN(c.CommitLsn), pglogrepl.LSN(a.partial.commitLSN))
	case a.partial != nil && c.FirstChange == 0 && a.partial.next > 0:
		// The agent restarted and sends the transaction again from its
		// start: drop what was applied of it (it is alone in the open
		// target transaction) and begin again.
		a.log.Warn().Stringer("commit_lsn", pglogrepl.LSN(c.CommitLsn)).Uint32("xid", c.Xid).
			Msg("transaction republished from its first change; applying it again from there")
		if err := a.rollback(ctx); err != nil {
			return err // a group committed ahead failed: nothing may follow it
		}
		a.partial = &partialTxn{commitLSN: c.CommitLsn, xid: c.Xid}
		a.txnFirstSeq = seq
	case a.partial != nil && c.FirstChange > a.partial.next:
		return blocked(seq, "out of order", "transaction at %s continues at change %d, but only %d changes of it arrived",
			pglogrepl.LSN(c.CommitLsn), c.FirstChange, a.partial.next)
	case a.partial == nil && c.FirstChange != 0:
		return blocked(seq, "out of order", "chunk starting at change %d of transaction at %s without its beginning", c.FirstChange, pglogrepl.LSN(c.CommitLsn))
	case a.partial == nil && a.missingBefore(c):
		return blocked(seq, "stream lost messages", "transaction at %s follows the transaction at %s in the stream, but the last one DR applied is at %s: "+
			"the stream lost the messages between them before DR read them (a JetStream server without sync to disk that crashed, "+
			"and handed their sequence numbers out again). Those transactions are gone from the stream, and the agent's slot is past them: "+
			"re-seed the DR copy (drop the agent's slot: SELECT pg_drop_replication_slot('%s') on the primary), and run JetStream with three replicas",
			pglogrepl.LSN(c.CommitLsn), pglogrepl.LSN(c.PrevCommitLsn), a.next.commitLSN, wire.SlotName(a.cfg.Group))
	case a.partial == nil:
		if a.open && (!c.LastChunk || seq <= a.isolateThrough) {
			// Keep a multi-chunk transaction alone in its target transaction,
			// so that starting it again never undoes others.
			if err := a.commit(ctx); err != nil {
				return err
			}
		}
		a.partial = &partialTxn{commitLSN: c.CommitLsn, xid: c.Xid}
		a.txnFirstSeq = seq
	}
	// A chunk published again after a restart may overlap what arrived.
	changes := c.Changes
	if overlap := int(a.partial.next) - int(c.FirstChange); overlap > 0 {
		changes = changes[min(overlap, len(changes)):]
	}
	if err := a.begin(ctx); err != nil {
		return err
	}
	if err := a.applyChanges(ctx, seq, c.Relations, changes); err != nil {
		return err
	}
	a.partial.next = max(a.partial.next, c.FirstChange+uint32(len(c.Changes)))
	if !c.LastChunk {
		return nil
	}
	a.partial = nil
	a.next.streamSeq = seq
	a.next.commitLSN = pglogrepl.LSN(c.CommitLsn)
	a.next.commitTime = time.UnixMicro(c.CommitTimeUs)
	a.next.epoch = c.Epoch
	if hb := c.Heartbeat; hb != nil {
		a.next.heartbeatAt = time.UnixMicro(hb.EmittedAtUs)
		a.next.sourceWALLSN = pglogrepl.LSN(hb.WalLsn)
		if err := a.advanceSequences(ctx, hb.Sequences); err != nil {
			return err
		}
	}
	a.groupTxns++
	a.toAck = msg
	// A transaction that changed the schema ends its group: what follows may
	// rely on it being committed (a new enum value cannot be used in the
	// transaction that added it).
	if a.replayedDDL || seq <= a.isolateThrough {
		return a.commit(ctx)
	}
	if a.groupChanges >= a.cfg.GroupChanges || time.Since(a.groupStarted) >= a.cfg.GroupDelay {
		return a.commitAhead(ctx)
	}
	return nil
}

// missingBefore says whether the stream lacks transactions between the
// last one DR applied and the first chunk c of a new one: c names the
// transaction before it, and DR applied an earlier one last. Only where DR
// applied a transaction of the same source since its snapshot, and the
// agent knew the one before c.
func (a *applier) missingBefore(c *havenpb.Chunk) bool {
	applied := a.next.commitLSN
	return c.PrevCommitLsn != 0 && c.SystemId == a.next.systemID && applied >= a.next.snapshotLSN && pglogrepl.LSN(c.PrevCommitLsn) > applied
}

// advanceSeqSQL moves a DR sequence forward to a value sampled on the
// source, never back (in its own direction for descending sequences).
const advanceSeqSQL = `SELECT setval(format('%I.%I', $1::text, $2::text)::regclass, $3::bigint)
	FROM pg_sequences WHERE schemaname = $1 AND sequencename = $2
	AND (last_value IS NULL OR (increment_by > 0 AND last_value < $3::bigint) OR (increment_by < 0 AND last_value > $3::bigint))`

// advanceSequences queues the setval of every sampled sequence that exists
// on DR; a missing one is reported once per session.
func (a *applier) advanceSequences(ctx context.Context, seqs []*havenpb.SequenceValue) error {
	for _, v := range seqs {
		name := pgx.Identifier{v.Schema, v.Name}.Sanitize()
		exists, known := a.sequences[name]
		if !known {
			if err := a.settle(); err != nil {
				return err
			}
			var oid *uint32
			if err := a.conn.QueryRow(ctx, `SELECT to_regclass($1)::oid`, name).Scan(&oid); err != nil {
				return fmt.Errorf("look up sequence %s on DR: %w", name, err)
			}
			exists = oid != nil
			a.sequences[name] = exists
			if !exists {
				a.log.Warn().Str("sequence", v.Schema+"."+v.Name).Msg("sequence used on the primary does not exist on DR; its value is not replicated: create it on DR")
			}
		}
		if exists {
			a.queue(advanceSeqSQL, [][]byte{[]byte(v.Schema), []byte(v.Name), []byte(strconv.FormatInt(v.LastValue, 10))}, batchEntry{})
		}
	}
	return nil
}

// skip acknowledges a message that needs no work, now if nothing is open.
func (a *applier) skip(msg jetstream.Msg) {
	if a.open {
		return
	}
	if err := msg.Ack(); err != nil {
		a.log.Debug().Err(err).Msg("ack of a skipped message failed; it will be redelivered and skipped again")
	}
}

func (a *applier) begin(ctx context.Context) error {
	if a.open {
		return nil
	}
	a.clearQueue()
	a.queue("BEGIN", nil, batchEntry{})
	a.open = true
	a.groupTxns, a.groupChanges = 0, 0
	a.groupStarted = time.Now()
	return nil
}

// relation finds a chunk's relation by id, with its key (wire.Decode
// checked that the chunk describes every relation its changes name).
func (a *applier) relation(relations []*havenpb.Relation, id uint32) (*havenpb.Relation, string) {
	for _, r := range relations {
		if r.Id != id {
			continue
		}
		if known, ok := a.relations[id]; ok && (known.last == r || sameShape(known.rel, r)) {
			if known.last != r {
				known.last = r
				a.relations[id] = known
			}
			return r, known.key
		}
		key := relationKey(r)
		a.relations[id] = knownRelation{rel: shapeOf(r), key: key, last: r}
		return r, key
	}
	return nil, ""
}

func (a *applier) applyChanges(ctx context.Context, seq uint64, relations []*havenpb.Relation, changes []*havenpb.Change) error {
	for i, ch := range changes {
		if ch.Op == havenpb.Op_OP_BACKFILL {
			if err := a.backfill(ctx, seq, ch.Backfill, i == 0 && a.partial != nil && a.partial.next == 0); err != nil {
				return err
			}
			continue
		}
		if ch.Op == havenpb.Op_OP_TRUNCATE {
			if err := a.sendAllRuns(ctx); err != nil {
				return err
			}
			targets := make([]*havenpb.Relation, len(ch.TruncateRelationIds))
			partitioned := make([]bool, len(targets))
			for i, id := range ch.TruncateRelationIds {
				rel, key := a.relation(relations, id)
				targets[i] = rel
				if err := a.checkRelation(ctx, seq, rel, key); err != nil {
					return err
				}
				partitioned[i] = a.partitioned[key]
			}
			a.queue(truncateSQL(targets, partitioned, ch), nil, batchEntry{})
		} else {
			rel, relKey := a.relation(relations, ch.RelationId)
			// Checked at first use, not per chunk: a DDL replayed earlier in
			// the chunk may just have created or changed the table.
			if err := a.checkRelation(ctx, seq, rel, relKey); err != nil {
				return err
			}
			if ch.Op == havenpb.Op_OP_INSERT && rel.Schema == "haven" && rel.Name == "ddl_log" {
				if err := a.replayDDL(ctx, seq, rel, ch.New); err != nil {
					return err
				}
			}
			st, err := a.build.build(rel, relKey, a.partitioned[relKey], ch)
			if err != nil {
				return blocked(seq, "unappliable", "%w", err)
			}
			waiting, err := a.wait(ctx, rel, relKey, ch, st)
			if err != nil {
				return err
			}
			if !waiting {
				p, err := a.prepare(ctx, st.key, st.sql)
				if err != nil {
					return err
				}
				a.queuePrepared(p, slices.Clone(st.params), batchEntry{matchesRow: st.matchesRow, insertsRows: st.insertsRows, tolerateMissing: a.backfilling[a.targetOID[relKey]] != "",
					table: rel.Schema + "." + rel.Name, rel: rel, changes: []*havenpb.Change{ch}})
				a.batchRows++
			}
		}
		a.groupChanges++
		if a.batchRows >= a.cfg.PipelineStatements {
			if err := a.send(ctx, seq); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkRelation makes sure the DR table of a relation exists with matching
// columns, once per relation shape and session.
func (a *applier) checkRelation(ctx context.Context, seq uint64, rel *havenpb.Relation, key string) error {
	if a.checked[key] {
		return nil
	}
	if err := a.settle(); err != nil {
		return err
	}
	target, err := readTarget(ctx, a.conn, rel.Schema, rel.Name)
	if err != nil {
		return err
	}
	if !target.exists {
		return blocked(seq, "missing table", "table %s.%s does not exist on DR; create it there (it was not part of the initial snapshot)", rel.Schema, rel.Name)
	}
	if err := checkTarget(rel, target); err != nil {
		return blocked(seq, "schema mismatch", "%w", err)
	}
	a.warnFiringTriggers(ctx, rel)
	a.checked[key] = true
	a.partitioned[key] = target.partitioned
	a.targetOID[key] = target.oid
	return nil
}

// warnFiringTriggers says which DR triggers and rules fire while haven
// applies (ENABLE ALWAYS or REPLICA): one that also runs on the primary has
// its effects arrive twice, once through the stream and once from itself,
// and a rule or trigger that drops or diverts rows leaves DR without them.
func (a *applier) warnFiringTriggers(ctx context.Context, rel *havenpb.Relation) {
	rows, err := a.conn.Query(ctx, `SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgrelid = to_regclass($1) AND NOT tgisinternal AND tgenabled IN ('A', 'R')
		UNION ALL SELECT 'rule ' || rulename FROM pg_rewrite WHERE ev_class = to_regclass($1) AND rulename <> '_RETURN' AND ev_enabled IN ('A', 'R')`,
		pgx.Identifier{rel.Schema, rel.Name}.Sanitize())
	if err != nil {
		return
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil || len(names) == 0 {
		return
	}
	a.log.Warn().Str("table", rel.Schema+"."+rel.Name).Strs("triggers", names).
		Msg("these DR triggers and rules fire while haven applies (ENABLE ALWAYS or REPLICA); if they also run on the primary, what they write arrives twice, " +
			"and one that drops or diverts rows leaves DR without them: ALTER TABLE … ENABLE TRIGGER … (or ENABLE RULE …) on DR to keep them to local writes")
}

// prepared is a statement prepared on DR.
type prepared struct {
	name   string
	binary []binaryParam // parameters sent in binary (see binparams.go)
}

// prepare returns the prepared statement for a shape (key), preparing its
// SQL the first time.
func (a *applier) prepare(ctx context.Context, key string, text func() string) (*prepared, error) {
	if p, ok := a.statements[key]; ok {
		return p, nil
	}
	if err := a.settle(); err != nil {
		return nil, err
	}
	name := "haven_" + strconv.Itoa(len(a.statements))
	sql := text()
	desc, err := a.pg.Prepare(ctx, name, sql, nil)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) {
			// The DR table cannot take the change as sent (a column type or
			// constraint differs): retrying does not help.
			return nil, blocked(a.txnFirstSeq, "apply failed", "prepare %q: %w", sql, err)
		}
		return nil, fmt.Errorf("prepare %q: %w", sql, err)
	}
	p := &prepared{name: name, binary: binaryParams(desc.ParamOIDs)}
	a.statements[key] = p
	return p, nil
}

// queuedStatement is a statement to send, a prepared one or SQL, with what
// judges its result.
type queuedStatement struct {
	prepared *prepared
	sql      string
	params   [][]byte
	entry    batchEntry
}

// queue adds a statement to those to send.
func (a *applier) queue(sql string, params [][]byte, e batchEntry) {
	a.queued = append(a.queued, queuedStatement{sql: sql, params: params, entry: e})
}

// queuePrepared adds a prepared statement to those to send.
func (a *applier) queuePrepared(p *prepared, params [][]byte, e batchEntry) {
	a.queued = append(a.queued, queuedStatement{prepared: p, params: params, entry: e})
}

func (a *applier) clearQueue() {
	clear(a.queued)
	a.queued = a.queued[:0]
	a.batchRows = 0
}

// sentBatch is a batch of statements, ending in a sync point, that the DR
// server executes while the next ones are built and sent.
type sentBatch struct {
	statements []queuedStatement
	seq        uint64 // the message being applied when it was sent
	firstSeq   uint64 // … and the first message of its transaction
	// committed: the batch ends a target transaction.
	committed *committedGroup
}

// sendDepth is how many batches may be in flight: one executing on DR and
// two waiting behind it, so that DR does not wait for the next while the
// standby is held up for a moment (the CPU it shares, a garbage
// collection). With one waiting, DR's apply backend was idle in its
// transaction in 11% of samples during catch-up.
const sendDepth = 3

// flush sends every waiting change and the pipelined statements, and
// judges their results.
func (a *applier) flush(ctx context.Context, seq uint64) error {
	if err := a.sendAllRuns(ctx); err != nil {
		return err
	}
	if err := a.send(ctx, seq); err != nil {
		return err
	}
	return a.settle()
}

// send sends the queued statements in pipeline mode, as one batch: the DR
// server executes them while the caller goes on. Batches sent before are
// judged first while too many are in flight, and while a COMMIT is in
// flight, unless the batch opens the next target transaction and does not
// commit it. Behind a COMMIT that failed, statements outside a transaction
// block would run on their own, and a second COMMIT would commit what
// follows the failed group without it; a transaction opened behind it is
// rolled back, never committed (the failure ends pipeline mode and the
// session with it, see fail). So DR goes from one group to the next without
// waiting for the standby to hear of the commit. Whatever uses the
// connection next must settle first (flush does).
func (a *applier) send(ctx context.Context, seq uint64) error {
	if a.broken != nil {
		return a.broken
	}
	if len(a.queued) == 0 {
		return nil
	}
	opens := a.queued[0].sql == "BEGIN" && a.queued[len(a.queued)-1].sql != "COMMIT"
	for n := len(a.sent); n > 0 && (n >= sendDepth || (!opens && a.committing())); n = len(a.sent) {
		if err := a.settleOldest(); err != nil {
			return err
		}
	}
	if a.pipe == nil {
		a.pipe = a.pg.StartPipeline(ctx)
	}
	for _, q := range a.queued {
		switch {
		case q.prepared == nil:
			a.pipe.SendQueryParams(q.sql, q.params, nil, nil, nil)
		case len(q.prepared.binary) == 0:
			a.pipe.SendQueryPrepared(q.prepared.name, q.params, nil, nil)
		default:
			params, formats := a.encoding.encode(q.params, q.prepared.binary)
			a.pipe.SendQueryPrepared(q.prepared.name, params, formats, nil)
		}
	}
	if err := a.pipe.Sync(); err != nil { // the connection is closed
		return a.fail(fmt.Errorf("send to DR: %w", err))
	}
	a.sent = append(a.sent, &sentBatch{statements: a.queued, seq: seq, firstSeq: a.txnFirstSeq})
	a.queued = make([]queuedStatement, 0, cap(a.queued)) // the batch keeps its own
	a.batchRows = 0
	return nil
}

// committing: a batch in flight commits a target transaction.
func (a *applier) committing() bool {
	return slices.ContainsFunc(a.sent, func(b *sentBatch) bool { return b.committed != nil })
}

// settle reads and judges the results of the batches in flight, if any,
// and leaves pipeline mode.
func (a *applier) settle() error {
	if a.broken != nil {
		return a.broken
	}
	for len(a.sent) > 0 {
		if err := a.settleOldest(); err != nil {
			return err
		}
	}
	if a.pipe == nil {
		return nil
	}
	err := a.pipe.Close()
	a.pipe = nil
	if err != nil {
		return fmt.Errorf("leave pipeline mode: %w", err)
	}
	return nil
}

// settleOldest reads and judges the results of the oldest batch in flight.
// When it failed, the batches behind it failed too (the transaction is
// aborted): pipeline mode is left, what was not committed is forgotten,
// and the first error returned, now and from then on (broken).
func (a *applier) settleOldest() error {
	b := a.sent[0]
	a.sent[0] = nil // judged, its rows need not stay in memory
	a.sent = a.sent[1:]
	err := a.judge(b)
	if err == nil {
		if b.committed != nil {
			a.confirm(b.committed)
		}
		return nil
	}
	_ = a.pipe.Close() // reads what is left; the errors behind the first say nothing new
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && !connectionLost(pgErr) {
		// Name the first message of the transaction being applied: with
		// one transaction per target transaction (as after such a stop,
		// see isolateThrough) that is the message to inspect or skip.
		return a.fail(blocked(b.firstSeq, "apply failed", "%w", err))
	}
	return a.fail(fmt.Errorf("apply batch: %w", err))
}

// fail ends pipeline mode after DR failed a batch or the connection broke:
// what was not committed is forgotten, and err is returned from then on.
func (a *applier) fail(err error) error {
	a.pipe, a.sent = nil, nil
	a.forget()
	a.broken = err
	return err
}

// judge reads a batch's results up to its sync point: it returns the first
// error, and reports rows an update or delete did not find.
func (a *applier) judge(b *sentBatch) error {
	var failed error
	for i := 0; ; i++ {
		res, err := a.pipe.GetResults()
		var pgErr *pgconn.PgError
		switch {
		case errors.As(err, &pgErr) && failed == nil && i < len(b.statements):
			// The server skips the rest of the batch; its sync comes next.
			failed = b.statements[i].entry.refused(err)
			continue
		case errors.As(err, &pgErr):
			continue
		case err != nil:
			return err
		}
		switch r := res.(type) {
		case *pgconn.PipelineSync:
			return failed
		case *pgconn.ResultReader:
			result := r.Read()
			if result.Err != nil && failed == nil && i < len(b.statements) {
				failed = b.statements[i].entry.refused(result.Err)
			} else if result.Err != nil {
				failed = cmp.Or(failed, result.Err)
			} else if failed == nil && i < len(b.statements) {
				a.reportMissing(b, b.statements[i].entry, result)
			}
		default:
			return fmt.Errorf("pipeline: result %T where the results of a batch were due", res)
		}
	}
}

// reportMissing reports the rows an update or delete did not find on DR,
// and rows of an insert that DR did not keep.
func (a *applier) reportMissing(b *sentBatch, e batchEntry, r *pgconn.Result) {
	if kept := r.CommandTag.RowsAffected(); e.insertsRows && kept < int64(len(e.changes)) {
		a.metrics.conflicts.WithLabelValues(e.table).Add(float64(int64(len(e.changes)) - kept))
		a.log.Error().Str("table", e.table).Int64("kept", kept).Int("inserted", len(e.changes)).Uint64("seq", b.seq).
			Msg("DR kept fewer rows than an insert from the primary carried: a DR rule, or a DR trigger that fires during apply (ENABLE ALWAYS or REPLICA), dropped them; the DR copy has drifted, run a consistency audit")
		return
	}
	if !e.matchesRow || e.tolerateMissing || r.CommandTag.RowsAffected() == int64(len(e.changes)) {
		return
	}
	found := make(map[string]bool, len(r.Rows))
	for _, row := range r.Rows {
		found[string(row[0])] = true
	}
	for n, ch := range e.changes {
		if len(e.changes) == 1 || !found[strconv.Itoa(n+1)] {
			a.metrics.conflicts.WithLabelValues(e.table).Inc()
			a.log.Error().Str("table", e.table).Str("key", identityText(e.rel, ch)).Uint64("seq", b.seq).
				Msg("an update or delete from the primary found no row on DR: the DR copy had drifted (was it written to directly?); run a consistency audit")
		}
	}
}

// identityText renders the identity of the row a change looks for, for a
// log line: key=value pairs, long values cut.
func identityText(rel *havenpb.Relation, ch *havenpb.Change) string {
	if rel == nil || ch == nil {
		return ""
	}
	row := ch.Old
	if row == nil {
		row = ch.New
	}
	var parts []string
	for i, c := range rel.Columns {
		if !c.Key || row == nil || i >= len(row.Values) {
			continue
		}
		v := "NULL"
		if d := row.Values[i]; d.Kind == havenpb.DatumKind_DATUM_TEXT {
			v = string(d.Text)
			if len(v) > 64 {
				v = v[:64] + "…"
			}
		}
		parts = append(parts, c.Name+"="+v)
	}
	return strings.Join(parts, ", ")
}

// connectionLost reports errors that end the session rather than judge the
// change (the DR server shutting down or restarting, an administrator
// ending the session): apply retries them.
func connectionLost(err *pgconn.PgError) bool {
	return err.Severity == "FATAL" || err.Severity == "PANIC" || strings.HasPrefix(err.Code, "57") || strings.HasPrefix(err.Code, "08")
}

// commit ends the open target transaction with the position of its last
// complete source transaction and waits until DR has committed it.
func (a *applier) commit(ctx context.Context) error {
	if err := a.commitAhead(ctx); err != nil {
		return err
	}
	if err := a.settle(); err != nil {
		a.rollback(ctx)
		return err
	}
	return nil
}

// committedGroup is a target transaction whose COMMIT is sent: once DR
// confirms it, its position holds and its messages are acknowledged.
type committedGroup struct {
	pos           position
	txns, changes int
	toAck         jetstream.Msg
}

// commitAhead sends the end of the open target transaction, with the
// position of its last complete source transaction, without waiting: DR
// commits while the next group is built, and the next settle confirms it.
func (a *applier) commitAhead(ctx context.Context) error {
	if !a.open {
		return nil
	}
	if err := a.sendAllRuns(ctx); err != nil {
		a.rollback(ctx)
		return err
	}
	a.queue(savePositionSQL, a.next.params(a.cfg.Group), batchEntry{})
	a.queue("COMMIT", nil, batchEntry{})
	group := &committedGroup{pos: a.next, txns: a.groupTxns, changes: a.groupChanges, toAck: a.toAck}
	if err := a.send(ctx, a.next.streamSeq); err != nil {
		a.rollback(ctx)
		return err
	}
	a.sent[len(a.sent)-1].committed = group
	a.open = false
	a.replayedDDL = false
	a.toAck = nil
	return nil
}

// confirm records a target transaction DR committed.
func (a *applier) confirm(g *committedGroup) {
	a.found = true
	a.pos = g.pos
	a.metrics.transactions.Add(float64(g.txns))
	a.metrics.changes.Add(float64(g.changes))
	a.metrics.groups.Inc()
	a.showApplied()
	if !a.pos.commitTime.IsZero() {
		a.metrics.lagSeconds.Set(time.Since(a.pos.commitTime).Seconds())
		if a.lag != nil {
			a.lag.applied(a.pos.commitTime)
		}
	}
	if g.toAck != nil {
		if err := g.toAck.Ack(); err != nil {
			a.log.Debug().Err(err).Msg("ack failed; the messages will be redelivered and skipped")
		}
	}
}

// showApplied reports a.pos as what DR holds: on the metric, and to the
// controllers, who measure a drill's RPO and choose what to promote by it.
func (a *applier) showApplied() {
	a.metrics.appliedLSN.Set(float64(a.pos.commitLSN))
	if a.control != nil {
		a.control.appliedLSN.Store(uint64(a.pos.commitLSN))
	}
}

// lagClock is how far DR is behind, as the controllers are told: the age
// of the last applied source commit, read when asked (a standby stuck in a
// long snapshot load or a backlog falls further behind as time passes),
// or 0 once it has applied the whole stream.
type lagClock struct {
	commitUs  atomic.Int64 // the last applied source commit
	currentUs atomic.Int64 // when apply last found nothing left to apply
}

// currentFor is how long a finding that nothing is left stays true: an
// apply session that works finds it again at every idle moment; one that
// died or hangs does not, and its lag grows from its last commit.
const currentFor = 2 * time.Second

// start begins a session at position pos: not current until shown so;
// without a commit applied yet, behind since now.
func (l *lagClock) start(pos position) {
	at := pos.commitTime
	if at.IsZero() {
		at = time.Now()
	}
	l.commitUs.Store(at.UnixMicro())
	l.currentUs.Store(0)
}

func (l *lagClock) applied(commit time.Time) {
	l.commitUs.Store(commit.UnixMicro())
	l.currentUs.Store(0)
}

func (l *lagClock) caughtUp() { l.currentUs.Store(time.Now().UnixMicro()) }

// seconds is the lag now.
func (l *lagClock) seconds() float64 {
	if at := l.currentUs.Load(); at != 0 && time.Since(time.UnixMicro(at)) < currentFor {
		return 0
	}
	return max(0, time.Since(time.UnixMicro(l.commitUs.Load())).Seconds())
}

// rollback abandons the open target transaction; apply goes on from the
// committed position. It returns an error when a commit sent ahead failed
// meanwhile: apply must then not go on in this session, or it would
// commit what follows the failed group without it.
func (a *applier) rollback(ctx context.Context) error {
	err := a.settle()
	a.forget()
	if a.pg.TxStatus() != 'I' {
		if err := a.pg.Exec(ctx, "ROLLBACK").Close(); err != nil {
			a.log.Warn().Err(err).Msg("rollback failed")
		}
	}
	if a.pg.IsClosed() {
		return err // the session ends; the next one reads them
	}
	if err := a.loadBackfills(ctx); err != nil {
		a.log.Warn().Err(err).Msg("re-read the tables being backfilled after a rollback")
	}
	return err
}

// forget drops what the open target transaction holds.
func (a *applier) forget() {
	a.clearQueue()
	clear(a.runs)
	a.open = false
	a.replayedDDL = false
	a.partial = nil
	a.next = a.pos
	a.toAck = nil
}

// idle is called when no message arrived for a moment: a group of complete
// source transactions is committed rather than kept waiting.
func (a *applier) idle(ctx context.Context) error {
	if p := a.load; p != nil {
		if p.group != nil && time.Since(p.groupStarted) >= a.cfg.GroupDelay {
			if err := a.endLoadGroup(ctx); err != nil {
				return err
			}
		}
		return a.confirmLoaded(false)
	}
	if a.open && a.partial == nil {
		if err := a.commit(ctx); err != nil {
			return err
		}
	}
	if err := a.settle(); err != nil { // a commit sent ahead
		a.rollback(ctx)
		return err
	}
	if !a.open && a.lastPending == 0 {
		// Nothing buffered, nothing left in the stream: DR is current.
		a.metrics.lagSeconds.Set(0)
		if a.lag != nil {
			a.lag.caughtUp()
		}
	}
	return nil
}

func (a *applier) snapshot(ctx context.Context, seq uint64, msg jetstream.Msg, c *havenpb.Chunk) error {
	copied := c.Kind == havenpb.Kind_KIND_SNAPSHOT_COPY || c.Kind == havenpb.Kind_KIND_SNAPSHOT_COPY_BINARY
	if copied && !a.next.snapshotDone && uint64(a.next.snapshotLSN) == c.SnapshotLsn && a.next.systemID == c.SystemId {
		return a.loadChunk(ctx, seq, msg, c)
	}
	if err := a.finishLoad(ctx); err != nil {
		return err
	}
	if a.open {
		if a.partial != nil {
			return blocked(seq, "out of order", "snapshot message while transaction at %s is incomplete", pglogrepl.LSN(a.partial.commitLSN))
		}
		if err := a.commit(ctx); err != nil {
			return err
		}
	}
	if c.Kind != havenpb.Kind_KIND_SNAPSHOT_BEGIN && (a.next.snapshotDone || uint64(a.next.snapshotLSN) != c.SnapshotLsn || a.next.systemID != c.SystemId) {
		if a.next.snapshotDone && uint64(a.next.snapshotLSN) == c.SnapshotLsn {
			// Part of the snapshot already loaded (a redelivery after restart).
			a.skip(msg)
			return nil
		}
		return blocked(seq, "out of order", "snapshot chunk of snapshot %s, but the DR copy is at snapshot %s (complete: %v)",
			pglogrepl.LSN(c.SnapshotLsn), a.next.snapshotLSN, a.next.snapshotDone)
	}
	if c.Kind == havenpb.Kind_KIND_SNAPSHOT_BEGIN {
		if err := a.settle(); err != nil {
			return err
		}
		if err := refuseSnapshotOfTarget(ctx, a.conn, c); err != nil {
			return err
		}
		protectDR(ctx, a.conn, a.log)
	}
	if c.Kind == havenpb.Kind_KIND_SNAPSHOT_BEGIN && c.SchemaSql != "" {
		// Before the transaction that prepares the tables, so that it sees
		// what the script created.
		if err := a.createMissingSchema(ctx, seq, c); err != nil {
			return err
		}
	}
	if c.Kind == havenpb.Kind_KIND_SNAPSHOT_END {
		if err := a.runPostData(ctx, seq); err != nil {
			return err
		}
	}
	if err := a.settle(); err != nil { // a commit sent ahead
		return err
	}
	tx, err := a.conn.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	next := a.next
	next.streamSeq = seq
	switch c.Kind {
	case havenpb.Kind_KIND_SNAPSHOT_BEGIN:
		if err := a.prepareTables(ctx, tx, seq, c.Relations); err != nil {
			return err
		}
		// The snapshot holds every table whole: a backfill of the copy it
		// replaces is over (left open, DR would say it lacks rows).
		if _, err := tx.Exec(ctx, `DELETE FROM haven.backfills WHERE group_name = $1`, a.cfg.Group); err != nil {
			return fmt.Errorf("end the backfills of the copy the snapshot replaces: %w", err)
		}
		next = position{streamSeq: seq, systemID: c.SystemId, epoch: c.Epoch, snapshotLSN: pglogrepl.LSN(c.SnapshotLsn), streamCreated: a.streamCreated}
		a.log.Info().Stringer("snapshot_lsn", next.snapshotLSN).Uint64("system_id", c.SystemId).Int("tables", len(c.Relations)).
			Msg("initial snapshot begins; DR tables emptied")
	case havenpb.Kind_KIND_SNAPSHOT_ROWS:
		if err := a.copyRows(ctx, tx, seq, c); err != nil {
			return err
		}
	case havenpb.Kind_KIND_SNAPSHOT_END:
		next.snapshotDone = true
		// The snapshot holds every transaction whose commit record starts
		// before its consistent point; one starting exactly there is
		// streamed, so it must not count as applied.
		next.commitLSN = pglogrepl.LSN(c.SnapshotLsn) - 1
		a.log.Info().Stringer("snapshot_lsn", next.snapshotLSN).Msg("initial snapshot loaded; applying the stream")

	}
	if _, err := tx.Conn().PgConn().ExecParams(ctx, savePositionSQL, next.params(a.cfg.Group), nil, nil, nil).Close(); err != nil {
		return fmt.Errorf("save position: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit snapshot step: %w", err)
	}
	a.pos, a.next, a.found = next, next, true
	// A snapshot replaces what DR held: from its beginning DR holds no
	// source commit, and at its end every one before its consistent point.
	// A rejoin's last check-in carries it as DR's first report.
	a.showApplied()
	if c.Kind == havenpb.Kind_KIND_SNAPSHOT_BEGIN {
		clear(a.backfilling)
		a.metrics.backfilling.Set(0)
	}
	a.reportCompleteness()
	if c.Kind == havenpb.Kind_KIND_SNAPSHOT_END && a.snapshotLoaded != nil {
		a.snapshotLoaded()
	}
	if err := msg.Ack(); err != nil {
		a.log.Debug().Err(err).Msg("ack failed; the message will be redelivered and skipped")
	}
	return nil
}

// createMissingSchema runs the source's schema script (the snapshot's
// pg_dump) when the DR database has none of the group's tables. Split in
// two, its second part (indexes, constraints, triggers) waits in
// haven.post_data until the rows are loaded, as with pg_dump | psql:
// building an index once costs less than updating it row by row.
func (a *applier) createMissingSchema(ctx context.Context, seq uint64, c *havenpb.Chunk) error {
	if err := a.waitForSchemaScript(ctx); err != nil {
		return err
	}
	for _, rel := range c.Relations {
		if rel.Schema == "haven" { // haven's own tables are made by the standby
			continue
		}
		target, err := readTarget(ctx, a.conn, rel.Schema, rel.Name)
		if err != nil {
			return err
		}
		if target.exists {
			return nil
		}
	}
	if c.SchemaPreSql == "" || c.SchemaPostSql == "" {
		return a.createSchema(ctx, seq, c.SchemaSql, "")
	}
	// In the script's transaction: a crash after it leaves the tables made
	// and the rest of the schema recorded, or neither.
	record := fmt.Sprintf("\nINSERT INTO haven.post_data (group_name, script) VALUES (%s, %s)\n\tON CONFLICT (group_name) DO UPDATE SET script = excluded.script;\n",
		quoteLiteral(a.cfg.Group), quoteLiteral(c.SchemaPostSql))
	return a.createSchema(ctx, seq, c.SchemaPreSql, record)
}

// runPostData runs the second part of a schema createMissingSchema made,
// once the snapshot's rows are loaded; with it, in one transaction, its
// record goes, so that it runs once.
func (a *applier) runPostData(ctx context.Context, seq uint64) error {
	if err := a.settle(); err != nil {
		return err
	}
	if err := a.waitForSchemaScript(ctx); err != nil {
		return err
	}
	var script string
	err := a.conn.QueryRow(ctx, `SELECT script FROM haven.post_data WHERE group_name = $1`, a.cfg.Group).Scan(&script)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read haven.post_data: %w", err)
	}
	started := time.Now()
	if err := a.createSchema(ctx, seq, script, fmt.Sprintf("\nDELETE FROM haven.post_data WHERE group_name = %s;\n", quoteLiteral(a.cfg.Group))); err != nil {
		return err
	}
	a.log.Info().Dur("took", time.Since(started)).Msg("built the DR schema's indexes, constraints and triggers after loading the snapshot")
	return nil
}

// quoteLiteral quotes s as an SQL string literal (standard_conforming_strings
// is on in pg_dump's scripts).
func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// prepareTables creates or checks every DR table of a snapshot and empties
// them; tables still missing after createMissingSchema are created bare. A
// DR table with rows in a database haven never applied to is left alone:
// the target is probably not the database the operator meant.
func (a *applier) prepareTables(ctx context.Context, tx pgx.Tx, seq uint64, rels []*havenpb.Relation) error {
	targets := make([]targetTable, len(rels))
	for i, rel := range rels {
		t, err := readTarget(ctx, tx, rel.Schema, rel.Name)
		if err != nil {
			return err
		}
		targets[i] = t
	}
	names := make([]string, 0, len(rels))
	anyRows := false
	for i, rel := range rels {
		t := targets[i]
		qualified := pgx.Identifier{rel.Schema, rel.Name}.Sanitize()
		if !t.exists {
			if _, err := tx.Exec(ctx, createTableSQL(rel)); err != nil {
				return blocked(seq, "create table", "create %s on DR: %w (create its types or schema on DR first, e.g. from pg_dump --schema-only)", qualified, err)
			}
			a.log.Warn().Str("table", rel.Schema+"."+rel.Name).Msg("created a bare DR table (columns, NOT NULL, key) from the snapshot's description; add its indexes, defaults and constraints")
		} else {
			if err := checkTarget(rel, t); err != nil {
				return blocked(seq, "schema mismatch", "%w", err)
			}
			if t.hasRows && !a.found && !a.replace {
				return blocked(seq, "not empty", "DR table %s already has rows, but haven has never applied group %q to this database; "+
					"point --target-url at the DR database meant for it, or empty the table (TRUNCATE %s) if its rows may be replaced", qualified, a.cfg.Group, qualified)
			}
		}
		names = append(names, tableRef(qualified, t.partitioned))
		anyRows = anyRows || t.hasRows
	}
	if !anyRows {
		// A new DR copy: nothing to empty (and tables outside the group
		// may reference these, which TRUNCATE would refuse).
		return nil
	}
	if _, err := tx.Exec(ctx, "TRUNCATE "+strings.Join(names, ", ")); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) {
			return blocked(seq, "apply failed", "empty DR tables for the snapshot: %w (a DR table outside the group with a foreign key to one of them?)", err)
		}
		return fmt.Errorf("empty DR tables for the snapshot: %w", err)
	}
	return nil
}

// schemaScriptLock is held by the transaction of a schema script. A
// standby killed while its script runs leaves it running on DR until it
// commits: the next standby waits for it (waitForSchemaScript) rather than
// run the script again over it (and fail on what it creates).
func (a *applier) schemaScriptLock() string {
	return fmt.Sprintf("SELECT pg_advisory_xact_lock(hashtext(%s));\n", quoteLiteral("haven schema script "+a.cfg.Group))
}

// waitForSchemaScript waits until no schema script of the group runs on DR.
func (a *applier) waitForSchemaScript(ctx context.Context) error {
	key := "haven schema script " + a.cfg.Group
	if _, err := a.conn.Exec(ctx, `SELECT pg_advisory_lock(hashtext($1)), pg_advisory_unlock(hashtext($1))`, key); err != nil {
		return fmt.Errorf("wait for a schema script running on DR: %w", err)
	}
	return nil
}

// createSchema runs the source's schema script on a connection of its own
// (the script changes session settings), in one transaction with then.
func (a *applier) createSchema(ctx context.Context, seq uint64, script, then string) error {
	config, err := writerConfig(a.cfg.TargetURL)
	if err != nil {
		return err
	}
	// Owners and grants of the primary's that DR could not take
	// (agent/schema.go): DDL that such an owner runs on the primary stops
	// apply until DR's copy has it, and after a failover the role lacks
	// its rights.
	var notTaken []string
	config.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
		if said, ok := strings.CutPrefix(n.Message, "haven: "); ok {
			notTaken = append(notTaken, said)
		}
	}
	conn, err := pgx.ConnectConfig(ctx, config)
	if err != nil {
		return fmt.Errorf("connect to create the DR schema: %w", err)
	}
	defer conn.Close(context.Background())
	// The simple protocol runs a multi-statement script as one transaction.
	if err := conn.PgConn().Exec(ctx, a.schemaScriptLock()+script+then).Close(); err != nil {
		return blocked(seq, "create schema", "create the primary's schema on DR: %w; create what is missing on DR "+
			"(an extension that is not installed there?), or restore the schema yourself with pg_dump --schema-only", err)
	}
	if len(notTaken) > 0 {
		a.log.Warn().Uint64("seq", seq).Int("statements", len(notTaken)).Strs("first", notTaken[:min(len(notTaken), 20)]).
			Msg("the DR schema lacks owners or grants of the primary's: create the roles on DR (pg_dumpall --roles-only) and run the statements there, or run the standby as a superuser")
	}
	a.log.Info().Int("bytes", len(script)).Msg("created the DR schema from the primary's (pg_dump --schema-only under the snapshot)")
	return nil
}

func (a *applier) copyRows(ctx context.Context, tx pgx.Tx, seq uint64, c *havenpb.Chunk) error {
	if len(c.Changes) == 0 {
		return nil
	}
	if len(c.Relations) != 1 {
		return blocked(seq, "malformed", "snapshot rows chunk describes %d tables, expected 1", len(c.Relations))
	}
	rel := c.Relations[0]
	rows := make([]*havenpb.Row, len(c.Changes))
	for i, ch := range c.Changes {
		if ch.Op != havenpb.Op_OP_INSERT || ch.RelationId != rel.Id {
			return blocked(seq, "malformed", "snapshot rows chunk holds a %s of relation %d", ch.Op, ch.RelationId)
		}
		rows[i] = ch.New
	}
	if err := a.copyIn(ctx, tx.Conn().PgConn(), seq, rel, copyText(nil, rows), false, uint64(len(rows))); err != nil {
		return err
	}
	a.metrics.snapshotRows.Add(float64(len(rows)))
	return nil
}

// copyIn loads rows in COPY's text format, or its binary format without
// header and trailer, into a DR table: those of one chunk (message seq).
// Binary rows are only of built-in types (wire.Validate checks), and the
// DR table's columns have the source's types (checkTarget), so they read
// back as the source wrote them.
func (a *applier) copyIn(ctx context.Context, conn *pgconn.PgConn, seq uint64, rel *havenpb.Relation, data []byte, binary bool, rows uint64) error {
	return a.copyFrom(ctx, conn, seq, func() string { return fmt.Sprintf("message %d", seq) }, rel, bytes.NewReader(data), binary, func() uint64 { return rows })
}

// copyFrom loads the rows in reads, of one or more chunks, in one COPY
// into a DR table, and checks that DR took as many as rows says once in is
// read; seq is the message of the first chunk, chunks names the messages
// read, for errors.
func (a *applier) copyFrom(ctx context.Context, conn *pgconn.PgConn, seq uint64, chunks func() string, rel *havenpb.Relation, in io.Reader, binary bool, rows func() uint64) error {
	cols := make([]string, len(rel.Columns))
	for i, col := range rel.Columns {
		cols[i] = pgx.Identifier{col.Name}.Sanitize()
	}
	sql := fmt.Sprintf("COPY %s (%s) FROM STDIN", pgx.Identifier{rel.Schema, rel.Name}.Sanitize(), strings.Join(cols, ", "))
	if binary {
		sql += " (FORMAT binary)"
		in = io.MultiReader(bytes.NewReader(wire.CopyBinaryHeader), in, bytes.NewReader(wire.CopyBinaryTrailer))
	}
	tag, err := conn.CopyFrom(ctx, in, sql)
	if err == nil && tag.RowsAffected() != int64(rows()) {
		return blocked(seq, "apply failed", "DR loaded %d rows into %s.%s from %s, which hold %d: a DR trigger or rule that drops rows?", tag.RowsAffected(), rel.Schema, rel.Name, chunks(), rows())
	}
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) {
			return blocked(seq, "apply failed", "load snapshot rows of %s into %s.%s: %w (an ENABLE ALWAYS or REPLICA trigger on DR writing elsewhere?)", chunks(), rel.Schema, rel.Name, err)
		}
		return fmt.Errorf("load snapshot rows of %s into %s.%s: %w", chunks(), rel.Schema, rel.Name, err)
	}
	return nil
}
