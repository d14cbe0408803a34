// Command failover measures, on this machine, how long writes stop when the
// primary is lost (RTO: SIGKILL of its postmaster, to the first write
// accepted through a multi-host connection string with
// target_session_attrs=read-write) and during a planned switchover (the
// longest pause between two acknowledged writes), with haven's defaults and
// three controller nodes. It prints a table and writes it as JSON under
// bench/results/. Run it with `make bench`.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/haven-dr/haven/agent"
	"github.com/haven-dr/haven/failover"
	"github.com/haven-dr/haven/internal/natstest"
	"github.com/haven-dr/haven/internal/pgtest"
	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/havenpb/havenpbconnect"
	"github.com/haven-dr/haven/replicator"
)

const database, group = "crm", "crm"

func main() {
	runs := flag.Int("runs", 3, "measurements of each figure (the median is reported)")
	out := flag.String("out", "bench/results", "directory for the JSON results")
	keep := flag.Bool("keep", false, "keep the work directory (the clusters' and haven's logs)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *runs, *out, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "bench failed:", err)
		os.Exit(1)
	}
}

// figure is one measured quantity over several runs.
type figure struct {
	Name    string    `json:"name"`
	Seconds []float64 `json:"seconds"`
	Median  float64   `json:"median"`
	Min     float64   `json:"min"`
	Max     float64   `json:"max"`
	Target  float64   `json:"target"`
}

func summarize(name string, target float64, d []time.Duration) figure {
	f := figure{Name: name, Target: target}
	for _, x := range d {
		f.Seconds = append(f.Seconds, x.Seconds())
	}
	s := slices.Sorted(slices.Values(f.Seconds))
	f.Median, f.Min, f.Max = s[len(s)/2], s[0], s[len(s)-1]
	return f
}

func run(ctx context.Context, runs int, out string, keep bool) (err error) {
	work, err := os.MkdirTemp("", "haven-bench-")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w (logs kept in %s)", err, work)
			return
		}
		if keep {
			fmt.Println("logs kept in", work)
			return
		}
		os.RemoveAll(work)
	}()
	logFile, err := os.Create(filepath.Join(work, "haven.log"))
	if err != nil {
		return err
	}
	defer logFile.Close()
	zerolog.TimeFieldFormat = time.RFC3339Nano // a switchover takes a fraction of a second
	log := zerolog.New(logFile).With().Timestamp().Logger()

	var rto, pause []time.Duration
	for i := range runs {
		d, err := measureRTO(ctx, filepath.Join(work, fmt.Sprintf("rto%d", i)), log)
		if err != nil {
			return fmt.Errorf("RTO run %d: %w", i+1, err)
		}
		fmt.Printf("RTO run %d: %s\n", i+1, d.Round(time.Millisecond))
		rto = append(rto, d)
	}
	p, err := measureSwitchovers(ctx, filepath.Join(work, "switchover"), runs, log)
	if err != nil {
		return fmt.Errorf("switchover: %w", err)
	}
	pause = p
	figures := []figure{summarize("failover RTO (SIGKILL of the primary to the first write accepted)", 5, rto),
		summarize("switchover write pause (longest gap between two acknowledged writes)", 1, pause)}
	fmt.Printf("\n%-72s  %8s  %8s  %8s  %8s\n", "figure (seconds)", "median", "min", "max", "target")
	for _, f := range figures {
		fmt.Printf("%-72s  %8.2f  %8.2f  %8.2f  %8.2f\n", f.Name, f.Median, f.Min, f.Max, f.Target)
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	host, _ := os.Hostname()
	data, err := json.MarshalIndent(map[string]any{"at": time.Now().UTC(), "host": host, "runs": runs, "figures": figures}, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(out, "failover-"+time.Now().UTC().Format("20060102T150405Z")+".json")
	if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Println("written to", path)
	return nil
}

// site is two clusters, NATS and a quorum, with an agent and a standby at
// each site (site a primary), all in this process.
type site struct {
	a, b        *pgtest.Cluster
	controllers []string
	stop        []func()
	done        chan error
}

func (s *site) close() {
	for i := len(s.stop) - 1; i >= 0; i-- {
		s.stop[i]()
	}
}

func startSite(ctx context.Context, dir string, log zerolog.Logger, bothRoles bool) (*site, error) {
	s := &site{done: make(chan error, 4)}
	nats, err := natstest.Start(natstest.Options{StoreDir: filepath.Join(dir, "js")})
	if err != nil {
		return nil, err
	}
	s.stop = append(s.stop, nats.Shutdown)
	for _, c := range []**pgtest.Cluster{&s.a, &s.b} {
		cl, err := pgtest.Start(ctx, pgtest.Options{Name: "bench"})
		if err != nil {
			s.close()
			return nil, err
		}
		s.stop = append(s.stop, func() { _ = cl.Destroy() })
		if err := cl.CreateDatabase(ctx, database); err != nil {
			s.close()
			return nil, err
		}
		*c = cl
	}
	if err := exec(ctx, s.a.URL(database), `CREATE TABLE writes (id bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())`); err != nil {
		s.close()
		return nil, err
	}
	if s.controllers, s.stop, err = appendStop(s.stop, func() ([]string, func(), error) {
		return failover.StartLocal(ctx, 3, filepath.Join(dir, "raft"), log)
	}); err != nil {
		s.close()
		return nil, err
	}
	runCtx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	s.stop = append(s.stop, func() { cancel(); wg.Wait() })
	start := func(r interface{ Run(context.Context) error }) {
		wg.Add(1)
		go func() { defer wg.Done(); s.done <- r.Run(runCtx) }()
	}
	newAgent := func(src *pgtest.Cluster, siteName string) error {
		cfg := agent.DefaultConfig()
		cfg.SourceURL, cfg.NATSURL, cfg.Group, cfg.Controllers, cfg.Site = src.URL(database), nats.URL(), group, s.controllers, siteName
		cfg.ReportDir = dir
		a, err := agent.New(cfg, log, prometheus.NewRegistry())
		if err == nil {
			start(a)
		}
		return err
	}
	newStandby := func(dst *pgtest.Cluster, siteName string) error {
		cfg := replicator.DefaultConfig()
		cfg.TargetURL, cfg.NATSURL, cfg.Group, cfg.Controllers, cfg.Site = dst.URL(database), nats.URL(), group, s.controllers, siteName
		st, err := replicator.New(cfg, log, prometheus.NewRegistry())
		if err == nil {
			start(st)
		}
		return err
	}
	if err := errors.Join(newAgent(s.a, "a"), newStandby(s.b, "b")); err != nil {
		s.close()
		return nil, err
	}
	if err := s.waitRows(ctx, s.b); err != nil {
		s.close()
		return nil, err
	}
	if bothRoles {
		if err := errors.Join(newAgent(s.b, "b"), newStandby(s.a, "a")); err != nil {
			s.close()
			return nil, err
		}
	}
	return s, nil
}

func appendStop(stops []func(), f func() ([]string, func(), error)) ([]string, []func(), error) {
	v, stop, err := f()
	if err != nil {
		return nil, stops, err
	}
	return v, append(stops, stop), nil
}

// waitRows waits until c has the writes table (the initial copy is done).
func (s *site) waitRows(ctx context.Context, c *pgtest.Cluster) error {
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); {
		var ok bool
		if conn, err := pgx.Connect(ctx, c.URL(database)); err == nil {
			_ = conn.QueryRow(ctx, `SELECT to_regclass('writes') IS NOT NULL`).Scan(&ok)
			conn.Close(ctx)
		}
		if ok {
			return nil
		}
		select {
		case err := <-s.done:
			return fmt.Errorf("haven stopped: %v", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return errors.New("the DR site did not get the schema in 2 minutes")
}

func exec(ctx context.Context, url, sql string) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, sql)
	return err
}

// writer inserts through the multi-host connection string until stopped,
// recording when each write was acknowledged and by which port.
type writer struct {
	mu     sync.Mutex
	writes []ack
	stop   context.CancelFunc
	done   chan struct{}
}

type ack struct {
	at   time.Time
	port int
}

func startWriter(ctx context.Context, s *site) *writer {
	url := fmt.Sprintf("postgres://postgres@127.0.0.1:%d,127.0.0.1:%d/%s?target_session_attrs=read-write&connect_timeout=1",
		s.a.Port(), s.b.Port(), database)
	ctx, cancel := context.WithCancel(ctx)
	w := &writer{stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		var conn *pgx.Conn
		for id := int64(1); ctx.Err() == nil; id++ {
			if conn == nil {
				c, err := pgx.Connect(ctx, url)
				if err != nil {
					time.Sleep(10 * time.Millisecond)
					continue
				}
				conn = c
			}
			if _, err := conn.Exec(ctx, `INSERT INTO writes (id) VALUES ($1)`, id); err != nil {
				conn.Close(context.Background())
				conn = nil
				continue
			}
			w.mu.Lock()
			w.writes = append(w.writes, ack{at: time.Now(), port: conn.PgConn().Conn().RemoteAddr().(*net.TCPAddr).Port})
			w.mu.Unlock()
		}
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	return w
}

// since returns the writes acknowledged at or after t.
func (w *writer) since(t time.Time) []ack {
	w.mu.Lock()
	defer w.mu.Unlock()
	i, _ := slices.BinarySearchFunc(w.writes, t, func(a ack, t time.Time) int { return a.at.Compare(t) })
	return slices.Clone(w.writes[i:])
}

func (w *writer) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.writes)
}

func waitFor(ctx context.Context, s *site, timeout time.Duration, what string, cond func() bool) error {
	for deadline := time.Now().Add(timeout); !cond(); {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: still waiting after %s", what, timeout)
		}
		select {
		case err := <-s.done:
			return fmt.Errorf("haven stopped: %v", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// measureRTO kills the primary under writes and times the first write the
// DR site accepts.
func measureRTO(ctx context.Context, dir string, log zerolog.Logger) (time.Duration, error) {
	s, err := startSite(ctx, dir, log, false)
	if err != nil {
		return 0, err
	}
	defer s.close()
	w := startWriter(ctx, s)
	defer func() { w.stop(); <-w.done }()
	if err := waitFor(ctx, s, time.Minute, "writes", func() bool { return w.count() > 100 }); err != nil {
		return 0, err
	}
	killed := time.Now()
	if err := s.a.Kill(); err != nil {
		return 0, err
	}
	var rto time.Duration
	err = waitFor(ctx, s, time.Minute, "a write on the DR site", func() bool {
		for _, a := range w.since(killed) {
			if a.port == s.b.Port() {
				rto = a.at.Sub(killed)
				return true
			}
		}
		return false
	})
	return rto, err
}

// otherSite is the site of the two that is not site.
func otherSite(site string) string { return map[string]string{"a": "b", "b": "a"}[site] }

// checkHandOver checks that the writes of a switchover to site to moved
// there once and for all: some on the old primary, then only on the new
// one (a write the old primary took after the new one took one would be
// two primaries at once). It returns the time from the old primary's last
// write to the new one's first.
func checkHandOver(acks []ack, ports map[string]int, to string) (time.Duration, error) {
	from := otherSite(to)
	lastOld, firstNew := -1, -1
	for j, a := range acks {
		switch a.port {
		case ports[from]:
			if firstNew >= 0 {
				return 0, fmt.Errorf("site %s took a write %s after site %s took its first: two primaries at once",
					from, a.at.Sub(acks[firstNew].at), to)
			}
			lastOld = j
		case ports[to]:
			if firstNew < 0 {
				firstNew = j
			}
		}
	}
	if lastOld < 0 || firstNew < 0 {
		return 0, fmt.Errorf("the writes did not move from site %s to site %s (%d writes measured)", from, to, len(acks))
	}
	return acks[firstNew].at.Sub(acks[lastOld].at), nil
}

// measureSwitchovers switches the primary role back and forth under writes
// and returns, for each, the longest gap between two acknowledged writes.
func measureSwitchovers(ctx context.Context, dir string, runs int, log zerolog.Logger) ([]time.Duration, error) {
	s, err := startSite(ctx, dir, log, true)
	if err != nil {
		return nil, err
	}
	defer s.close()
	w := startWriter(ctx, s)
	defer func() { w.stop(); <-w.done }()
	ctl := havenpbconnect.NewControlClient(http.DefaultClient, s.controllers[0])
	status := func() *havenpb.GroupStatus {
		r, err := ctl.Status(ctx, connect.NewRequest(&havenpb.StatusRequest{}))
		if err != nil || len(r.Msg.Groups) != 1 {
			return nil
		}
		return r.Msg.Groups[0]
	}
	settled := func(primary string) func() bool {
		return func() bool {
			g := status()
			return g != nil && g.PrimarySite == primary && g.State == "ACTIVE" && len(g.DeposedSites) == 0 && g.Rejoin == "" &&
				g.DrIncomplete == "" && time.Since(time.UnixMilli(g.StandbySeenUnixMs)) < time.Second
		}
	}
	var pauses []time.Duration
	to := "b"
	for i := range runs {
		if err := waitFor(ctx, s, 2*time.Minute, "a settled group", settled(otherSite(to))); err != nil {
			return nil, err
		}
		before := w.count()
		if err := waitFor(ctx, s, time.Minute, "writes", func() bool { return w.count() > before+100 }); err != nil {
			return nil, err
		}
		started := time.Now()
		if _, err := ctl.Switchover(ctx, connect.NewRequest(&havenpb.SwitchoverRequest{Group: group, Actor: "bench"})); err != nil {
			return nil, err
		}
		if err := waitFor(ctx, s, 2*time.Minute, "the switchover to site "+to, settled(to)); err != nil {
			return nil, err
		}
		acks := w.since(started.Add(-time.Second))
		handOver, err := checkHandOver(acks, map[string]int{"a": s.a.Port(), "b": s.b.Port()}, to)
		if err != nil {
			return nil, fmt.Errorf("switchover %d to site %s: %w", i+1, to, err)
		}
		var longest time.Duration
		var from time.Time // where the longest gap began
		for j := 1; j < len(acks); j++ {
			if gap := acks[j].at.Sub(acks[j-1].at); gap > longest {
				longest, from = gap, acks[j-1].at
			}
		}
		// When the pause began, from the request: a late one is not the
		// hand-over itself but what follows it (the old primary's rejoin).
		fmt.Printf("switchover %d to site %s: write pause %s, from %s after the request (%s to %s, for the logs; settled after %s); "+
			"last write on the old primary to first on the new %s\n", i+1, to,
			longest.Round(time.Millisecond), from.Sub(started).Round(time.Millisecond),
			from.UTC().Format("15:04:05.000"), from.Add(longest).UTC().Format("15:04:05.000"), time.Since(started).Round(time.Millisecond),
			handOver.Round(time.Millisecond))
		pauses = append(pauses, longest)
		to = otherSite(to)
	}
	return pauses, nil
}
