package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// heartbeatPrefix is the logical-message prefix of a group's heartbeats;
// other prefixes (other groups, other tools) are ignored.
func heartbeatPrefix(group string) string { return "haven.heartbeat." + group }

// pending is one published chunk waiting for JetStream's acknowledgement.
type pending struct {
	future     jetstream.PubAckFuture // nil: nothing was published (an empty transaction, or one already in the stream)
	endLSN     pglogrepl.LSN          // set when the chunk ends a transaction: what is then confirmed
	commitLSN  pglogrepl.LSN          // the transaction's, where a chunk of it was published
	commitTime time.Time
	changes    int
	onAck      []func() // run once JetStream has the whole transaction
}

// txnState is the source transaction being decoded.
type txnState struct {
	xid        uint32
	commitLSN  pglogrepl.LSN
	commitTime time.Time
	builder    *chunkBuilder
	heartbeat  *havenpb.Heartbeat
	chunks     uint32 // published in this session
	changes    uint32 // seen so far: the ordinal of the next change
	// What of it the stream already holds (from before a restart): changes
	// with a lower ordinal are not published again; stored means all of it.
	storedThrough uint32
	stored        bool
	// Keys it changed in tables being backfilled, and what to do once it
	// is in the stream.
	touched     *touched
	onPublished []func()
}

// streamTail is the last message the stream holds when a session starts:
// the agent continues exactly after it, and chains every publish to the
// previous one, so that JetStream refuses anything published after a
// message it lost or rejected and the stream never holds a transaction
// ahead of an earlier one.
type streamTail struct {
	msgID     string        // Nats-Msg-Id of the last message ("" for none)
	commitLSN pglogrepl.LSN // the transaction it belongs to (0: not one of this slot's transactions)
	through   uint32        // changes of that transaction the stream holds
	last      bool          // the stream holds all of that transaction
	other     bool          // it is a transaction of another source or slot
}

// streamer owns the replication connection for one session; it runs on one
// goroutine, so positions need no locks.
type streamer struct {
	*session
	relations    map[uint32]*havenpb.Relation
	typeNames    map[typeKey]string
	types        map[uint32]*pglogrepl.TypeMessage // user types as pgoutput named them
	txn          *txnState
	inflight     []pending
	receivedLSN  pglogrepl.LSN
	confirmedLSN pglogrepl.LSN
	reportedLSN  pglogrepl.LSN // last confirmed position sent to the walsender
	confirmed    *atomic.Uint64
	nextStatus   time.Time
	tail         streamTail
	// prevCommit is the commit LSN of the last transaction in the stream,
	// which the next one names (0: not known).
	prevCommit pglogrepl.LSN
	// Tables being backfilled, and the transactions that changed them that
	// a backfill snapshot has not yet been seen to include.
	backfilling map[uint32]backfillKey
	touched     []*touched
	moved       map[uint32]movedKeys // keys rows moved to, not yet saved
}

type typeKey struct {
	oid uint32
	mod int32
}

func (s *session) streamChanges(ctx context.Context, start pglogrepl.LSN) error {
	slot := wire.SlotName(s.cfg.Group)
	err := pglogrepl.StartReplication(ctx, s.repl, slot, start, pglogrepl.StartReplicationOptions{
		Mode: pglogrepl.LogicalReplication,
		PluginArgs: []string{
			"proto_version '1'",
			"publication_names " + quoteLiteral(wire.PublicationName(s.cfg.Group)),
			"messages 'true'",
		},
	})
	if err != nil {
		return fmt.Errorf("start replication on slot %q: %w", slot, err)
	}
	tail, err := s.readTail(ctx)
	if err != nil {
		return err
	}
	prev := tail.commitLSN
	if acked := pglogrepl.LSN(s.acked.Load()); !tail.other && acked > tail.commitLSN {
		// The next transaction names the acknowledged one as its
		// predecessor: a standby that did not apply it stops there.
		s.log.Error().Stringer("stream_ends_at", tail.commitLSN).Stringer("acknowledged", acked).
			Msg("the stream lost messages JetStream had acknowledged (a server without sync to disk that crashed?): their transactions are gone from it, " +
				"and the slot is past them. A standby that had not applied them stops at the next transaction; re-seed it. Run JetStream with three replicas")
		prev = acked
	}
	backfills, err := s.backfills(ctx)
	if err != nil {
		return err
	}
	st := &streamer{session: s, confirmed: s.confirmed, relations: map[uint32]*havenpb.Relation{}, typeNames: map[typeKey]string{}, types: map[uint32]*pglogrepl.TypeMessage{},
		receivedLSN: start, confirmedLSN: start, tail: tail, prevCommit: prev, backfilling: map[uint32]backfillKey{}, moved: map[uint32]movedKeys{}}
	for _, b := range backfills {
		key := b.Key
		if key.Def == "" {
			if key, err = readKey(ctx, s.ctrl, b.OID); err != nil {
				return err
			}
		}
		st.backfilling[b.OID] = key
	}
	s.metrics.connected.Set(1)
	s.streaming()
	s.metrics.confirmedLSN.Set(float64(start))
	s.log.Info().Stringer("start_lsn", start).Msg("streaming changes")
	return st.loop(ctx)
}

// decode decodes a message of the group's stream, reading its payload
// from the object store when it is stored there.
func (s *session) decode(ctx context.Context, msg *jetstream.RawStreamMsg) (*havenpb.Chunk, error) {
	encoding, payload, err := wire.Payload(ctx, s.publisher.js, s.cfg.Group, msg.Header, msg.Data)
	if err != nil {
		return nil, err
	}
	return wire.Decode(encoding, msg.Header.Get(wire.HeaderFormat), payload)
}

// readTail reads the stream's last message.
func (s *session) readTail(ctx context.Context) (streamTail, error) {
	info, err := s.stream.Info(ctx)
	if err != nil {
		return streamTail{}, fmt.Errorf("read stream state: %w", err)
	}
	if info.State.Msgs == 0 {
		return streamTail{}, nil
	}
	// The last sequence may name a message deleted on its own: the tail is
	// the last one still there.
	var msg *jetstream.RawStreamMsg
	for seq := info.State.LastSeq; seq >= info.State.FirstSeq && seq > 0; seq-- {
		msg, err = s.stream.GetMsg(ctx, seq)
		if err == nil {
			break
		}
		if !errors.Is(err, jetstream.ErrMsgNotFound) {
			return streamTail{}, fmt.Errorf("read the stream's last message (seq %d): %w", seq, err)
		}
	}
	if msg == nil {
		return streamTail{}, nil
	}
	tail := streamTail{msgID: msg.Header.Get(jetstream.MsgIDHeader)}
	c, err := s.decode(ctx, msg)
	if err != nil && !errors.Is(err, wire.ErrCorrupt) && !errors.Is(err, wire.ErrUnsupported) && !errors.Is(err, wire.ErrTooLarge) {
		// Its object could not be read just now: taken for not ours, the
		// tail would have everything since the slot's position sent again.
		return streamTail{}, fmt.Errorf("read the stream's last message (seq %d): %w", msg.Sequence, err)
	}
	if err == nil && c.Kind == havenpb.Kind_KIND_TRANSACTION && c.SystemId == s.info.systemID && c.Slot == wire.SlotName(s.cfg.Group) {
		tail.commitLSN = pglogrepl.LSN(c.CommitLsn)
		tail.through = c.FirstChange + uint32(len(c.Changes))
		tail.last = c.LastChunk
	} else {
		tail.other = err == nil && c.Kind == havenpb.Kind_KIND_TRANSACTION
	}
	return tail, nil
}

func (st *streamer) loop(ctx context.Context) error {
	for {
		if err := st.collectAcks(ctx, false); err != nil {
			return err
		}
		// In synchronous mode the primary's commits wait for the confirmed
		// position: report it as soon as it moves.
		if !time.Now().Before(st.nextStatus) || (st.cfg.Synchronous && st.confirmedLSN > st.reportedLSN) {
			if err := st.sendStatus(ctx, false); err != nil {
				return err
			}
		}
		// Acknowledgements are collected between messages from the
		// walsender: while some are due, look again soon, so that the
		// confirmed position follows them. Synchronous commits wait for it,
		// and so does a switchover's drain, when no more WAL comes.
		deadline := st.nextStatus
		if soon := time.Now().Add(2 * time.Millisecond); len(st.inflight) > 0 && soon.Before(deadline) {
			deadline = soon
		}
		recvCtx, cancel := context.WithDeadline(ctx, deadline)
		msg, err := st.repl.ReceiveMessage(recvCtx)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				st.shutdown()
				return nil
			}
			if pgconn.Timeout(err) {
				continue
			}
			return fmt.Errorf("receive from walsender: %w", err)
		}
		switch msg := msg.(type) {
		case *pgproto3.CopyData:
			if err := st.handleCopyData(ctx, msg.Data); err != nil {
				return err
			}
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("walsender: %w", pgconn.ErrorResponseToPgError(msg))
		default:
			return fmt.Errorf("unexpected message from walsender: %T", msg)
		}
	}
}

// awaited reports whether someone waits for an in-flight transaction's
// acknowledgement (a backfill chunk): it is then collected at once rather
// than at the next message or status update.
// shutdown confirms what is acknowledged before the session ends, so a
// graceful stop does not make the next start re-read more than needed.
func (st *streamer) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = st.collectAcks(ctx, true)
	_ = st.sendStatus(ctx, false)
	st.log.Info().Stringer("confirmed_lsn", st.confirmedLSN).Msg("capture stopped")
}

func (st *streamer) handleCopyData(ctx context.Context, data []byte) error {
	if len(data) == 0 {
		return nil
	}
	switch data[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
		if err != nil {
			return fmt.Errorf("parse keepalive: %w", err)
		}
		if st.txn == nil && len(st.inflight) == 0 && ka.ServerWALEnd > st.confirmedLSN {
			// Nothing open and everything acknowledged: every transaction
			// committed before the walsender's position is in the stream.
			st.receivedLSN = max(st.receivedLSN, ka.ServerWALEnd)
			if err := st.setConfirmed(ctx, ka.ServerWALEnd); err != nil {
				return err
			}
		}
		if ka.ReplyRequested {
			return st.sendStatus(ctx, false)
		}
		return nil
	case pglogrepl.XLogDataByteID:
		xld, err := pglogrepl.ParseXLogData(data[1:])
		if err != nil {
			return fmt.Errorf("parse XLogData: %w", err)
		}
		if xld.WALStart > st.receivedLSN {
			st.receivedLSN = xld.WALStart
			st.metrics.receivedLSN.Set(float64(xld.WALStart))
		}
		return st.handleLogical(ctx, xld.WALData)
	default:
		return nil
	}
}

func (st *streamer) handleLogical(ctx context.Context, data []byte) error {
	msg, err := pglogrepl.Parse(data)
	if err != nil {
		return fmt.Errorf("decode pgoutput message: %w", err)
	}
	switch m := msg.(type) {
	case *pglogrepl.RelationMessage:
		return st.onRelation(ctx, m)
	case *pglogrepl.BeginMessage:
		if st.txn != nil {
			return fmt.Errorf("BEGIN of xid %d inside xid %d", m.Xid, st.txn.xid)
		}
		st.txn = &txnState{xid: m.Xid, commitLSN: m.FinalLSN, commitTime: m.CommitTime}
		switch {
		case st.tail.commitLSN == 0:
		case m.FinalLSN < st.tail.commitLSN:
			// Published before a restart, and the stream holds everything
			// up to its last message.
			st.txn.stored = true
		case m.FinalLSN == st.tail.commitLSN:
			st.txn.stored = st.tail.last
			st.txn.storedThrough = st.tail.through
		}
		st.txn.builder = newChunkBuilder(st.cfg.ChunkBytes, st.txnHeader(0))
		return nil
	case *pglogrepl.CommitMessage:
		if st.txn == nil {
			return fmt.Errorf("COMMIT at %s outside a transaction", m.CommitLSN)
		}
		return st.finishTxn(ctx, m.TransactionEndLSN)
	case *pglogrepl.InsertMessage:
		return st.onRow(ctx, havenpb.Op_OP_INSERT, m.RelationID, nil, m.Tuple)
	case *pglogrepl.UpdateMessage:
		return st.onRow(ctx, havenpb.Op_OP_UPDATE, m.RelationID, m.OldTuple, m.NewTuple)
	case *pglogrepl.DeleteMessage:
		return st.onRow(ctx, havenpb.Op_OP_DELETE, m.RelationID, m.OldTuple, nil)
	case *pglogrepl.TruncateMessage:
		return st.onTruncate(ctx, m)
	case *pglogrepl.LogicalDecodingMessage:
		return st.onMessage(ctx, m)
	case *pglogrepl.TypeMessage:
		st.types[m.DataType] = m
		return nil
	case *pglogrepl.OriginMessage:
		return nil
	default:
		return fmt.Errorf("unexpected pgoutput message %T", msg)
	}
}

func (st *streamer) txnHeader(index uint32) *havenpb.Chunk {
	t := st.txn
	return &havenpb.Chunk{FormatVersion: wire.FormatVersion, Kind: havenpb.Kind_KIND_TRANSACTION, SystemId: st.info.systemID,
		Group: st.cfg.Group, Slot: wire.SlotName(st.cfg.Group), Epoch: st.cfg.Epoch, Xid: t.xid, CommitLsn: uint64(t.commitLSN),
		CommitTimeUs: t.commitTime.UnixMicro(), ChunkIndex: index, FirstChange: t.changes}
}

func (st *streamer) onRelation(ctx context.Context, m *pglogrepl.RelationMessage) error {
	if st.txn != nil && !st.txn.builder.empty() && st.txn.builder.described[m.RelationID] {
		// The table changed shape inside the transaction: later changes must
		// travel with the new description, in a chunk of their own.
		if err := st.flushChunk(ctx, false); err != nil {
			return err
		}
	}
	rel := &havenpb.Relation{Id: m.RelationID, Schema: m.Namespace, Name: m.RelationName, ReplicaIdentity: string(rune(m.ReplicaIdentity))}
	for _, c := range m.Columns {
		typeName, err := st.typeName(ctx, c.DataType, c.TypeModifier)
		if err != nil {
			return err
		}
		rel.Columns = append(rel.Columns, &havenpb.Column{Name: c.Name, Type: typeName, TypeOid: c.DataType,
			TypeModifier: c.TypeModifier, Key: c.Flags&1 != 0})
	}
	// A new descriptor object: chunks already built keep the one they used.
	st.relations[m.RelationID] = rel
	return nil
}

// typeVisibleWait bounds the wait for a type the decoded transaction made.
const typeVisibleWait = 5 * time.Second

// typeName resolves a column type as format_type prints it, cached.
//
// A type the decoded transaction made may not be visible yet: a commit
// record is decoded as soon as it is flushed, and a synchronous standby
// keeps the transaction invisible until it answers. So a type not in the
// catalog is waited for, a while. If the agent itself is that standby, it
// never comes: the type is named from pgoutput's TYPE message instead, as
// format_type would name it (a name with a leading underscore taken for
// an array type's, as PostgreSQL names them).
func (st *streamer) typeName(ctx context.Context, oid uint32, mod int32) (string, error) {
	key := typeKey{oid, mod}
	if name, ok := st.typeNames[key]; ok {
		return name, nil
	}
	deadline := time.Now().Add(typeVisibleWait)
	for waited := false; ; waited = true {
		var name string
		var known bool
		if err := st.ctrl.QueryRow(ctx, `SELECT format_type($1, $2), EXISTS (SELECT FROM pg_type WHERE oid = $1)`, oid, mod).Scan(&name, &known); err != nil {
			return "", fmt.Errorf("resolve type %d: %w", oid, err)
		}
		if known {
			st.typeNames[key] = name
			return name, nil
		}
		if time.Now().After(deadline) {
			break
		}
		if !waited {
			st.log.Info().Uint32("type_oid", oid).
				Msg("a type the decoded transaction made is not visible yet: waiting for its commit to finish (a synchronous standby's answer)")
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	m, ok := st.types[oid]
	if !ok {
		return "", fmt.Errorf("type %d of a column is not in the catalog %s after its transaction was decoded, and pgoutput did not name it", oid, typeVisibleWait)
	}
	base, array := strings.CutPrefix(m.Name, "_")
	var name string
	if err := st.ctrl.QueryRow(ctx, `SELECT quote_ident($1) || '.' || quote_ident($2) || CASE WHEN $3 THEN '[]' ELSE '' END`, m.Namespace, base, array).
		Scan(&name); err != nil {
		return "", fmt.Errorf("name type %d: %w", oid, err)
	}
	st.log.Warn().Uint32("type_oid", oid).Str("type", name).Dur("waited", typeVisibleWait).
		Msg("a type of a decoded transaction is still not in the catalog (is the agent the synchronous standby that transaction waits for, or was the type dropped since?): " +
			"named it from the stream; if DR reports a schema mismatch for its column, create such types in a transaction of their own")
	return name, nil
}

func (st *streamer) onRow(ctx context.Context, op havenpb.Op, relID uint32, oldTuple, newTuple *pglogrepl.TupleData) error {
	if st.txn == nil {
		return fmt.Errorf("row change outside a transaction")
	}
	rel, ok := st.relations[relID]
	if !ok {
		return fmt.Errorf("change for relation %d before its description", relID)
	}
	if op == havenpb.Op_OP_INSERT && rel.Schema == "haven" && rel.Name == ddlLogTable && !st.ddlConcernsGroup(rel, newTuple) {
		return nil
	}
	ch := &havenpb.Change{Op: op, RelationId: relID}
	var err error
	if oldTuple != nil {
		if ch.Old, err = toRow(oldTuple, len(rel.Columns)); err != nil {
			return fmt.Errorf("old row of %s.%s: %w", rel.Schema, rel.Name, err)
		}
	}
	if newTuple != nil {
		if ch.New, err = toRow(newTuple, len(rel.Columns)); err != nil {
			return fmt.Errorf("new row of %s.%s: %w", rel.Schema, rel.Name, err)
		}
	}
	st.noteTouched(rel, ch)
	_, err = st.addChange(ctx, []*havenpb.Relation{rel}, ch)
	return err
}

// ddlConcernsGroup tells whether a haven.ddl_log row is for this group: a
// group of some tables (--tables) leaves out DDL that worked only on tables
// outside it, which the DR site may not have. DDL on no table (a type, a
// schema, a function) is kept.
func (st *streamer) ddlConcernsGroup(rel *havenpb.Relation, row *pglogrepl.TupleData) bool {
	if len(st.cfg.Tables) == 0 {
		return true
	}
	for i, c := range rel.Columns {
		if c.Name != "relations" || i >= len(row.Columns) || row.Columns[i].DataType != pglogrepl.TupleDataTypeText {
			continue
		}
		list := strings.Trim(string(row.Columns[i].Data), "{}")
		if list == "" {
			return true
		}
		for _, field := range strings.Split(list, ",") {
			oid, err := strconv.ParseUint(field, 10, 32)
			if err != nil {
				return true
			}
			if _, ok := st.published[uint32(oid)]; ok {
				return true
			}
		}
		return false
	}
	return true
}

func (st *streamer) onTruncate(ctx context.Context, m *pglogrepl.TruncateMessage) error {
	if st.txn == nil {
		return fmt.Errorf("truncate outside a transaction")
	}
	rels := make([]*havenpb.Relation, len(m.RelationIDs))
	for i, id := range m.RelationIDs {
		rel, ok := st.relations[id]
		if !ok {
			return fmt.Errorf("truncate of relation %d before its description", id)
		}
		rels[i] = rel
		if _, ok := st.backfilling[id]; ok {
			if st.txn.touched == nil {
				st.txn.touched = &touched{xid: st.txn.xid}
			}
			st.txn.touched.add(id, "", false)
		}
	}
	ch := &havenpb.Change{Op: havenpb.Op_OP_TRUNCATE, TruncateRelationIds: m.RelationIDs,
		TruncateCascade: m.Option&1 != 0, TruncateRestartIdentity: m.Option&2 != 0}
	_, err := st.addChange(ctx, rels, ch)
	return err
}

func (st *streamer) onMessage(ctx context.Context, m *pglogrepl.LogicalDecodingMessage) error {
	if st.txn == nil {
		return nil
	}
	if m.Prefix == backfillPrefix(st.cfg.Group) {
		return st.onBackfillMessage(ctx, m.Content)
	}
	if m.Prefix != heartbeatPrefix(st.cfg.Group) {
		return nil
	}
	var content heartbeatContent
	if err := json.Unmarshal(m.Content, &content); err != nil {
		st.log.Warn().Err(err).Msg("ignoring a malformed heartbeat message")
		return nil
	}
	hb := &havenpb.Heartbeat{EmittedAtUs: content.EmittedAtUs, WalLsn: uint64(m.LSN)}
	for _, v := range content.Sequences {
		hb.Sequences = append(hb.Sequences, &havenpb.SequenceValue{Schema: v.Schema, Name: v.Name, LastValue: v.LastValue})
	}
	st.txn.heartbeat = hb
	return nil
}

// toRow copies a pgoutput tuple; its bytes belong to the connection's
// receive buffer and are overwritten by the next message.
func toRow(t *pglogrepl.TupleData, columns int) (*havenpb.Row, error) {
	if len(t.Columns) != columns {
		return nil, fmt.Errorf("tuple has %d columns, relation has %d", len(t.Columns), columns)
	}
	row := &havenpb.Row{Values: make([]*havenpb.Datum, len(t.Columns))}
	for i, c := range t.Columns {
		d := &havenpb.Datum{}
		switch c.DataType {
		case pglogrepl.TupleDataTypeNull:
			d.Kind = havenpb.DatumKind_DATUM_NULL
		case pglogrepl.TupleDataTypeToast:
			d.Kind = havenpb.DatumKind_DATUM_UNCHANGED_TOAST
		case pglogrepl.TupleDataTypeText:
			d.Kind = havenpb.DatumKind_DATUM_TEXT
			d.Text = append(make([]byte, 0, len(c.Data)), c.Data...)
		default:
			return nil, fmt.Errorf("column %d in format %q; haven asks for text", i, c.DataType)
		}
		row.Values[i] = d
	}
	return row, nil
}

// addChange adds the transaction's next change to its current chunk,
// unless the stream already holds it; it reports which.
func (st *streamer) addChange(ctx context.Context, rels []*havenpb.Relation, ch *havenpb.Change) (bool, error) {
	t := st.txn
	ordinal := t.changes
	t.changes++
	if t.stored || ordinal < t.storedThrough {
		return false, nil
	}
	if t.builder.full() {
		if err := st.flushChunk(ctx, false); err != nil {
			return false, err
		}
	}
	b := t.builder
	if b.empty() {
		b.chunk.FirstChange = ordinal
	}
	for _, rel := range rels {
		b.describe(rel)
	}
	b.add(nil, ch)
	return true, nil
}

// finishTxn publishes the transaction's last chunk. A transaction with no
// change and no heartbeat, or one the stream already holds, publishes
// nothing but still moves the confirmed position once everything before it
// is acknowledged.
func (st *streamer) finishTxn(ctx context.Context, endLSN pglogrepl.LSN) error {
	t := st.txn
	if t.touched != nil {
		st.touched = append(st.touched, t.touched)
		for oid, keys := range t.touched.moved {
			if st.moved[oid] == nil {
				st.moved[oid] = movedKeys{}
			}
			def := t.touched.def[oid]
			st.moved[oid][def] = append(st.moved[oid][def], keys...)
		}
	}
	if !t.stored && t.storedThrough > t.changes {
		// A backfill chunk whose rows went with the session that read them:
		// the stream holds part of it, and gets the end of it.
		t.changes = t.storedThrough
	}
	if t.stored || (t.changes == 0 && t.heartbeat == nil) {
		st.txn = nil
		st.inflight = append(st.inflight, pending{endLSN: endLSN, commitTime: t.commitTime, onAck: t.onPublished})
		return nil
	}
	if t.builder.empty() {
		t.builder.chunk.FirstChange = t.changes
	}
	t.builder.chunk.EndLsn = uint64(endLSN)
	err := st.flushChunk(ctx, true)
	st.txn = nil
	if err != nil {
		return err
	}
	st.inflight[len(st.inflight)-1].endLSN = endLSN
	st.inflight[len(st.inflight)-1].onAck = t.onPublished
	return nil
}

// flushChunk publishes the transaction's current chunk, chained to the
// stream's previous message, and starts the next chunk.
func (st *streamer) flushChunk(ctx context.Context, last bool) error {
	t := st.txn
	c := t.builder.chunk
	c.LastChunk = last
	if last {
		c.Heartbeat = t.heartbeat
	}
	if err := st.waitForRoom(ctx); err != nil {
		return err
	}
	msgID := wire.TransactionMsgID(st.info.systemID, wire.SlotName(st.cfg.Group), uint64(t.commitLSN), c.FirstChange)
	if c.FirstChange == 0 && st.prevCommit != t.commitLSN {
		c.PrevCommitLsn = uint64(st.prevCommit)
	}
	future, _, err := st.publisher.publish(ctx, wire.TransactionSubject(st.cfg.Group), msgID, st.tail.msgID, c)
	if err != nil {
		return err
	}
	st.tail.msgID = msgID
	st.prevCommit = t.commitLSN
	st.inflight = append(st.inflight, pending{future: future, commitLSN: t.commitLSN, commitTime: t.commitTime, changes: len(c.Changes)})
	t.chunks++
	t.builder.reset(st.txnHeader(t.chunks))
	return nil
}

// waitForRoom blocks while MaxInFlight chunks await acknowledgement, still
// answering the walsender so that it does not time the connection out.
func (st *streamer) waitForRoom(ctx context.Context) error {
	for len(st.inflight) >= st.cfg.MaxInFlight {
		waitCtx, cancel := context.WithDeadline(ctx, st.nextStatus)
		err := st.collectAcks(waitCtx, true)
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		if !time.Now().Before(st.nextStatus) {
			if err := st.sendStatus(ctx, false); err != nil {
				return err
			}
		}
	}
	return nil
}

// collectAcks retires acknowledged chunks from the head of the in-flight
// queue, in order, and advances the confirmed position at each completed
// transaction. With block set it waits for the head until ctx ends.
func (st *streamer) collectAcks(ctx context.Context, block bool) error {
	for len(st.inflight) > 0 {
		head := st.inflight[0]
		if head.future != nil {
			if block {
				select {
				case <-head.future.Ok():
				case err := <-head.future.Err():
					return notAcknowledged(head.future.Msg().Header.Get(jetstream.MsgIDHeader), err)
				case <-ctx.Done():
					return ctx.Err()
				}
			} else {
				select {
				case <-head.future.Ok():
				case err := <-head.future.Err():
					return notAcknowledged(head.future.Msg().Header.Get(jetstream.MsgIDHeader), err)
				default:
					return nil
				}
			}
			st.metrics.chunks.Inc()
			st.acked.Store(uint64(head.commitLSN))
		}
		st.inflight = st.inflight[1:]
		st.metrics.changes.Add(float64(head.changes))
		for _, f := range head.onAck {
			f()
		}
		if head.endLSN != 0 {
			// Past the commit record: a restart does not decode it again.
			if err := st.setConfirmed(ctx, head.endLSN); err != nil {
				return err
			}
			if head.future != nil {
				st.metrics.transactions.Inc()
				st.metrics.lagSeconds.Set(time.Since(head.commitTime).Seconds())
			}
		}
	}
	return nil
}

func (st *streamer) setConfirmed(ctx context.Context, lsn pglogrepl.LSN) error {
	if lsn <= st.confirmedLSN {
		return nil
	}
	// Keys rows moved to in backfilled tables are saved before the
	// transactions that moved them can be confirmed.
	if err := st.saveMoved(ctx); err != nil {
		return err
	}
	if lsn > st.confirmedLSN {
		st.confirmedLSN = lsn
		st.metrics.confirmedLSN.Set(float64(lsn))
		if st.confirmed != nil {
			st.confirmed.Store(uint64(lsn))
		}
	}
	return nil
}

// sendStatus reports the confirmed position as written, flushed and applied:
// PostgreSQL may forget WAL only up to what JetStream holds.
func (st *streamer) sendStatus(ctx context.Context, reply bool) error {
	err := pglogrepl.SendStandbyStatusUpdate(ctx, st.repl, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: st.confirmedLSN, WALFlushPosition: st.confirmedLSN, WALApplyPosition: st.confirmedLSN,
		ClientTime: time.Now(), ReplyRequested: reply,
	})
	if err != nil {
		return fmt.Errorf("send standby status: %w", err)
	}
	st.reportedLSN = st.confirmedLSN
	st.nextStatus = time.Now().Add(st.cfg.StatusInterval)
	return nil
}
