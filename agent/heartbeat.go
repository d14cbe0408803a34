package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/haven-dr/haven/proto/wire"
)

// heartbeats emits a logical message through the slot at every interval, so
// that an idle database still advances the slot and the standby can measure
// lag end to end; each carries the sequences' positions, so they reach DR in
// WAL order. It also samples the slot's retained WAL for the metrics. It
// uses its own connection and never stops the session: a failed beat is
// logged and retried at the next tick.
func (s *session) heartbeats(ctx context.Context) {
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	ticker := time.NewTicker(s.cfg.HeartbeatInterval)
	defer ticker.Stop()
	for {
		if conn == nil {
			c, err := s.connectSource(ctx)
			if err != nil && ctx.Err() == nil {
				s.log.Warn().Err(err).Msg("heartbeat connection failed; retrying at the next beat")
			}
			conn = c
		}
		if conn != nil {
			if err := s.beat(ctx, conn); err != nil {
				if ctx.Err() != nil {
					return
				}
				s.log.Warn().Err(err).Msg("heartbeat failed; retrying at the next beat")
				conn.Close(context.Background())
				conn = nil
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

// heartbeatContent is the payload of a heartbeat's logical message.
type heartbeatContent struct {
	EmittedAtUs int64           `json:"at"`
	Sequences   []sequenceValue `json:"sequences,omitempty"`
}

type sequenceValue struct {
	Schema    string `json:"schema"`
	Name      string `json:"name"`
	LastValue int64  `json:"last_value"`
}

// sequencesQuery samples every used sequence outside the system schemas.
// last_value is at least every value handed out so far (sessions that cache
// values have already advanced it past their cache).
const sequencesQuery = `SELECT schemaname, sequencename, last_value FROM pg_sequences
	WHERE last_value IS NOT NULL AND schemaname NOT IN ('pg_catalog', 'information_schema', 'haven')`

func (s *session) beat(ctx context.Context, conn *pgx.Conn) error {
	ctx, cancel := context.WithTimeout(ctx, max(s.cfg.HeartbeatInterval, 5*time.Second))
	defer cancel()
	rows, err := conn.Query(ctx, sequencesQuery)
	if err != nil {
		return fmt.Errorf("sample sequences: %w", err)
	}
	seqs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (sequenceValue, error) {
		var v sequenceValue
		return v, row.Scan(&v.Schema, &v.Name, &v.LastValue)
	})
	if err != nil {
		return fmt.Errorf("sample sequences: %w", err)
	}
	content, err := json.Marshal(heartbeatContent{EmittedAtUs: time.Now().UnixMicro(), Sequences: seqs})
	if err != nil {
		return fmt.Errorf("encode heartbeat: %w", err)
	}
	if _, err := conn.Exec(ctx, `SELECT pg_logical_emit_message(true, $1, $2::text)`, heartbeatPrefix(s.cfg.Group), string(content)); err != nil {
		return fmt.Errorf("emit heartbeat: %w", err)
	}
	var retained, lag *int64
	err = conn.QueryRow(ctx, `SELECT (pg_current_wal_lsn() - restart_lsn)::bigint, (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
		FROM pg_replication_slots WHERE slot_name = $1`, wire.SlotName(s.cfg.Group)).Scan(&retained, &lag)
	if err != nil {
		return fmt.Errorf("read slot position: %w", err)
	}
	if retained != nil {
		s.metrics.retainedWAL.Set(float64(*retained))
		if w := s.cfg.RetainedWALWarning; w > 0 && *retained > w && time.Since(s.lastWALWarning) > time.Minute {
			s.lastWALWarning = time.Now()
			s.log.Warn().Int64("retained_bytes", *retained).Int64("threshold", w).Str("slot", wire.SlotName(s.cfg.Group)).
				Msg("the slot holds more WAL on the primary than --retained-wal-warning: changes are not reaching JetStream fast enough " +
					"(NATS down or full, agent behind); the primary's disk fills until they do, or until max_slot_wal_keep_size invalidates the slot")
		}
	}
	if lag != nil {
		s.metrics.lagBytes.Set(float64(*lag))
	}
	return nil
}
