package agent

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
)

// heartbeats emits a logical message through the slot at every interval, so
// that an idle database still advances the slot and the standby can measure
// lag end to end, and samples the slot's retained WAL for the metrics. It
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

func (s *session) beat(ctx context.Context, conn *pgx.Conn) error {
	ctx, cancel := context.WithTimeout(ctx, max(s.cfg.HeartbeatInterval, 5*time.Second))
	defer cancel()
	now := strconv.FormatInt(time.Now().UnixMicro(), 10)
	if _, err := conn.Exec(ctx, `SELECT pg_logical_emit_message(true, $1, $2)`, heartbeatPrefix(s.cfg.Group), now); err != nil {
		return fmt.Errorf("emit heartbeat: %w", err)
	}
	var retained, lag *int64
	err := conn.QueryRow(ctx, `SELECT (pg_current_wal_lsn() - restart_lsn)::bigint, (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
		FROM pg_replication_slots WHERE slot_name = $1`, SlotName(s.cfg.Group)).Scan(&retained, &lag)
	if err != nil {
		return fmt.Errorf("read slot position: %w", err)
	}
	if retained != nil {
		s.metrics.retainedWAL.Set(float64(*retained))
	}
	if lag != nil {
		s.metrics.lagBytes.Set(float64(*lag))
	}
	return nil
}
