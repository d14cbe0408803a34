// Command demo runs all of haven on one machine with no setup: an embedded
// NATS server, two throwaway PostgreSQL clusters (primary and DR), the agent
// and the standby, three controller nodes, and the reference CRM workload
// (pgbench); it shows the DR copy following live, checks that both sides are
// equal, kills the primary and measures the failover, brings the old primary
// back as the new standby, and ends with a verify drill that compares both
// sites at one LSN.
//
// Run it with `make demo`.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/haven-dr/haven/agent"
	"github.com/haven-dr/haven/failover"
	"github.com/haven-dr/haven/internal/natstest"
	"github.com/haven-dr/haven/internal/pgtest"
	"github.com/haven-dr/haven/replicator"
)

const (
	database = "crm"
	group    = "crm"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "\ndemo failed:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) { fmt.Printf("==> "+format+"\n", args...) }

func run(ctx context.Context) (err error) {
	workDir, err := os.MkdirTemp("", "haven-demo-")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			fmt.Fprintf(os.Stderr, "logs kept in %s\n", workDir)
			return
		}
		os.RemoveAll(workDir)
	}()
	logPath := filepath.Join(workDir, "haven.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	log := zerolog.New(logFile).With().Timestamp().Logger()

	step("starting an embedded NATS server with JetStream")
	nats, err := natstest.Start(natstest.Options{StoreDir: filepath.Join(workDir, "jetstream")})
	if err != nil {
		return err
	}
	defer nats.Shutdown()

	step("starting two PostgreSQL clusters: the primary and the DR site")
	primary, err := pgtest.Start(ctx, pgtest.Options{Name: "demo-primary"})
	if err != nil {
		return err
	}
	defer primary.Destroy()
	dr, err := pgtest.Start(ctx, pgtest.Options{Name: "demo-dr"})
	if err != nil {
		return err
	}
	defer dr.Destroy()
	for _, c := range []*pgtest.Cluster{primary, dr} {
		if err := c.CreateDatabase(ctx, database); err != nil {
			return err
		}
	}
	binDir, err := pgtest.BinDir()
	if err != nil {
		return err
	}
	workload, err := workloadDir()
	if err != nil {
		return err
	}
	step("loading the CRM schema and seed on the primary (10k accounts, 50k contacts, 20k deals, 200k activities)")
	for _, file := range []string{"schema.sql", "seed.sql"} {
		if err := psql(ctx, binDir, primary.URL(database), filepath.Join(workload, file)); err != nil {
			return err
		}
	}

	step("starting three controller nodes (Raft quorum), the agent (capture, site a) and the standby (apply, site b),\n    and each site's other role, idle until the roles swap; logs go to %s", logPath)
	controllers, stopQuorum, err := failover.StartLocal(ctx, 3, workDir, log)
	if err != nil {
		return err
	}
	defer stopQuorum()
	agentCfg := agent.DefaultConfig()
	agentCfg.SourceURL, agentCfg.NATSURL, agentCfg.Group = primary.URL(database), nats.URL(), group
	agentCfg.HeartbeatInterval = time.Second
	agentCfg.Controllers, agentCfg.Site, agentCfg.ReportDir = controllers, "a", workDir
	standbyCfg := replicator.DefaultConfig()
	standbyCfg.TargetURL, standbyCfg.NATSURL, standbyCfg.Group = dr.URL(database), nats.URL(), group
	standbyCfg.Controllers, standbyCfg.Site = controllers, "b"
	reg := prometheus.NewRegistry()
	capture, err := agent.New(agentCfg, log, reg)
	if err != nil {
		return err
	}
	apply, err := replicator.New(standbyCfg, log, reg)
	if err != nil {
		return err
	}
	// Site b's agent captures once b is primary; site a's standby applies
	// once a rejoins as the standby.
	agentB, standbyA := agentCfg, standbyCfg
	agentB.SourceURL, agentB.Site = dr.URL(database), "b"
	standbyA.TargetURL, standbyA.Site = primary.URL(database), "a"
	captureB, err := agent.New(agentB, log, prometheus.NewRegistry())
	if err != nil {
		return err
	}
	applyA, err := replicator.New(standbyA, log, prometheus.NewRegistry())
	if err != nil {
		return err
	}
	runCtx, stopHaven := context.WithCancel(ctx)
	done := make(chan error, 4)
	var running sync.WaitGroup
	start := func(p interface{ Run(context.Context) error }) {
		running.Go(func() { done <- p.Run(runCtx) })
	}
	start(capture)
	start(apply)
	defer func() {
		stopHaven()
		running.Wait()
	}()

	primaryConn, err := pgx.Connect(ctx, primary.URL(database))
	if err != nil {
		return err
	}
	defer primaryConn.Close(context.Background())
	drConn, err := pgx.Connect(ctx, dr.URL(database))
	if err != nil {
		return err
	}
	defer drConn.Close(context.Background())

	began := time.Now()
	if err := waitUntil(ctx, 5*time.Minute, done, func() bool {
		var loaded bool
		_ = drConn.QueryRow(ctx, `SELECT snapshot_done FROM haven.apply_position WHERE group_name = $1`, group).Scan(&loaded)
		return loaded
	}); err != nil {
		return fmt.Errorf("initial snapshot: %w", err)
	}
	step("initial snapshot copied to DR in %s", time.Since(began).Round(time.Millisecond))
	// The other roles start once DR holds the tables (an agent refuses a
	// database without any).
	start(captureB)
	start(applyA)

	const seconds = 20
	step("running the CRM workload on the primary for %d s (pgbench, 4 clients); the DR copy follows:", seconds)
	bench := exec.CommandContext(ctx, filepath.Join(binDir, "pgbench"), "-n", "-f", filepath.Join(workload, "crm.sql"),
		"-c", "4", "-j", "2", "-T", fmt.Sprint(seconds), primary.URL(database))
	benchOut, err := os.Create(filepath.Join(workDir, "pgbench.log"))
	if err != nil {
		return err
	}
	defer benchOut.Close()
	bench.Stdout, bench.Stderr = benchOut, benchOut
	if err := bench.Start(); err != nil {
		return fmt.Errorf("start pgbench: %w", err)
	}
	benchDone := make(chan error, 1)
	go func() { benchDone <- bench.Wait() }()
	fmt.Printf("    %8s  %14s  %14s  %10s\n", "time", "primary rows", "DR rows", "DR lag")
	ticker := time.NewTicker(2 * time.Second)
	defer ticker.Stop()
	started := time.Now()
watch:
	for {
		select {
		case err := <-benchDone:
			if err != nil {
				out, _ := os.ReadFile(benchOut.Name())
				return fmt.Errorf("pgbench: %w\n%s", err, out)
			}
			break watch
		case err := <-done:
			return fmt.Errorf("haven stopped: %v (see %s)", err, logPath)
		case <-ctx.Done():
			return ctx.Err()
		case <-ticker.C:
			// DR first: the primary, read after it, is never behind it.
			d, dAt, _ := countActivities(ctx, drConn)
			p, pAt, _ := countActivities(ctx, primaryConn)
			// How far DR's newest activity is behind the primary's.
			fmt.Printf("    %7.0fs  %14d  %14d  %9.3fs\n", time.Since(started).Seconds(), p, d, max(pAt.Sub(dAt), 0).Seconds())
		}
	}

	step("workload finished; waiting for the DR site to apply the last transaction")
	var marker int64
	if err := primaryConn.QueryRow(ctx, `SELECT pg_current_wal_lsn() - '0/0'::pg_lsn`).Scan(&marker); err != nil {
		return err
	}
	caughtUp := time.Now()
	if err := waitUntil(ctx, 2*time.Minute, done, func() bool {
		var applied int64
		_ = drConn.QueryRow(ctx, `SELECT coalesce(source_wal_lsn, '0/0') - '0/0'::pg_lsn FROM haven.apply_position WHERE group_name = $1`, group).Scan(&applied)
		return applied >= marker
	}); err != nil {
		return err
	}
	step("DR caught up %s after the workload ended", time.Since(caughtUp).Round(time.Millisecond))

	step("comparing every table, row by row, on both sides")
	equal := true
	for _, table := range []string{"accounts", "contacts", "deals", "activities"} {
		want, err := digest(ctx, primaryConn, table)
		if err != nil {
			return err
		}
		got, err := digest(ctx, drConn, table)
		if err != nil {
			return err
		}
		verdict := "equal"
		if want != got {
			verdict, equal = "DIFFERENT", false
		}
		fmt.Printf("    %-10s  primary %-45s  DR %-45s  %s\n", table, want, got, verdict)
	}
	if !equal {
		return errors.New("the DR copy differs from the primary")
	}
	fmt.Printf("    the DR copy equals the primary: %.0f transactions and %.0f row changes applied, exactly once, in commit order\n",
		gauge(reg, "haven_standby_applied_transactions_total"), gauge(reg, "haven_standby_applied_changes_total"))
	if err := demoFailover(ctx, primary, dr, primaryConn, drConn, done); err != nil {
		return err
	}
	return demoRejoinAndVerify(ctx, controllers, primary, done)
}

// workloadDir finds the project's copy of the reference workload.
func workloadDir() (string, error) {
	for _, dir := range []string{"bench/workload", "../bench/workload"} {
		if _, err := os.Stat(filepath.Join(dir, "crm.sql")); err == nil {
			return filepath.Abs(dir)
		}
	}
	return "", errors.New("bench/workload/crm.sql not found: run the demo from the repository root (make demo)")
}

func psql(ctx context.Context, binDir, url, file string) error {
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", file, url)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("psql -f %s: %w\n%s", file, err, out)
	}
	return nil
}

// countActivities counts the rows the workload adds, and says when the
// newest activity was written.
func countActivities(ctx context.Context, conn *pgx.Conn) (int64, time.Time, error) {
	var n int64
	var newest time.Time
	err := conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM activities) + (SELECT count(*) FROM contacts), (SELECT max(at) FROM activities)`).Scan(&n, &newest)
	return n, newest, err
}

func digest(ctx context.Context, conn *pgx.Conn, table string) (string, error) {
	var count int64
	var sum string
	err := conn.QueryRow(ctx, fmt.Sprintf(`SELECT count(*), md5(string_agg(t::text, E'\n' ORDER BY id)) FROM %s t`,
		pgx.Identifier{table}.Sanitize())).Scan(&count, &sum)
	return fmt.Sprintf("%d rows, md5 %.12s", count, sum), err
}

// waitUntil polls cond until it holds, haven stops, or timeout passes.
func waitUntil(ctx context.Context, timeout time.Duration, done <-chan error, cond func() bool) error {
	deadline := time.Now().Add(timeout)
	for !cond() {
		select {
		case err := <-done:
			return fmt.Errorf("haven stopped: %v", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still waiting after %s", timeout)
		}
	}
	return nil
}

// gauge reads a metric's value (summed over its series) from the registry.
func gauge(reg *prometheus.Registry, name string) float64 {
	families, err := reg.Gather()
	if err != nil {
		return 0
	}
	var sum float64
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			if m.GetGauge() != nil {
				sum += m.GetGauge().GetValue()
			}
			if m.GetCounter() != nil {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}
