package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/jackc/pgx/v5"

	"github.com/haven-dr/haven/internal/pgtest"
	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/havenpb/havenpbconnect"
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

// demoRejoinAndVerify brings the killed primary back: it is fenced, then
// rejoins as the standby of the new primary; a verify drill then compares
// both sites at one LSN, and its report is printed.
func demoRejoinAndVerify(ctx context.Context, controllers []string, primary *pgtest.Cluster, done <-chan error) error {
	step("restarting the old primary: the controllers keep it fenced (read-only) until it rejoins")
	if err := primary.Restart(ctx); err != nil {
		return err
	}
	ctl := havenpbconnect.NewControlClient(http.DefaultClient, controllers[0])
	step("haven ctl rejoin: the old primary reports what it committed that the new one lacks, then reloads as the new standby")
	if _, err := ctl.Rejoin(ctx, connect.NewRequest(&havenpb.RejoinRequest{Group: group, Actor: "demo"})); err != nil {
		return fmt.Errorf("rejoin: %w", err)
	}
	started := time.Now()
	if err := waitUntil(ctx, 5*time.Minute, done, func() bool {
		st, err := ctl.Status(ctx, connect.NewRequest(&havenpb.StatusRequest{}))
		if err != nil || len(st.Msg.Groups) != 1 {
			return false
		}
		g := st.Msg.Groups[0]
		return g.Rejoin == "" && len(g.DeposedSites) == 0 && g.LagSeconds < 1 && g.DrIncomplete == "" && time.UnixMilli(g.StandbySeenUnixMs).After(started)
	}); err != nil {
		return fmt.Errorf("waiting for the rejoin: %w", err)
	}
	step("site a follows site b again (%s)", time.Since(started).Round(time.Millisecond))

	step("haven ctl drill run --kind verify: both sites compared at one LSN")
	run, err := ctl.RunDrill(ctx, connect.NewRequest(&havenpb.RunDrillRequest{Group: group, Kind: "verify", Actor: "demo"}))
	if err != nil {
		return fmt.Errorf("verify drill: %w", err)
	}
	var report *havenpb.DrillReport
	if err := waitUntil(ctx, 5*time.Minute, done, func() bool {
		r, err := ctl.ShowDrill(ctx, connect.NewRequest(&havenpb.ShowDrillRequest{Id: run.Msg.Id}))
		if err != nil || r.Msg.Report.Outcome == "running" {
			return false
		}
		report = r.Msg.Report
		return true
	}); err != nil {
		return err
	}
	fmt.Printf("    drill %s: %s, %s\n", report.Id, strings.ToUpper(report.Outcome), report.Reason)
	fmt.Printf("    RPO at the start: %.3fs behind; DR apply held %.3fs\n", report.Rpo.GetSecondsBehind(), report.ApplyHeldSeconds)
	for _, s := range report.Steps {
		fmt.Printf("    step %-40s %7.3fs  %s\n", s.Name, s.Seconds, s.Detail)
	}
	for _, t := range report.Tables {
		verdict := "equal"
		if !t.Match {
			verdict = "DIFFERENT " + t.Detail
		}
		fmt.Printf("    table %-28s %9d rows on the primary, %9d on DR: %s\n", t.Table, t.PrimaryRows, t.DrRows, verdict)
	}
	if report.Outcome != "passed" {
		return fmt.Errorf("the verify drill %s", report.Outcome)
	}
	return nil
}
