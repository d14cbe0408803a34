package main

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/haven-dr/haven/internal/pgtest"
)

// demoFailover kills the primary while a client writes through a
// multi-host connection string, and reports how long writes stopped and
// which acknowledged writes the promoted DR database lacks.
func demoFailover(ctx context.Context, primary, dr *pgtest.Cluster, primaryConn, drConn *pgx.Conn, done <-chan error) error {
	if _, err := primaryConn.Exec(ctx, `CREATE TABLE demo_writes (id bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())`); err != nil {
		return err
	}
	if err := waitUntil(ctx, time.Minute, done, func() bool {
		var ok bool
		_ = drConn.QueryRow(ctx, `SELECT to_regclass('demo_writes') IS NOT NULL`).Scan(&ok)
		return ok
	}); err != nil {
		return err
	}
	multiHost := fmt.Sprintf("postgres://postgres@127.0.0.1:%d,127.0.0.1:%d/%s?target_session_attrs=read-write&connect_timeout=1",
		primary.Port(), dr.Port(), database)
	step("failover: a client writes through %s", strings.Replace(multiHost, "postgres@", "", 1))
	var mu sync.Mutex
	var acked []int64
	var killedAt, resumedAt time.Time
	writeCtx, stopWriting := context.WithCancel(ctx)
	written := make(chan struct{})
	go func() {
		defer close(written)
		var conn *pgx.Conn
		for id := int64(1); writeCtx.Err() == nil; id++ {
			if conn == nil {
				c, err := pgx.Connect(writeCtx, multiHost)
				if err != nil {
					time.Sleep(20 * time.Millisecond)
					id--
					continue
				}
				conn = c
			}
			if _, err := conn.Exec(writeCtx, `INSERT INTO demo_writes (id) VALUES ($1)`, id); err != nil {
				conn.Close(context.Background())
				conn = nil
				continue
			}
			onDR := conn.PgConn().Conn().RemoteAddr().String() == fmt.Sprintf("127.0.0.1:%d", dr.Port())
			mu.Lock()
			acked = append(acked, id)
			if onDR && !killedAt.IsZero() && resumedAt.IsZero() {
				resumedAt = time.Now()
			}
			mu.Unlock()
		}
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	time.Sleep(2 * time.Second)
	step("killing the primary's postmaster (SIGKILL)")
	mu.Lock()
	killedAt = time.Now()
	before := len(acked)
	mu.Unlock()
	if err := primary.Kill(); err != nil {
		stopWriting()
		return err
	}
	if err := waitUntil(ctx, time.Minute, done, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return !resumedAt.IsZero()
	}); err != nil {
		stopWriting()
		return fmt.Errorf("waiting for writes to resume on the DR site: %w", err)
	}
	time.Sleep(time.Second)
	stopWriting()
	<-written
	mu.Lock()
	rto := resumedAt.Sub(killedAt)
	ackedBefore := acked[:before]
	mu.Unlock()
	var present int
	if err := drConn.QueryRow(ctx, `SELECT count(*) FROM demo_writes WHERE id = ANY($1)`, ackedBefore).Scan(&present); err != nil {
		return err
	}
	step("the DR site took over: the first write was accepted there %s after the kill (RTO)", rto.Round(time.Millisecond))
	lost := len(ackedBefore) - present
	fmt.Printf("    acknowledged before the kill: %d writes; on the new primary: %d; lost: %d\n", len(ackedBefore), present, lost)
	if lost > 0 {
		fmt.Println("    (asynchronous mode: what the agent had not yet put in the stream; haven agent --synchronous makes this 0,")
		fmt.Println("     and haven ctl rejoin writes such transactions to a report when the old primary comes back)")
	}
	return nil
}
