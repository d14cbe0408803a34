// Command replication measures haven against PostgreSQL's native logical
// replication (PUBLICATION/SUBSCRIPTION) on this machine, with the CRM
// workload of bench/workload run by pgbench: DR catch-up of a backlog, lag
// at the end of a full-speed run, commit-to-visible latency at a fixed
// rate, capture against the walsender's raw pgoutput decode rate, the
// initial copy of a large database against pg_dump | psql, and the peak
// memory of haven's agent and standby. Each figure is the median of -runs
// runs with min and max; it prints one table and writes it as JSON under
// bench/results/. Run it with `make bench`.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/haven-dr/haven/internal/natstest"
	"github.com/haven-dr/haven/internal/pgtest"
	"github.com/haven-dr/haven/proto/wire"
)

const database, group = "crm", "crm"

type options struct {
	runs       int
	changes    int
	live       time.Duration
	latency    time.Duration
	rate       int
	snapshotMB int
	figures    string
	setups     []string
	out        string
	profile    string
	keep       bool
}

func main() {
	var o options
	flag.IntVar(&o.runs, "runs", 3, "runs of each figure (the median is reported, with min and max)")
	flag.IntVar(&o.changes, "changes", 1_000_000, "row changes in the catch-up and capture backlogs")
	flag.DurationVar(&o.live, "live", 30*time.Second, "length of the full-speed run")
	flag.DurationVar(&o.latency, "latency", 30*time.Second, "length of the fixed-rate run")
	flag.IntVar(&o.rate, "rate", 300, "transactions/s of the fixed-rate run (pgbench -R; about 5.1 row changes each)")
	flag.IntVar(&o.snapshotMB, "snapshot-mb", 2048, "size of the database the snapshot figure copies")
	flag.StringVar(&o.figures, "figures", "catchup,live,latency,capture,snapshot", "figures to measure (comma-separated)")
	flag.StringVar(&o.out, "out", "bench/results", "directory for the JSON results")
	flag.StringVar(&o.profile, "profile", "", "directory for CPU profiles of the standby catching up, of the agent capturing, and of the agent, the standby and NATS during the first snapshot (empty: none)")
	flag.BoolVar(&o.keep, "keep", false, "keep the work directory (logs, latency samples)")
	setups := flag.String("setups", "native,haven", "setups to measure (comma-separated)")
	flag.Parse()
	o.setups = strings.Split(*setups, ",")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "bench failed:", err)
		os.Exit(1)
	}
}

// figure is one quantity, measured for both setups in the same runs.
type figure struct {
	Name   string    `json:"name"`
	Unit   string    `json:"unit"`
	Haven  []float64 `json:"haven"`
	Native []float64 `json:"native,omitempty"`
	Target string    `json:"target"`
	// HigherIsBetter orders the ratio haven/native.
	HigherIsBetter bool `json:"higher_is_better"`
}

func stats(v []float64) (median, lo, hi float64) {
	if len(v) == 0 {
		return math.NaN(), math.NaN(), math.NaN()
	}
	s := slices.Sorted(slices.Values(v))
	return s[len(s)/2], s[0], s[len(s)-1]
}

// bench is the state of one run of the program.
type bench struct {
	o        options
	work     string
	bin      string // the haven binary
	pgbin    string
	log      *os.File
	nats     *natstest.Server
	peakRSS  map[string]float64 // MiB, by role
	figures  []*figure
	workload string // bench/workload
}

func run(ctx context.Context, o options) (err error) {
	b := &bench{o: o, peakRSS: map[string]float64{}, workload: "bench/workload"}
	if _, err := os.Stat(filepath.Join(b.workload, "crm.sql")); err != nil {
		return fmt.Errorf("run from the repository's root (bench/workload/crm.sql): %w", err)
	}
	if b.work, err = os.MkdirTemp("", "haven-bench-replication-"); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w (logs kept in %s)", err, b.work)
			return
		}
		if o.keep {
			fmt.Println("logs kept in", b.work)
			return
		}
		os.RemoveAll(b.work)
	}()
	if b.log, err = os.Create(filepath.Join(b.work, "bench.log")); err != nil {
		return err
	}
	defer b.log.Close()
	if b.pgbin, err = pgtest.BinDir(); err != nil {
		return err
	}
	b.bin = filepath.Join(b.work, "haven")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", b.bin, "./cmd/haven").CombinedOutput(); err != nil {
		return fmt.Errorf("build haven: %v: %s", err, out)
	}
	if b.nats, err = natstest.Start(natstest.Options{StoreDir: filepath.Join(b.work, "js")}); err != nil {
		return err
	}
	defer b.nats.Shutdown()

	want := map[string]bool{}
	for _, f := range strings.Split(o.figures, ",") {
		want[strings.TrimSpace(f)] = true
	}
	steps := []struct {
		name string
		run  func(context.Context) error
	}{
		{"catchup", b.catchUp}, {"live", b.liveRun}, {"latency", b.latencyRun}, {"capture", b.capture}, {"snapshot", b.snapshot},
	}
	for _, s := range steps {
		if !want[s.name] {
			continue
		}
		fmt.Printf("== %s\n", s.name)
		if err := s.run(ctx); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	rss := &figure{Name: "peak RSS, agent", Unit: "MiB", Target: "<= 256"}
	rss2 := &figure{Name: "peak RSS, standby", Unit: "MiB", Target: "<= 256"}
	if v, ok := b.peakRSS["agent"]; ok {
		rss.Haven = []float64{v}
		rss2.Haven = []float64{b.peakRSS["standby"]}
		b.figures = append(b.figures, rss, rss2)
	}
	return b.report()
}

// report prints the table and writes the JSON.
func (b *bench) report() error {
	host, _ := os.Hostname()
	cpus := strconv.Itoa(runtime.NumCPU())
	fmt.Printf("\nhaven against native logical replication, PostgreSQL %s, %s CPUs, %d runs each (median [min..max])\n",
		pgVersion(b.pgbin), cpus, b.o.runs)
	fmt.Printf("%-44s %-28s %-28s %-8s %s\n", "figure", "haven", "native", "ratio", "target")
	for _, f := range b.figures {
		hm, hl, hh := stats(f.Haven)
		nm, nl, nh := stats(f.Native)
		ratio := "-"
		if len(f.Native) > 0 && nm != 0 {
			ratio = fmt.Sprintf("%.2f", hm/nm)
		}
		native := "-"
		if len(f.Native) > 0 {
			native = fmt.Sprintf("%s [%s..%s]", num(nm), num(nl), num(nh))
		}
		fmt.Printf("%-44s %-28s %-28s %-8s %s\n", f.Name+" ("+f.Unit+")", fmt.Sprintf("%s [%s..%s]", num(hm), num(hl), num(hh)), native, ratio, f.Target)
	}
	if err := os.MkdirAll(b.o.out, 0o755); err != nil {
		return err
	}
	data, err := json.MarshalIndent(map[string]any{"at": time.Now().UTC(), "host": host, "cpus": cpus, "postgres": pgVersion(b.pgbin),
		"runs": b.o.runs, "changes": b.o.changes, "figures": b.figures}, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(b.o.out, "replication-"+time.Now().UTC().Format("20060102T150405Z")+".json")
	if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Println("written to", path)
	return nil
}

func num(v float64) string {
	switch {
	case math.IsNaN(v):
		return "-"
	case v >= 1000:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	default:
		return strconv.FormatFloat(v, 'f', 3, 64)
	}
}

func pgVersion(bin string) string {
	out, err := exec.Command(filepath.Join(bin, "postgres"), "--version").Output()
	if err != nil {
		return "?"
	}
	// postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)
	if f := strings.Fields(string(out)); len(f) >= 3 {
		return f[2]
	}
	return strings.TrimSpace(string(out))
}

// pair is a primary and a DR cluster with the CRM schema, the primary
// seeded, and the DR side fed either natively or by haven.
type pair struct {
	b           *bench
	setup       string // "native" or "haven"
	primary, dr *pgtest.Cluster
	agent       *proc
	standby     *proc
	agentHTTP   string
	standbyHTTP string
	nextMarker  int
}

// settings are the reference workload's: durable, large buffers.
func settings(primary bool) map[string]string {
	s := map[string]string{"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on", "shared_buffers": "1GB",
		"max_wal_size": "8GB", "checkpoint_timeout": "15min", "max_connections": "50"}
	if primary {
		s["track_commit_timestamp"] = "on"
	}
	return s
}

func (b *bench) newPair(ctx context.Context, setup string) (*pair, error) {
	p := &pair{b: b, setup: setup}
	var err error
	logf := func(format string, args ...any) { fmt.Fprintf(b.log, format+"\n", args...) }
	if p.primary, err = pgtest.Start(ctx, pgtest.Options{Name: "bench-" + setup + "-primary", Settings: settings(true), Logf: logf}); err != nil {
		return nil, err
	}
	if p.dr, err = pgtest.Start(ctx, pgtest.Options{Name: "bench-" + setup + "-dr", Settings: settings(false), Logf: logf}); err != nil {
		p.close()
		return nil, err
	}
	for _, c := range []*pgtest.Cluster{p.primary, p.dr} {
		if err := c.CreateDatabase(ctx, database); err != nil {
			p.close()
			return nil, err
		}
		if err := b.psql(ctx, c.URL(database), "-f", filepath.Join(b.workload, "schema.sql")); err != nil {
			p.close()
			return nil, err
		}
		if err := sql(ctx, c.URL(database), `CREATE TABLE bench_marker (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())`); err != nil {
			p.close()
			return nil, err
		}
	}
	if err := b.psql(ctx, p.primary.URL(database), "-f", filepath.Join(b.workload, "seed.sql")); err != nil {
		p.close()
		return nil, err
	}
	switch setup {
	case "native":
		err = errors.Join(
			sql(ctx, p.primary.URL(database), `CREATE PUBLICATION bench FOR ALL TABLES`),
			sql(ctx, p.dr.URL(database), fmt.Sprintf(`CREATE SUBSCRIPTION bench CONNECTION 'host=127.0.0.1 port=%d dbname=%s user=postgres' PUBLICATION bench`,
				p.primary.Port(), database)))
	case "haven":
		// A stream left by an earlier pair would be read first.
		if err = b.deleteStream(ctx, wire.StreamName(group)); errors.Is(err, jetstream.ErrStreamNotFound) {
			err = nil
		}
		if err == nil {
			err = p.startAgent(ctx)
		}
		if err == nil {
			err = p.startStandby(ctx)
		}
	}
	if err != nil {
		p.close()
		return nil, err
	}
	// A marker can arrive before the initial copy of the other tables ends.
	copied := map[string]string{"native": `SELECT count(*) > 0 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel`,
		"haven": `SELECT coalesce(bool_and(snapshot_done), false) FROM haven.apply_position`}[setup]
	err = poll(ctx, 10*time.Minute, "the initial copy", func() (bool, error) {
		var ready bool
		err := queryRow(ctx, p.dr.URL(database), copied, &ready)
		return ready && err == nil, nil // haven's table appears with its standby
	})
	if err != nil {
		p.close()
		return nil, err
	}
	// The initial copy is done when a marker committed after it is on DR.
	if _, err := p.caughtUp(ctx, 10*time.Minute); err != nil {
		p.close()
		return nil, fmt.Errorf("%s: initial copy: %w", setup, err)
	}
	return p, nil
}

func (p *pair) close() {
	p.stopHaven()
	for _, c := range []*pgtest.Cluster{p.primary, p.dr} {
		if c != nil {
			_ = c.Destroy()
		}
	}
}

func (p *pair) stopHaven() {
	for _, r := range []**proc{&p.agent, &p.standby} {
		if *r != nil {
			p.b.recordRSS(*r)
			(*r).stop()
			*r = nil
		}
	}
}

func (p *pair) startAgent(ctx context.Context) error {
	var err error
	if p.agentHTTP, err = freeAddr(); err != nil {
		return err
	}
	p.agent, err = p.b.start(ctx, "agent", "agent", "--source-url", p.primary.URL(database), "--nats-url", p.b.nats.URL(), "--group", group,
		"--http-addr", p.agentHTTP)
	return err
}

func (p *pair) startStandby(ctx context.Context) error {
	var err error
	if p.standbyHTTP, err = freeAddr(); err != nil {
		return err
	}
	p.standby, err = p.b.start(ctx, "standby", "standby", "--target-url", p.dr.URL(database), "--nats-url", p.b.nats.URL(), "--group", group,
		"--http-addr", p.standbyHTTP)
	return err
}

// profileCPU writes a CPU profile of the process serving addr, taken over
// the next d, to name in -profile (nothing without -profile).
func (b *bench) profileCPU(addr, name string, d time.Duration) {
	if b.o.profile == "" {
		return
	}
	go func() {
		// The process needs a moment to listen.
		var resp *http.Response
		err := poll(context.Background(), 5*time.Second, "the profile endpoint", func() (bool, error) {
			r, err := http.Get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", addr, int(d.Seconds())))
			resp = r
			return err == nil, nil
		})
		if err != nil {
			fmt.Fprintln(b.log, "profile:", err)
			return
		}
		defer resp.Body.Close()
		if err := os.MkdirAll(b.o.profile, 0o755); err != nil {
			return
		}
		f, err := os.Create(filepath.Join(b.o.profile, name))
		if err != nil {
			return
		}
		defer f.Close()
		_, _ = io.Copy(f, resp.Body)
	}()
}

// profileNATS writes a CPU profile of the bench's own process, which runs
// the embedded NATS server, for d from now, to the -profile directory.
func (b *bench) profileNATS(name string, d time.Duration) {
	if b.o.profile == "" {
		return
	}
	if err := os.MkdirAll(b.o.profile, 0o755); err != nil {
		fmt.Fprintln(b.log, "profile:", err)
		return
	}
	f, err := os.Create(filepath.Join(b.o.profile, name))
	if err != nil {
		fmt.Fprintln(b.log, "profile:", err)
		return
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintln(b.log, "profile:", err)
		f.Close()
		return
	}
	time.AfterFunc(d, func() {
		pprof.StopCPUProfile()
		f.Close()
	})
}

// pauseDR stops the DR side from applying; resumeDR starts it again.
func (p *pair) pauseDR(ctx context.Context) error {
	if p.setup == "haven" {
		p.b.recordRSS(p.standby)
		p.standby.stop()
		p.standby = nil
		return nil
	}
	if err := sql(ctx, p.dr.URL(database), `ALTER SUBSCRIPTION bench DISABLE`); err != nil {
		return err
	}
	return poll(ctx, time.Minute, "the apply worker to stop", func() (bool, error) {
		var running bool
		err := queryRow(ctx, p.dr.URL(database), `SELECT EXISTS (SELECT 1 FROM pg_stat_subscription WHERE subname = 'bench' AND pid IS NOT NULL)`, &running)
		return !running, err
	})
}

func (p *pair) resumeDR(ctx context.Context) error {
	if p.setup == "haven" {
		return p.startStandby(ctx)
	}
	return sql(ctx, p.dr.URL(database), `ALTER SUBSCRIPTION bench ENABLE`)
}

// marker commits a marker row on the primary and returns its id, when it
// committed, and the WAL position after it.
func (p *pair) marker(ctx context.Context) (int, time.Time, string, error) {
	p.nextMarker++
	var at time.Time
	var lsn string
	err := queryRow(ctx, p.primary.URL(database), fmt.Sprintf(`WITH m AS (INSERT INTO bench_marker (id) VALUES (%d) RETURNING at)
		SELECT m.at, pg_current_wal_insert_lsn()::text FROM m`, p.nextMarker), &at, &lsn)
	return p.nextMarker, at, lsn, err
}

// caughtUp commits a marker and waits until DR has it; it returns when
// DR had it, polling every 20 ms.
func (p *pair) caughtUp(ctx context.Context, timeout time.Duration) (time.Time, error) {
	id, _, _, err := p.marker(ctx)
	if err != nil {
		return time.Time{}, err
	}
	return p.waitMarker(ctx, id, timeout)
}

func (p *pair) waitMarker(ctx context.Context, id int, timeout time.Duration) (time.Time, error) {
	conn, err := pgx.Connect(ctx, p.dr.URL(database))
	if err != nil {
		return time.Time{}, err
	}
	defer conn.Close(context.Background())
	var seen time.Time
	err = poll(ctx, timeout, fmt.Sprintf("marker %d on DR (%s)", id, p.setup), func() (bool, error) {
		var n int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM bench_marker WHERE id = $1`, id).Scan(&n); err != nil {
			return false, nil // the table may not be there yet
		}
		seen = time.Now()
		if p.standby != nil && p.standby.exited() {
			return false, fmt.Errorf("the standby exited: %s", p.standby.tail())
		}
		return n == 1, nil
	})
	return seen, err
}

// pgbench runs the CRM transaction; extra are pgbench's options.
func (b *bench) pgbench(ctx context.Context, c *pgtest.Cluster, extra ...string) (string, error) {
	args := append([]string{"-n", "-f", filepath.Join(b.workload, "crm.sql"), "-h", "127.0.0.1", "-p", strconv.Itoa(c.Port()), "-U", "postgres"}, extra...)
	args = append(args, database)
	cmd := exec.CommandContext(ctx, filepath.Join(b.pgbin, "pgbench"), args...)
	out, err := cmd.CombinedOutput()
	fmt.Fprintf(b.log, "pgbench %s:\n%s\n", strings.Join(extra, " "), out)
	if err != nil {
		return string(out), fmt.Errorf("pgbench: %v: %s", err, out)
	}
	return string(out), nil
}

// counts are the rows of the two tables the workload inserts into; the
// change between two counts gives the row changes it made.
type counts struct{ activities, contacts int64 }

func (p *pair) counts(ctx context.Context) (counts, error) {
	var c counts
	err := queryRow(ctx, p.primary.URL(database), `SELECT (SELECT count(*) FROM activities), (SELECT count(*) FROM contacts)`, &c.activities, &c.contacts)
	return c, err
}

// changesBetween: each transaction inserts one contact and two activities
// and updates a deal and a contact; 10% also delete an activity.
func changesBetween(before, after counts) int64 {
	txns := after.contacts - before.contacts
	deletes := before.activities + 2*txns - after.activities
	return 5*txns + deletes
}

// backlog runs the workload until about n row changes were made and
// returns how many were.
func (p *pair) backlog(ctx context.Context, n int) (int64, error) {
	before, err := p.counts(ctx)
	if err != nil {
		return 0, err
	}
	perClient := max(1, int(float64(n)/5.1/4))
	if _, err := p.b.pgbench(ctx, p.primary, "-c", "4", "-j", "2", "-t", strconv.Itoa(perClient)); err != nil {
		return 0, err
	}
	after, err := p.counts(ctx)
	if err != nil {
		return 0, err
	}
	return changesBetween(before, after), nil
}

func (b *bench) add(name, unit, target string, higher bool) *figure {
	f := &figure{Name: name, Unit: unit, Target: target, HigherIsBetter: higher}
	b.figures = append(b.figures, f)
	return f
}

// eachSetup runs measure on a fresh pair of each setup, runs times, the
// setups' runs taking turns: this machine's speed drifts by 10 to 20% over
// minutes (other tenants), which would otherwise fall on one setup's runs.
func (b *bench) eachSetup(ctx context.Context, measure func(ctx context.Context, p *pair) (float64, error), f *figure) error {
	var pairs []*pair
	defer func() {
		for _, p := range pairs {
			p.close()
		}
	}()
	for _, setup := range b.o.setups {
		p, err := b.newPair(ctx, setup)
		if err != nil {
			return err
		}
		pairs = append(pairs, p)
	}
	for i := range b.o.runs {
		for _, p := range pairs {
			v, err := measure(ctx, p)
			if err != nil {
				return fmt.Errorf("%s run %d: %w", p.setup, i+1, err)
			}
			fmt.Printf("  %-6s run %d: %s %s\n", p.setup, i+1, num(v), f.Unit)
			if p.setup == "haven" {
				f.Haven = append(f.Haven, v)
			} else {
				f.Native = append(f.Native, v)
			}
		}
	}
	return nil
}

// catchUp: a backlog built while DR was stopped, then the time until DR
// has it all.
func (b *bench) catchUp(ctx context.Context) error {
	f := b.add("DR catch-up", "changes/s", ">= 1.5x native", true)
	cost := b.add("DR catch-up: CPU of the whole machine", "ms per 1k changes", "(lower is lighter)", false)
	return b.eachSetup(ctx, func(ctx context.Context, p *pair) (float64, error) {
		if err := p.pauseDR(ctx); err != nil {
			return 0, err
		}
		n, err := p.backlog(ctx, b.o.changes)
		if err != nil {
			return 0, err
		}
		id, _, lsn, err := p.marker(ctx)
		if err != nil {
			return 0, err
		}
		if p.setup == "haven" {
			// All of it in the stream first: this measures DR, not capture.
			if err := p.waitCaptured(ctx, lsn); err != nil {
				return 0, err
			}
		}
		busy, err := machineCPU()
		if err != nil {
			return 0, err
		}
		started := time.Now()
		if err := p.resumeDR(ctx); err != nil {
			return 0, err
		}
		if p.setup == "haven" {
			b.profileCPU(p.standbyHTTP, "standby-catchup.pprof", 5*time.Second)
		}
		seen, err := p.waitMarker(ctx, id, 30*time.Minute)
		if err != nil {
			return 0, err
		}
		after, err := machineCPU()
		if err != nil {
			return 0, err
		}
		// With -profile, the profile's own cost is in it.
		ms := (after - busy).Seconds() * 1000 / float64(n) * 1000
		if p.setup == "haven" {
			cost.Haven = append(cost.Haven, ms)
		} else {
			cost.Native = append(cost.Native, ms)
		}
		return float64(n) / seen.Sub(started).Seconds(), nil
	}, f)
}

// machineCPU is the CPU time all processes have used since boot: the
// first line of /proc/stat without idle and iowait.
func machineCPU() (time.Duration, error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, fmt.Errorf("read CPU time: %w", err)
	}
	line, _, _ := strings.Cut(string(data), "\n")
	fields := strings.Fields(line)
	if len(fields) < 8 || fields[0] != "cpu" {
		return 0, fmt.Errorf("read CPU time: unexpected /proc/stat line %q", line)
	}
	var ticks int64
	for i, f := range fields[1:8] {
		v, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("read CPU time: %q: %w", line, err)
		}
		if i != 3 && i != 4 { // idle, iowait
			ticks += v
		}
	}
	return time.Duration(ticks) * time.Second / 100, nil // USER_HZ
}

// waitCaptured waits until the agent confirmed lsn (everything before it
// is acknowledged by JetStream).
func (p *pair) waitCaptured(ctx context.Context, lsn string) error {
	want, err := parseLSN(lsn)
	if err != nil {
		return err
	}
	return poll(ctx, 30*time.Minute, "the agent to capture the backlog", func() (bool, error) {
		v, err := metric(p.agentHTTP, "haven_agent_confirmed_lsn")
		if p.agent.exited() {
			return false, fmt.Errorf("the agent exited: %s", p.agent.tail())
		}
		return err == nil && uint64(v) >= want, nil
	})
}

// liveRun: the workload at full speed for -live; lag is the time from the
// end of the run to DR having a marker committed then.
func (b *bench) liveRun(ctx context.Context) error {
	lag := b.add("live: lag at the end of the run", "s", "<= 0.5", false)
	rate := b.add("live: primary's rate during the run", "changes/s", "(same workload)", true)
	return b.eachSetup(ctx, func(ctx context.Context, p *pair) (float64, error) {
		before, err := p.counts(ctx)
		if err != nil {
			return 0, err
		}
		if _, err := b.pgbench(ctx, p.primary, "-c", "4", "-j", "2", "-T", strconv.Itoa(int(b.o.live.Seconds()))); err != nil {
			return 0, err
		}
		id, at, _, err := p.marker(ctx)
		if err != nil {
			return 0, err
		}
		seen, err := p.waitMarker(ctx, id, 10*time.Minute)
		if err != nil {
			return 0, err
		}
		after, err := p.counts(ctx)
		if err != nil {
			return 0, err
		}
		r := float64(changesBetween(before, after)) / b.o.live.Seconds()
		if p.setup == "haven" {
			rate.Haven = append(rate.Haven, r)
		} else {
			rate.Native = append(rate.Native, r)
		}
		return seen.Sub(at).Seconds(), nil
	}, lag)
}

// latencyRun: the workload at a fixed rate; for every activity inserted,
// its commit timestamp on the primary against the time a row trigger on
// DR saw it.
func (b *bench) latencyRun(ctx context.Context) error {
	names := []string{"p50", "p95", "p99", "max"}
	targets := map[string]string{"p50": "<= 3", "p99": "<= 10"}
	figs := map[string]*figure{}
	for _, n := range names {
		figs[n] = b.add("latency "+n+" at "+strconv.Itoa(b.o.rate)+" txn/s", "ms", targets[n], false)
	}
	for _, setup := range b.o.setups {
		p, err := b.newPair(ctx, setup)
		if err != nil {
			return err
		}
		// haven keeps its DR database read-only by default.
		if err := sql(ctx, p.dr.URL(database), `BEGIN READ WRITE;
			CREATE TABLE bench_seen (id bigint PRIMARY KEY, seen timestamptz NOT NULL);
			CREATE FUNCTION bench_seen() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN INSERT INTO public.bench_seen VALUES (NEW.id, pg_catalog.clock_timestamp()) ON CONFLICT DO NOTHING; RETURN NULL; END $$;
			CREATE TRIGGER bench_seen AFTER INSERT ON activities FOR EACH ROW EXECUTE FUNCTION bench_seen();
			ALTER TABLE activities ENABLE ALWAYS TRIGGER bench_seen;
			COMMIT;`); err != nil {
			p.close()
			return err
		}
		for i := range b.o.runs {
			var from int64
			if err := queryRow(ctx, p.primary.URL(database), `SELECT max(id) FROM activities`, &from); err != nil {
				p.close()
				return err
			}
			if _, err := b.pgbench(ctx, p.primary, "-c", "4", "-j", "2", "-R", strconv.Itoa(b.o.rate), "-T", strconv.Itoa(int(b.o.latency.Seconds()))); err != nil {
				p.close()
				return err
			}
			if _, err := p.caughtUp(ctx, 10*time.Minute); err != nil {
				p.close()
				return err
			}
			lat, err := p.latencies(ctx, from)
			if err != nil {
				p.close()
				return err
			}
			fmt.Printf("  %-6s run %d: %d rows, p50 %.2f ms, p99 %.2f ms, max %.2f ms\n", setup, i+1, len(lat), pct(lat, 50), pct(lat, 99), pct(lat, 100))
			for _, n := range names {
				q := map[string]float64{"p50": 50, "p95": 95, "p99": 99, "max": 100}[n]
				if setup == "haven" {
					figs[n].Haven = append(figs[n].Haven, pct(lat, q))
				} else {
					figs[n].Native = append(figs[n].Native, pct(lat, q))
				}
			}
		}
		p.close()
	}
	return nil
}

// latencies are, in milliseconds, the time from commit on the primary to
// the DR trigger for every activity above from.
func (p *pair) latencies(ctx context.Context, from int64) ([]float64, error) {
	commits := map[int64]float64{}
	if err := rows(ctx, p.primary.URL(database), `SELECT id, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 FROM activities WHERE id > $1`,
		func(id int64, at float64) { commits[id] = at }, from); err != nil {
		return nil, err
	}
	var lat []float64
	csv, err := os.Create(filepath.Join(p.b.work, fmt.Sprintf("latency-%s-%d.csv", p.setup, from)))
	if err != nil {
		return nil, err
	}
	defer csv.Close()
	fmt.Fprintln(csv, "id,commit_epoch,latency_ms")
	if err := rows(ctx, p.dr.URL(database), `SELECT id, extract(epoch FROM seen)::float8 FROM bench_seen WHERE id > $1`,
		func(id int64, at float64) {
			if c, ok := commits[id]; ok {
				lat = append(lat, (at-c)*1000)
				fmt.Fprintf(csv, "%d,%.6f,%.3f\n", id, c, (at-c)*1000)
			}
		}, from); err != nil {
		return nil, err
	}
	if len(lat) == 0 {
		return nil, errors.New("no activity of the run reached the DR trigger")
	}
	if len(lat) < len(commits)*99/100 {
		return nil, fmt.Errorf("only %d of %d activities of the run reached the DR trigger", len(lat), len(commits))
	}
	slices.Sort(lat)
	if lat[0] < 0 {
		return nil, fmt.Errorf("a row was seen on DR %.1f ms before its commit on the primary: the measurement is wrong", -lat[0])
	}
	return lat, nil
}

func pct(sorted []float64, q float64) float64 {
	i := int(math.Ceil(q/100*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// capture: the agent alone reading a backlog its slot retained, into
// JetStream, against pg_recvlogical decoding the same WAL with pgoutput
// into /dev/null.
func (b *bench) capture(ctx context.Context) error {
	agentRate := b.add("capture: agent into JetStream", "changes/s", ">= 0.8x raw decode", true)
	raw := b.add("capture: raw pgoutput decode (pg_recvlogical)", "changes/s", "(reference)", true)
	p, err := b.newPair(ctx, "haven")
	if err != nil {
		return err
	}
	defer p.close()
	for i := range b.o.runs {
		if err := p.pauseDR(ctx); err != nil {
			return err
		}
		p.b.recordRSS(p.agent)
		p.agent.stop()
		p.agent = nil
		slot := "bench_raw"
		if err := sql(ctx, p.primary.URL(database), `SELECT pg_create_logical_replication_slot('bench_raw', 'pgoutput')`); err != nil {
			return err
		}
		n, err := p.backlog(ctx, b.o.changes)
		if err != nil {
			return err
		}
		_, _, lsn, err := p.marker(ctx)
		if err != nil {
			return err
		}
		started := time.Now()
		cmd := exec.CommandContext(ctx, filepath.Join(b.pgbin, "pg_recvlogical"), "-d", p.primary.URL(database), "--slot", slot, "--start",
			"-o", "proto_version=1", "-o", "publication_names="+wire.PublicationName(group), "-E", lsn, "-f", "/dev/null")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("pg_recvlogical: %v: %s", err, out)
		}
		rawRate := float64(n) / time.Since(started).Seconds()
		if err := sql(ctx, p.primary.URL(database), `SELECT pg_drop_replication_slot('bench_raw')`); err != nil {
			return err
		}
		started = time.Now()
		if err := p.startAgent(ctx); err != nil {
			return err
		}
		b.profileCPU(p.agentHTTP, "agent-capture.pprof", 5*time.Second)
		if err := p.waitCaptured(ctx, lsn); err != nil {
			return err
		}
		r := float64(n) / time.Since(started).Seconds()
		fmt.Printf("  run %d: %d changes, agent %s changes/s, raw decode %s changes/s (%.2f)\n", i+1, n, num(r), num(rawRate), r/rawRate)
		agentRate.Haven = append(agentRate.Haven, r)
		raw.Haven = append(raw.Haven, rawRate)
		if err := p.resumeDR(ctx); err != nil {
			return err
		}
		if _, err := p.caughtUp(ctx, 30*time.Minute); err != nil {
			return err
		}
	}
	return nil
}

// snapshot: the initial copy of a database of -snapshot-mb, by haven (a
// new group and stream) and by pg_dump | psql, into an empty database.
func (b *bench) snapshot(ctx context.Context) error {
	f := b.add(fmt.Sprintf("snapshot of a %d MB database", b.o.snapshotMB), "MB/s", ">= pg_dump | psql", true)
	cost := b.add("snapshot: CPU of the whole machine", "CPU-seconds per GB", "(lower is lighter)", false)
	stored := b.add("snapshot: stream size over database size", "ratio", "(rows compress with s2)", false)
	// cpuPerGB is what the whole machine spent since busy, per GB of the
	// source database.
	cpuPerGB := func(busy time.Duration, size int64) (float64, error) {
		after, err := machineCPU()
		return (after - busy).Seconds() / (float64(size) / (1 << 30)), err
	}
	logf := func(format string, args ...any) { fmt.Fprintf(b.log, format+"\n", args...) }
	src, err := pgtest.Start(ctx, pgtest.Options{Name: "bench-src", Settings: settings(true), Logf: logf})
	if err != nil {
		return err
	}
	defer src.Destroy()
	dst, err := pgtest.Start(ctx, pgtest.Options{Name: "bench-dst", Settings: settings(false), Logf: logf})
	if err != nil {
		return err
	}
	defer dst.Destroy()
	if err := src.CreateDatabase(ctx, database); err != nil {
		return err
	}
	if err := b.psql(ctx, src.URL(database), "-f", filepath.Join(b.workload, "schema.sql")); err != nil {
		return err
	}
	if err := b.psql(ctx, src.URL(database), "-f", filepath.Join(b.workload, "seed.sql")); err != nil {
		return err
	}
	// Grow activities (about 330 bytes a row) to the size asked.
	var size int64
	for {
		if err := queryRow(ctx, src.URL(database), `SELECT pg_database_size(current_database())`, &size); err != nil {
			return err
		}
		if size >= int64(b.o.snapshotMB)<<20 {
			break
		}
		rowsNeeded := min(max((int64(b.o.snapshotMB)<<20-size)/330, 1000), 1_000_000)
		if err := sql(ctx, src.URL(database), fmt.Sprintf(`INSERT INTO activities (contact_id, kind, body)
			SELECT 1 + g %% 50000, 'note', 'grown ' || repeat(md5(g::text), 9) FROM generate_series(1, %d) g`, rowsNeeded)); err != nil {
			return err
		}
	}
	if err := sql(ctx, src.URL(database), `VACUUM ANALYZE`); err != nil {
		return err
	}
	mb := float64(size) / (1 << 20)
	fmt.Printf("  source database: %.0f MB\n", mb)
	for i := range b.o.runs {
		target := fmt.Sprintf("native%d", i)
		if err := dst.CreateDatabase(ctx, target); err != nil {
			return err
		}
		if err := settle(ctx, dst); err != nil {
			return err
		}
		busy, err := machineCPU()
		if err != nil {
			return err
		}
		started := time.Now()
		dump := fmt.Sprintf("%s -h 127.0.0.1 -p %d -U postgres %s | %s -q -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p %d -U postgres %s",
			filepath.Join(b.pgbin, "pg_dump"), src.Port(), database, filepath.Join(b.pgbin, "psql"), dst.Port(), target)
		if out, err := exec.CommandContext(ctx, "bash", "-o", "pipefail", "-c", dump).CombinedOutput(); err != nil {
			return fmt.Errorf("pg_dump | psql: %v: %s", err, out)
		}
		native := mb / time.Since(started).Seconds()
		nativeCPU, err := cpuPerGB(busy, size)
		if err != nil {
			return err
		}

		grp := fmt.Sprintf("snap%d", i)
		target = "haven" + strconv.Itoa(i)
		if err := dst.CreateDatabase(ctx, target); err != nil {
			return err
		}
		agentHTTP, err := freeAddr()
		if err != nil {
			return err
		}
		standbyHTTP, err := freeAddr()
		if err != nil {
			return err
		}
		if err := settle(ctx, dst); err != nil {
			return err
		}
		if busy, err = machineCPU(); err != nil {
			return err
		}
		started = time.Now()
		capture, err := b.start(ctx, "agent", "agent", "--source-url", src.URL(database), "--nats-url", b.nats.URL(), "--group", grp,
			"--http-addr", agentHTTP)
		if err != nil {
			return err
		}
		standby, err := b.start(ctx, "standby", "standby", "--target-url", dst.URL(target), "--nats-url", b.nats.URL(), "--group", grp,
			"--http-addr", standbyHTTP)
		if err != nil {
			capture.stop()
			return err
		}
		if i == 0 {
			b.profileCPU(agentHTTP, "agent-snapshot.pprof", 4*time.Second)
			b.profileCPU(standbyHTTP, "standby-snapshot.pprof", 6*time.Second)
			b.profileNATS("nats-snapshot.pprof", 6*time.Second)
		}
		// One connection polls: a new one every 20 ms would cost DR a
		// backend's start each time, CPU that the copy measured needs.
		watch, err := pgx.Connect(ctx, dst.URL(target))
		if err != nil {
			capture.stop()
			standby.stop()
			return err
		}
		err = poll(ctx, time.Hour, "the snapshot on DR", func() (bool, error) {
			var done bool
			// Fails until the standby has created haven.apply_position.
			_ = watch.QueryRow(ctx, `SELECT coalesce(bool_and(snapshot_done), false) FROM haven.apply_position`).Scan(&done)
			if standby.exited() || capture.exited() {
				return false, fmt.Errorf("haven exited: %s %s", capture.tail(), standby.tail())
			}
			return done, nil
		})
		took := time.Since(started)
		havenCPU, cpuErr := cpuPerGB(busy, size)
		_ = watch.Close(context.Background())
		b.recordRSS(capture)
		b.recordRSS(standby)
		capture.stop()
		standby.stop()
		if err = errors.Join(err, cpuErr); err != nil {
			return err
		}
		streamBytes, err := b.streamBytes(ctx, wire.StreamName(grp))
		if err != nil {
			return err
		}
		if err := errors.Join(sql(ctx, src.URL(database), fmt.Sprintf(`SELECT pg_drop_replication_slot('%s')`, wire.SlotName(grp))),
			b.deleteStream(ctx, wire.StreamName(grp))); err != nil {
			return err
		}
		stored.Haven = append(stored.Haven, float64(streamBytes)/float64(size))
		h := mb / took.Seconds()
		fmt.Printf("  run %d: haven %.1f MB/s, pg_dump | psql %.1f MB/s\n", i+1, h, native)
		f.Haven = append(f.Haven, h)
		f.Native = append(f.Native, native)
		cost.Haven = append(cost.Haven, havenCPU)
		cost.Native = append(cost.Native, nativeCPU)
	}
	return nil
}

// settle starts a copy with no dirty buffers or pages left by what ran
// before (building the source, the other setup's copy), which it would
// otherwise have to write out, or be throttled by the kernel for.
func settle(ctx context.Context, dst *pgtest.Cluster) error {
	if err := sql(ctx, dst.URL("postgres"), `CHECKPOINT`); err != nil {
		return err
	}
	syscall.Sync()
	return nil
}

// proc is a haven process.
type proc struct {
	role string
	cmd  *exec.Cmd
	logf string
	done chan struct{}
}

func (b *bench) start(ctx context.Context, role string, args ...string) (*proc, error) {
	logPath := filepath.Join(b.work, fmt.Sprintf("%s-%d.log", role, time.Now().UnixNano()))
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(b.bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, err
	}
	p := &proc{role: role, cmd: cmd, logf: logPath, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); f.Close(); close(p.done) }()
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *proc) tail() string {
	data, _ := os.ReadFile(p.logf)
	if len(data) > 2000 {
		data = data[len(data)-2000:]
	}
	return string(data)
}

// recordRSS keeps the process's peak resident set (VmHWM).
func (b *bench) recordRSS(p *proc) {
	if p == nil || p.exited() {
		return
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if kb, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			v, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(kb), " kB"), 64)
			b.peakRSS[p.role] = max(b.peakRSS[p.role], v/1024)
		}
	}
}

func (b *bench) deleteStream(ctx context.Context, name string) error {
	return b.jetStream(func(js jetstream.JetStream) error { return js.DeleteStream(ctx, name) })
}

// streamBytes is what a stream stores.
func (b *bench) streamBytes(ctx context.Context, name string) (n uint64, err error) {
	err = b.jetStream(func(js jetstream.JetStream) error {
		s, err := js.Stream(ctx, name)
		if err == nil {
			n = s.CachedInfo().State.Bytes
		}
		return err
	})
	return n, err
}

func (b *bench) jetStream(do func(js jetstream.JetStream) error) error {
	nc, err := nats.Connect(b.nats.URL())
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	return do(js)
}

func (b *bench) psql(ctx context.Context, url string, args ...string) error {
	cmd := exec.CommandContext(ctx, filepath.Join(b.pgbin, "psql"), append([]string{"-q", "-X", "-v", "ON_ERROR_STOP=1", "-d", url}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("psql %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

func sql(ctx context.Context, url, statement string) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, statement)
	return err
}

func queryRow(ctx context.Context, url, query string, dest ...any) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	return conn.QueryRow(ctx, query).Scan(dest...)
}

func rows(ctx context.Context, url, query string, each func(int64, float64), args ...any) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	r, err := conn.Query(ctx, query, args...)
	if err != nil {
		return err
	}
	defer r.Close()
	for r.Next() {
		var id int64
		var v float64
		if err := r.Scan(&id, &v); err != nil {
			return err
		}
		each(id, v)
	}
	return r.Err()
}

func poll(ctx context.Context, timeout time.Duration, what string, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: still waiting after %s", what, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// plain asks for uncompressed metrics: gzip would cost the process measured
// a share of its CPU at every poll.
var plain = &http.Client{Transport: &http.Transport{DisableCompression: true}, Timeout: 5 * time.Second}

// metric reads one unlabelled-by-us gauge from a /metrics endpoint.
func metric(addr, name string) (float64, error) {
	resp, err := plain.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(line, name+"{") || strings.HasPrefix(line, name+" ") {
			f := strings.Fields(line)
			return strconv.ParseFloat(f[len(f)-1], 64)
		}
	}
	return 0, fmt.Errorf("no %s in the metrics", name)
}

func parseLSN(s string) (uint64, error) {
	hi, lo, ok := strings.Cut(s, "/")
	if !ok {
		return 0, fmt.Errorf("bad LSN %q", s)
	}
	h, err1 := strconv.ParseUint(hi, 16, 32)
	l, err2 := strconv.ParseUint(lo, 16, 32)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("bad LSN %q: %w", s, err)
	}
	return h<<32 | l, nil
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}
