package replicator

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// MessageView is a stream message as an operator reads it: decoded when it
// can be, with the reason when it cannot.
type MessageView struct {
	Seq         uint64              `json:"seq"`
	Subject     string              `json:"subject"`
	Published   time.Time           `json:"published"`
	Headers     map[string][]string `json:"headers,omitempty"`
	Size        int                 `json:"size"`
	DecodeError string              `json:"decode_error,omitempty"`
	RawPrefix   string              `json:"raw_prefix_hex,omitempty"`
	Chunk       *ChunkView          `json:"chunk,omitempty"`
}

// ChunkView is a decoded chunk with values shown as text.
type ChunkView struct {
	FormatVersion uint32              `json:"format_version"`
	Kind          string              `json:"kind"`
	SystemID      string              `json:"system_id"`
	Group         string              `json:"group"`
	Slot          string              `json:"slot"`
	Epoch         uint64              `json:"epoch"`
	Xid           uint32              `json:"xid,omitempty"`
	CommitLSN     string              `json:"commit_lsn"`
	CommitTime    *time.Time          `json:"commit_time,omitempty"`
	ChunkIndex    uint32              `json:"chunk_index"`
	LastChunk     bool                `json:"last_chunk"`
	SnapshotLSN   string              `json:"snapshot_lsn,omitempty"`
	Relations     []*havenpb.Relation `json:"relations,omitempty"`
	Changes       []ChangeView        `json:"changes,omitempty"`
	Heartbeat     *havenpb.Heartbeat  `json:"heartbeat,omitempty"`
	SchemaSQLSize int                 `json:"schema_sql_bytes,omitempty"`
}

// ChangeView is one change: column values by name; null is SQL NULL, and
// an unchanged TOASTed value shows as "<unchanged toast>".
type ChangeView struct {
	Op       string         `json:"op"`
	Table    string         `json:"table,omitempty"`
	Old      map[string]any `json:"old,omitempty"`
	New      map[string]any `json:"new,omitempty"`
	Truncate []string       `json:"truncate,omitempty"`
}

// Inspect reads stream message seq of a group and renders it for an
// operator; it changes nothing.
func Inspect(ctx context.Context, natsURL, group string, seq uint64) (*MessageView, error) {
	js, stream, closeConn, err := openStream(ctx, natsURL, group)
	if err != nil {
		return nil, err
	}
	defer closeConn()
	msg, err := stream.GetMsg(ctx, seq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, fmt.Errorf("stream %s has no message %d (never written, or removed by retention or a purge)", wire.StreamName(group), seq)
	}
	if err != nil {
		return nil, fmt.Errorf("read message %d: %w", seq, err)
	}
	return viewMessage(ctx, js, group, msg), nil
}

func viewMessage(ctx context.Context, js jetstream.JetStream, group string, msg *jetstream.RawStreamMsg) *MessageView {
	v := &MessageView{Seq: msg.Sequence, Subject: msg.Subject, Published: msg.Time, Headers: msg.Header, Size: len(msg.Data)}
	encoding, payload, err := wire.Payload(ctx, js, group, msg.Header, msg.Data)
	var c *havenpb.Chunk
	if err == nil {
		v.Size = len(payload)
		c, err = wire.Decode(encoding, msg.Header.Get(wire.HeaderFormat), payload)
	}
	if err != nil {
		v.DecodeError = err.Error()
		v.RawPrefix = hex.EncodeToString(msg.Data[:min(len(msg.Data), 256)])
		return v
	}
	v.Chunk = viewChunk(c)
	return v
}

func viewChunk(c *havenpb.Chunk) *ChunkView {
	v := &ChunkView{FormatVersion: c.FormatVersion, Kind: c.Kind.String(), SystemID: strconv.FormatUint(c.SystemId, 10),
		Group: c.Group, Slot: c.Slot, Epoch: c.Epoch, Xid: c.Xid, CommitLSN: pglogrepl.LSN(c.CommitLsn).String(),
		ChunkIndex: c.ChunkIndex, LastChunk: c.LastChunk, Relations: c.Relations, Heartbeat: c.Heartbeat, SchemaSQLSize: len(c.SchemaSql)}
	if c.CommitTimeUs != 0 {
		t := time.UnixMicro(c.CommitTimeUs).UTC()
		v.CommitTime = &t
	}
	if c.SnapshotLsn != 0 {
		v.SnapshotLSN = pglogrepl.LSN(c.SnapshotLsn).String()
	}
	rels := make(map[uint32]*havenpb.Relation, len(c.Relations))
	for _, r := range c.Relations {
		rels[r.Id] = r
	}
	for _, ch := range c.Changes {
		cv := ChangeView{Op: ch.Op.String()}
		if ch.Op == havenpb.Op_OP_TRUNCATE {
			for _, id := range ch.TruncateRelationIds {
				cv.Truncate = append(cv.Truncate, rels[id].Schema+"."+rels[id].Name)
			}
		} else {
			rel := rels[ch.RelationId]
			cv.Table = rel.Schema + "." + rel.Name
			cv.Old = viewRow(rel, ch.Old)
			cv.New = viewRow(rel, ch.New)
		}
		v.Changes = append(v.Changes, cv)
	}
	return v
}

func viewRow(rel *havenpb.Relation, row *havenpb.Row) map[string]any {
	if row == nil {
		return nil
	}
	out := make(map[string]any, len(row.Values))
	for i, d := range row.Values {
		switch {
		case d.Kind == havenpb.DatumKind_DATUM_NULL:
			out[rel.Columns[i].Name] = nil
		case d.Kind == havenpb.DatumKind_DATUM_UNCHANGED_TOAST:
			out[rel.Columns[i].Name] = "<unchanged toast>"
		case utf8.Valid(d.Text):
			out[rel.Columns[i].Name] = string(d.Text)
		default:
			out[rel.Columns[i].Name] = "<not UTF-8, hex> " + hex.EncodeToString(d.Text)
		}
	}
	return out
}

// SkipRequest asks to step over one stream message on purpose.
type SkipRequest struct {
	TargetURL string
	NATSURL   string
	Group     string
	// Seq must be the message apply is stopped at: the one after the stored
	// position.
	Seq uint64
	// Reason and Operator are recorded with the skipped message.
	Reason   string
	Operator string
}

// Skip steps over the message apply is stopped at (the whole transaction
// when the message is its first chunk): it records the message (as inspect
// shows it), who skipped it, when and why in haven.skipped_messages, and
// moves the apply position past it, in one DR transaction. It refuses any
// other message, and refuses while a standby holds the apply lock.
func Skip(ctx context.Context, req SkipRequest) error {
	switch {
	case req.Reason == "":
		return errors.New("say why the message is skipped (--reason): it is recorded with it")
	case req.Operator == "":
		return errors.New("say who skips it (--operator)")
	}
	config, err := writerConfig(req.TargetURL)
	if err != nil {
		return err
	}
	conn, err := pgx.ConnectConfig(ctx, config)
	if err != nil {
		return fmt.Errorf("connect to DR database: %w", err)
	}
	defer conn.Close(context.Background())
	var locked bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock(hashtext('haven standby ' || $1))`, req.Group).Scan(&locked); err != nil {
		return fmt.Errorf("take the apply lock: %w", err)
	}
	if !locked {
		return fmt.Errorf("a standby is applying group %q right now (it holds the apply lock): only a message apply is stopped at can be skipped; "+
			"stop the standby, or wait until it reports being blocked, and try again", req.Group)
	}
	pos, found, err := loadPosition(ctx, conn, req.Group)
	if err != nil {
		return err
	}
	if !found {
		return fmt.Errorf("haven has never applied group %q to this database: nothing to skip", req.Group)
	}
	if req.Seq != pos.streamSeq+1 {
		return fmt.Errorf("apply of group %q stands at stream message %d, so the next one is %d: only the message apply stops at can be skipped, not %d",
			req.Group, pos.streamSeq, pos.streamSeq+1, req.Seq)
	}
	view := &MessageView{Seq: req.Seq, DecodeError: "the message is not in the stream"}
	js, stream, closeConn, err := openStream(ctx, req.NATSURL, req.Group)
	if err != nil {
		return err
	}
	defer closeConn()
	through := req.Seq
	msg, err := stream.GetMsg(ctx, req.Seq)
	switch {
	case err == nil:
		view = viewMessage(ctx, js, req.Group, msg)
		if c := view.Chunk; c != nil && c.Kind == havenpb.Kind_KIND_TRANSACTION.String() && !c.LastChunk {
			// A transaction is skipped whole: its later chunks could not be
			// applied without its first.
			if through, err = lastChunkOf(ctx, js, req.Group, stream, req.Seq, c.CommitLSN); err != nil {
				return err
			}
		}
	case !errors.Is(err, jetstream.ErrMsgNotFound):
		return fmt.Errorf("read message %d: %w", req.Seq, err)
	}
	recorded, err := json.Marshal(view)
	if err != nil {
		return fmt.Errorf("encode message %d: %w", req.Seq, err)
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	if _, err := tx.Exec(ctx, `INSERT INTO haven.skipped_messages (group_name, stream_seq, operator, reason, message) VALUES ($1, $2, $3, $4, $5)`,
		req.Group, int64(req.Seq), req.Operator, req.Reason, string(recorded)); err != nil {
		return fmt.Errorf("record the skip: %w", err)
	}
	// A skipped transaction counts as done: copies of it are skipped too.
	commitLSN := pos.commitLSN
	if c := view.Chunk; c != nil && c.Kind == havenpb.Kind_KIND_TRANSACTION.String() {
		if lsn, err := pglogrepl.ParseLSN(c.CommitLSN); err == nil && lsn > commitLSN {
			commitLSN = lsn
		}
	}
	tag, err := tx.Exec(ctx, `UPDATE haven.apply_position SET stream_seq = $2, commit_lsn = $4::pg_lsn, updated_at = now()
		WHERE group_name = $1 AND stream_seq = $3`, req.Group, int64(through), int64(pos.streamSeq), commitLSN.String())
	if err != nil {
		return fmt.Errorf("move the apply position: %w", err)
	}
	if tag.RowsAffected() != 1 {
		return errors.New("the apply position moved meanwhile; nothing skipped")
	}
	return tx.Commit(ctx)
}

// lastChunkOf finds the stream sequence of the last chunk of the
// transaction at commitLSN whose first chunk is at seq.
func lastChunkOf(ctx context.Context, js jetstream.JetStream, group string, stream jetstream.Stream, seq uint64, commitLSN string) (uint64, error) {
	info, err := stream.Info(ctx)
	if err != nil {
		return 0, fmt.Errorf("read stream state: %w", err)
	}
	for next := seq + 1; next <= info.State.LastSeq; next++ {
		msg, err := stream.GetMsg(ctx, next)
		if err != nil {
			return 0, fmt.Errorf("read message %d: %w", next, err)
		}
		v := viewMessage(ctx, js, group, msg)
		if v.Chunk != nil && v.Chunk.CommitLSN == commitLSN && v.Chunk.LastChunk {
			return next, nil
		}
	}
	return 0, fmt.Errorf("the transaction at %s that starts at message %d has no last chunk in the stream yet; wait for it and skip again", commitLSN, seq)
}

// openStream connects to NATS and looks up a group's stream.
func openStream(ctx context.Context, natsURL, group string) (jetstream.JetStream, jetstream.Stream, func(), error) {
	nc, err := nats.Connect(natsURL, nats.Name("haven-operator-"+group))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("connect to NATS at %s: %w", natsURL, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, nil, fmt.Errorf("JetStream context: %w", err)
	}
	stream, err := wire.LookupStream(ctx, js, group)
	if err != nil {
		nc.Close()
		return nil, nil, nil, err
	}
	return js, stream, nc.Close, nil
}
