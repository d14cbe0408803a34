package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// A deposed primary may have committed transactions that never reached the
// DR site (in asynchronous mode: those JetStream had not acknowledged when it
// died, or a transaction the stream held only part of). They are still in
// its slot. When it rejoins, its agent decodes the slot from where the stream
// left it and writes every transaction that committed after the last one DR
// applied as SQL, for an operator to reconcile by hand, before the slot is
// dropped. Nothing is lost silently.

// lostReport decodes the group's slot on the deposed primary and writes
// the transactions committed after promotedLSN to a file in dir. It returns
// the file and how many transactions it holds.
func lostReport(ctx context.Context, cfg Config, promotedLSN pglogrepl.LSN, dir string) (string, int, error) {
	sess := &session{cfg: cfg}
	ctrl, err := sess.connectSource(ctx)
	if err != nil {
		return "", 0, err
	}
	defer ctrl.Close(context.Background())
	slot := wire.SlotName(cfg.Group)
	var exists bool
	var end pglogrepl.LSN
	var endText string
	if err := ctrl.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()), pg_current_wal_lsn()::text`, slot).
		Scan(&exists, &endText); err != nil {
		return "", 0, fmt.Errorf("look up slot %q: %w", slot, err)
	}
	if end, err = pglogrepl.ParseLSN(endText); err != nil {
		return "", 0, err
	}
	path := filepath.Join(dir, fmt.Sprintf("haven-lost-%s-%s.sql", cfg.Group, time.Now().UTC().Format("20060102T150405Z")))
	f, err := os.Create(path)
	if err != nil {
		return "", 0, fmt.Errorf("create the lost-transaction report: %w", err)
	}
	defer f.Close()
	w := bufio.NewWriter(f)
	fmt.Fprintf(w, "-- haven: transactions group %s committed on this deposed primary (site %s) after the last one the promoted\n", cfg.Group, cfg.Site)
	fmt.Fprintf(w, "-- DR database applied (commit LSN %s). They are NOT on the new primary. Review and apply what must be kept.\n", promotedLSN)
	count := 0
	if exists {
		if count, err = decodeLost(ctx, sess, ctrl, w, promotedLSN, end); err != nil {
			return "", 0, err
		}
	} else {
		fmt.Fprintf(w, "-- The slot %s does not exist any more: nothing could be decoded.\n", slot)
	}
	fmt.Fprintf(w, "-- %d transaction(s).\n", count)
	if err := w.Flush(); err != nil {
		return "", 0, err
	}
	if err := f.Sync(); err != nil {
		return "", 0, err
	}
	return path, count, nil
}

func decodeLost(ctx context.Context, sess *session, ctrl *pgx.Conn, w *bufio.Writer, promotedLSN, end pglogrepl.LSN) (int, error) {
	repl, err := sess.replicationConn(ctx)
	if err != nil {
		return 0, err
	}
	defer repl.Close(context.Background())
	slot := wire.SlotName(sess.cfg.Group)
	if err := pglogrepl.StartReplication(ctx, repl, slot, 0, pglogrepl.StartReplicationOptions{Mode: pglogrepl.LogicalReplication,
		PluginArgs: []string{"proto_version '1'", "publication_names " + quoteLiteral(wire.PublicationName(sess.cfg.Group)), "messages 'false'"}}); err != nil {
		return 0, fmt.Errorf("decode slot %q: %w", slot, err)
	}
	st := &streamer{session: &session{cfg: sess.cfg, ctrl: ctrl}, relations: map[uint32]*havenpb.Relation{}, typeNames: map[typeKey]string{}}
	r := &lostRenderer{st: st, w: w}
	deadline := time.Now().Add(time.Minute)
	for {
		if r.position >= end && r.txn == nil {
			fmt.Fprintf(w, "-- decoded %d transaction(s) of the slot, through %s.\n", r.seen, r.position)
			return r.count, nil
		}
		if time.Now().After(deadline) {
			return r.count, fmt.Errorf("decoding slot %q did not reach %s within a minute (at %s)", slot, end, r.position)
		}
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		msg, err := repl.ReceiveMessage(rctx)
		cancel()
		if err != nil {
			if pgconn.Timeout(err) {
				if err := pglogrepl.SendStandbyStatusUpdate(ctx, repl, pglogrepl.StandbyStatusUpdate{}); err != nil {
					return r.count, err
				}
				continue
			}
			return r.count, fmt.Errorf("decode slot %q: %w", slot, err)
		}
		cd, ok := msg.(*pgproto3.CopyData)
		if !ok || len(cd.Data) == 0 {
			if e, isErr := msg.(*pgproto3.ErrorResponse); isErr {
				return r.count, fmt.Errorf("decode slot %q: %w", slot, pgconn.ErrorResponseToPgError(e))
			}
			continue
		}
		switch cd.Data[0] {
		case pglogrepl.PrimaryKeepaliveMessageByteID:
			ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(cd.Data[1:])
			if err != nil {
				return r.count, err
			}
			r.position = max(r.position, ka.ServerWALEnd)
		case pglogrepl.XLogDataByteID:
			xld, err := pglogrepl.ParseXLogData(cd.Data[1:])
			if err != nil {
				return r.count, err
			}
			r.position = max(r.position, xld.WALStart)
			if err := r.handle(ctx, xld.WALData, promotedLSN); err != nil {
				return r.count, err
			}
		}
	}
}

// lostRenderer turns decoded transactions into SQL.
type lostRenderer struct {
	st       *streamer
	w        *bufio.Writer
	txn      *lostTxn
	count    int
	seen     int
	position pglogrepl.LSN
}

type lostTxn struct {
	xid    uint32
	commit pglogrepl.LSN
	at     time.Time
	lines  []string
}

func (r *lostRenderer) handle(ctx context.Context, data []byte, promotedLSN pglogrepl.LSN) error {
	msg, err := pglogrepl.Parse(data)
	if err != nil {
		return err
	}
	switch m := msg.(type) {
	case *pglogrepl.RelationMessage:
		return r.st.onRelation(ctx, m)
	case *pglogrepl.BeginMessage:
		r.txn = &lostTxn{xid: m.Xid, commit: m.FinalLSN, at: m.CommitTime}
	case *pglogrepl.CommitMessage:
		t := r.txn
		r.txn = nil
		r.seen++
		if t == nil || t.commit <= promotedLSN || len(t.lines) == 0 {
			return nil
		}
		r.count++
		fmt.Fprintf(r.w, "\n-- xid %d, committed %s, commit LSN %s\nBEGIN;\n", t.xid, t.at.UTC().Format(time.RFC3339Nano), t.commit)
		for _, l := range t.lines {
			fmt.Fprintln(r.w, l+";")
		}
		fmt.Fprintln(r.w, "COMMIT;")
	case *pglogrepl.InsertMessage:
		return r.row("INSERT", m.RelationID, nil, m.Tuple)
	case *pglogrepl.UpdateMessage:
		return r.row("UPDATE", m.RelationID, m.OldTuple, m.NewTuple)
	case *pglogrepl.DeleteMessage:
		return r.row("DELETE", m.RelationID, m.OldTuple, nil)
	case *pglogrepl.TruncateMessage:
		if r.txn == nil {
			return errors.New("truncate outside a transaction")
		}
		var names []string
		for _, id := range m.RelationIDs {
			if rel, ok := r.st.relations[id]; ok {
				names = append(names, pgx.Identifier{rel.Schema, rel.Name}.Sanitize())
			}
		}
		r.txn.lines = append(r.txn.lines, "TRUNCATE "+strings.Join(names, ", "))
	}
	return nil
}

func (r *lostRenderer) row(op string, relID uint32, oldTuple, newTuple *pglogrepl.TupleData) error {
	if r.txn == nil {
		return errors.New("row change outside a transaction")
	}
	rel, ok := r.st.relations[relID]
	if !ok {
		return fmt.Errorf("change for relation %d before its description", relID)
	}
	table := pgx.Identifier{rel.Schema, rel.Name}.Sanitize()
	literal := func(i int, c *pglogrepl.TupleDataColumn) string {
		if c.DataType == pglogrepl.TupleDataTypeNull {
			return "NULL"
		}
		return quoteLiteral(string(c.Data)) + "::" + rel.Columns[i].Type
	}
	var where []string
	key := oldTuple
	if key == nil {
		key = newTuple
	}
	if key != nil && op != "INSERT" {
		for i, c := range rel.Columns {
			if c.Key && i < len(key.Columns) && key.Columns[i].DataType != pglogrepl.TupleDataTypeToast {
				where = append(where, pgx.Identifier{c.Name}.Sanitize()+" = "+literal(i, key.Columns[i]))
			}
		}
	}
	switch op {
	case "INSERT":
		var cols, vals []string
		for i, c := range newTuple.Columns {
			cols = append(cols, pgx.Identifier{rel.Columns[i].Name}.Sanitize())
			vals = append(vals, literal(i, c))
		}
		r.txn.lines = append(r.txn.lines, fmt.Sprintf("INSERT INTO %s (%s) VALUES (%s)", table, strings.Join(cols, ", "), strings.Join(vals, ", ")))
	case "UPDATE":
		var sets []string
		for i, c := range newTuple.Columns {
			if c.DataType != pglogrepl.TupleDataTypeToast {
				sets = append(sets, pgx.Identifier{rel.Columns[i].Name}.Sanitize()+" = "+literal(i, c))
			}
		}
		r.txn.lines = append(r.txn.lines, fmt.Sprintf("UPDATE %s SET %s WHERE %s", table, strings.Join(sets, ", "), strings.Join(where, " AND ")))
	case "DELETE":
		r.txn.lines = append(r.txn.lines, fmt.Sprintf("DELETE FROM %s WHERE %s", table, strings.Join(where, " AND ")))
	}
	return nil
}
