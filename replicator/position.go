package replicator

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
)

// positionDDL creates haven's bookkeeping on the DR database.
const positionDDL = `
CREATE SCHEMA IF NOT EXISTS haven;
CREATE TABLE IF NOT EXISTS haven.apply_position (
	group_name     text PRIMARY KEY,
	stream_seq     bigint NOT NULL,
	commit_lsn     pg_lsn NOT NULL,
	commit_time    timestamptz,
	system_id      numeric(20) NOT NULL,
	epoch          bigint NOT NULL,
	snapshot_lsn   pg_lsn NOT NULL,
	snapshot_done  boolean NOT NULL,
	heartbeat_at   timestamptz,
	source_wal_lsn pg_lsn,
	stream_created timestamptz NOT NULL,
	updated_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE haven.apply_position IS 'haven: last source transaction applied per group; written in the same transaction as the changes';
CREATE TABLE IF NOT EXISTS haven.standby_identity (
	id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
	created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO haven.standby_identity SELECT WHERE NOT EXISTS (SELECT 1 FROM haven.standby_identity);
COMMENT ON TABLE haven.standby_identity IS 'haven: identifies this DR database to the stream (its consumers are named after it)';
CREATE TABLE IF NOT EXISTS haven.skipped_messages (
	group_name text NOT NULL,
	stream_seq bigint NOT NULL,
	skipped_at timestamptz NOT NULL DEFAULT now(),
	operator   text NOT NULL,
	reason     text NOT NULL,
	message    jsonb NOT NULL,
	PRIMARY KEY (group_name, stream_seq)
);
CREATE TABLE IF NOT EXISTS haven.ddl_log (
	id             bigint PRIMARY KEY,
	txid           bigint NOT NULL,
	at             timestamptz NOT NULL,
	username       text NOT NULL,
	search_path    text NOT NULL,
	command_tags   text NOT NULL,
	ddl            text NOT NULL,
	rewrite_reason int NOT NULL DEFAULT 0
);
ALTER TABLE haven.ddl_log ADD COLUMN IF NOT EXISTS rewrite_reason int NOT NULL DEFAULT 0;
ALTER TABLE haven.ddl_log ADD COLUMN IF NOT EXISTS relations oid[] NOT NULL DEFAULT '{}';
ALTER TABLE haven.ddl_log ADD COLUMN IF NOT EXISTS settings jsonb NOT NULL DEFAULT '{}';
ALTER TABLE haven.ddl_log ADD COLUMN IF NOT EXISTS missing_values jsonb NOT NULL DEFAULT '[]';
ALTER TABLE haven.ddl_log ADD COLUMN IF NOT EXISTS ordinal int NOT NULL DEFAULT 0;
ALTER TABLE haven.ddl_log ADD COLUMN IF NOT EXISTS rewrite_digests jsonb;
COMMENT ON TABLE haven.ddl_log IS 'haven: DDL run on the primary and replayed here, in stream order';
-- The second part of a schema the standby created for a snapshot
-- (indexes, constraints, triggers), run once its rows are loaded.
CREATE TABLE IF NOT EXISTS haven.post_data (
  group_name text PRIMARY KEY,
  script     text NOT NULL
);
CREATE TABLE IF NOT EXISTS haven.backfills (
	group_name  text NOT NULL,
	relid       oid NOT NULL,
	table_name  text NOT NULL,
	began_at    timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (group_name, relid)
);
ALTER TABLE haven.backfills ADD COLUMN IF NOT EXISTS source_relid oid NOT NULL DEFAULT 0;
COMMENT ON TABLE haven.backfills IS 'haven: tables whose rows are still being backfilled from the primary; until done, an update or delete may find no row here';
COMMENT ON TABLE haven.skipped_messages IS 'haven: stream messages an operator deliberately skipped (haven skip): who, when, why, and the message';`

// savePositionSQL upserts a group's position; it runs as the last statement
// of every target transaction.
const savePositionSQL = `INSERT INTO haven.apply_position AS p
	(group_name, stream_seq, commit_lsn, commit_time, system_id, epoch, snapshot_lsn, snapshot_done, heartbeat_at, source_wal_lsn, stream_created, updated_at)
	VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, now())
	ON CONFLICT (group_name) DO UPDATE SET stream_seq = $2, commit_lsn = $3, commit_time = $4, system_id = $5, epoch = $6,
	snapshot_lsn = $7, snapshot_done = $8, heartbeat_at = COALESCE($9, p.heartbeat_at), source_wal_lsn = COALESCE($10, p.source_wal_lsn),
	stream_created = $11, updated_at = now()`

// position is where apply stands: the last stream message whose effects are
// committed on DR.
type position struct {
	streamSeq    uint64
	commitLSN    pglogrepl.LSN
	commitTime   time.Time
	systemID     uint64
	epoch        uint64
	snapshotLSN  pglogrepl.LSN
	snapshotDone bool
	heartbeatAt  time.Time
	sourceWALLSN pglogrepl.LSN
	// streamCreated identifies the stream the position counts in: sequence
	// numbers of a recreated stream mean nothing for this one.
	streamCreated time.Time
}

// params renders the position as text parameters of savePositionSQL.
func (p position) params(group string) [][]byte {
	optTime := func(t time.Time) []byte {
		if t.IsZero() {
			return nil
		}
		return []byte(t.UTC().Format(time.RFC3339Nano))
	}
	optLSN := func(l pglogrepl.LSN) []byte {
		if l == 0 {
			return nil
		}
		return []byte(l.String())
	}
	return [][]byte{
		[]byte(group),
		[]byte(strconv.FormatUint(p.streamSeq, 10)),
		[]byte(p.commitLSN.String()),
		optTime(p.commitTime),
		[]byte(strconv.FormatUint(p.systemID, 10)),
		[]byte(strconv.FormatUint(p.epoch, 10)),
		[]byte(p.snapshotLSN.String()),
		[]byte(strconv.FormatBool(p.snapshotDone)),
		optTime(p.heartbeatAt),
		optLSN(p.sourceWALLSN),
		[]byte(p.streamCreated.UTC().Format(time.RFC3339Nano)),
	}
}

// standbyID names this DR database among the consumers of a stream.
func standbyID(ctx context.Context, conn *pgx.Conn) (string, error) {
	var id string
	if err := conn.QueryRow(ctx, `SELECT replace(id::text, '-', '') FROM haven.standby_identity ORDER BY created_at LIMIT 1`).Scan(&id); err != nil {
		return "", fmt.Errorf("read haven.standby_identity: %w", err)
	}
	return id[:12], nil
}

// loadPosition creates the bookkeeping if needed and reads the group's
// position; found is false for a database haven never applied to.
func loadPosition(ctx context.Context, conn *pgx.Conn, group string) (pos position, found bool, err error) {
	if _, err := conn.Exec(ctx, positionDDL); err != nil {
		return pos, false, fmt.Errorf("create haven.apply_position: %w", err)
	}
	var commitLSN, snapshotLSN string
	var sourceWAL *string
	var commitTime, heartbeatAt *time.Time
	var systemID string
	err = conn.QueryRow(ctx, `SELECT stream_seq, commit_lsn::text, commit_time, system_id::text, epoch, snapshot_lsn::text,
		snapshot_done, heartbeat_at, source_wal_lsn::text, stream_created FROM haven.apply_position WHERE group_name = $1`, group).
		Scan(&pos.streamSeq, &commitLSN, &commitTime, &systemID, &pos.epoch, &snapshotLSN, &pos.snapshotDone, &heartbeatAt, &sourceWAL, &pos.streamCreated)
	if errors.Is(err, pgx.ErrNoRows) {
		return pos, false, nil
	}
	if err != nil {
		return pos, false, fmt.Errorf("read haven.apply_position: %w", err)
	}
	if pos.commitLSN, err = pglogrepl.ParseLSN(commitLSN); err != nil {
		return pos, false, fmt.Errorf("parse commit_lsn %q: %w", commitLSN, err)
	}
	if pos.snapshotLSN, err = pglogrepl.ParseLSN(snapshotLSN); err != nil {
		return pos, false, fmt.Errorf("parse snapshot_lsn %q: %w", snapshotLSN, err)
	}
	if pos.systemID, err = strconv.ParseUint(systemID, 10, 64); err != nil {
		return pos, false, fmt.Errorf("parse system_id %q: %w", systemID, err)
	}
	if sourceWAL != nil {
		if pos.sourceWALLSN, err = pglogrepl.ParseLSN(*sourceWAL); err != nil {
			return pos, false, fmt.Errorf("parse source_wal_lsn %q: %w", *sourceWAL, err)
		}
	}
	if commitTime != nil {
		pos.commitTime = *commitTime
	}
	if heartbeatAt != nil {
		pos.heartbeatAt = *heartbeatAt
	}
	return pos, true, nil
}
