package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/haven-dr/haven/internal/natstest"
	"github.com/haven-dr/haven/internal/pgtest"
)

// havenBin is the haven binary built once for the package's tests.
var havenBin string

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "haven-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	havenBin = filepath.Join(dir, "haven")
	build := exec.Command("go", "build", "-o", havenBin, "github.com/haven-dr/haven/cmd/haven")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build haven:", err)
		return 1
	}
	return m.Run()
}

// site is one replication setup: a primary, a DR cluster and NATS.
type site struct {
	t       *testing.T
	primary *pgtest.Cluster
	dr      *pgtest.Cluster
	nats    *natstest.Server
	db      string
	group   string
}

func newSite(t *testing.T) *site { return newSiteWith(t, nil) }

// newSiteWith starts a site whose primary has extra postgresql.conf settings.
func newSiteWith(t *testing.T, primarySettings map[string]string) *site {
	t.Helper()
	s := &site{t: t, db: "crm", group: "crm"}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		s.primary = pgtest.NewWith(t, pgtest.Options{Name: "primary", Settings: primarySettings})
	}()
	go func() { defer wg.Done(); s.dr = pgtest.NewWith(t, pgtest.Options{Name: "dr"}) }()
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	s.nats = natstest.New(t)
	ctx := t.Context()
	for _, c := range []*pgtest.Cluster{s.primary, s.dr} {
		if err := c.CreateDatabase(ctx, s.db); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

func (s *site) primaryURL() string { return s.primary.URL(s.db) }
func (s *site) drURL() string      { return s.dr.URL(s.db) }

// drWriteURL connects to DR as a session that may write there (the standby
// makes the DR database read-only by default), to change it behind haven's
// back or as after a failover.
func (s *site) drWriteURL() string { return s.drURL() + "&default_transaction_read_only=off" }

func (s *site) agentArgs(extra ...string) []string {
	return append([]string{"agent", "--source-url", s.primaryURL(), "--nats-url", s.nats.URL(), "--group", s.group,
		"--heartbeat-interval", "500ms"}, extra...)
}

func (s *site) standbyArgs(extra ...string) []string {
	return append([]string{"standby", "--target-url", s.drURL(), "--nats-url", s.nats.URL(), "--group", s.group,
		"--blocked-retry", "1s"}, extra...)
}

// proc is a running haven process whose output goes to a file that is
// copied to the test log when the test ends.
type proc struct {
	t    *testing.T
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

func startHaven(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	logFile, err := os.CreateTemp(t.TempDir(), name+"-*.log")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(havenBin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	p := &proc{t: t, name: name, cmd: cmd, log: logFile.Name(), done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() || testing.Verbose() {
			out, _ := os.ReadFile(p.log)
			t.Logf("--- %s log ---\n%s", name, tail(string(out), 60))
		}
	})
	return p
}

func tail(s string, lines int) string {
	parts := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

// kill sends SIGKILL and waits for the process to be gone.
func (p *proc) kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// exited reports whether the process has ended.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM (a graceful shutdown) and waits.
func (p *proc) stop() {
	if p.exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		p.t.Errorf("%s did not stop within 20s of SIGTERM", p.name)
		p.kill()
	}
}

func (p *proc) output() string {
	out, _ := os.ReadFile(p.log)
	return string(out)
}

// peakRSS is the process's high-water resident set size, in bytes.
func (p *proc) peakRSS() int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return -1
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb * 1024
		}
	}
	return -1
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var lastErr error
	for {
		ok, err := cond()
		if ok {
			return
		}
		lastErr = err
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s (last error: %v)", timeout, what, lastErr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// heldBackCommit runs sql, in one transaction, on a primary whose
// synchronous standby answers late: the commit record is flushed, so the
// agent decodes it, while the transaction is not yet visible to anyone (as
// with a real synchronous standby, for the round trip's length). Other
// sessions commit locally meanwhile. The standby answers once decoded
// reports that the agent has the commit.
func heldBackCommit(t *testing.T, url, sql string, decoded func() bool) {
	t.Helper()
	admin := connect(t, url)
	mustExec(t, admin, `ALTER SYSTEM SET synchronous_commit = local`)
	var reloaded time.Time
	if err := admin.QueryRow(t.Context(), `SELECT clock_timestamp() FROM pg_reload_conf()`).Scan(&reloaded); err != nil {
		t.Fatal(err)
	}
	// A session takes the new default at its next statement: once none runs
	// one begun before, no commit can wait for the standby but this one.
	waitFor(t, 30*time.Second, "the sessions to take synchronous_commit = local", func() (bool, error) {
		var before int
		err := admin.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'
			AND pid <> pg_backend_pid() AND state = 'active' AND query_start < $1`, reloaded).Scan(&before)
		return before == 0, err
	})
	mustExec(t, admin, `ALTER SYSTEM SET synchronous_standby_names = 'late'`)
	mustExec(t, admin, `SELECT pg_reload_conf()`)
	waitingForStandby := func(conn *pgx.Conn) (pid int, waiting func() (bool, error)) {
		if err := conn.QueryRow(t.Context(), `SELECT pg_backend_pid()`).Scan(&pid); err != nil {
			t.Fatal(err)
		}
		return pid, func() (bool, error) {
			var yes bool
			err := admin.QueryRow(t.Context(), `SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'SyncRep')`, pid).Scan(&yes)
			return yes, err
		}
	}
	// Commits wait for the standby once the checkpointer has reloaded the
	// setting: probe commits until one waits, then cancel its wait.
	probe := connect(t, url)
	probePID, probeWaiting := waitingForStandby(probe)
	stop, probed := make(chan struct{}), make(chan struct{})
	var halt sync.Once
	var probeErr atomic.Pointer[error]
	// Should the wait fail, the probe stops before its connection closes.
	t.Cleanup(func() { halt.Do(func() { close(stop) }); <-probed })
	go func() {
		defer close(probed)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := probe.Exec(t.Context(), `SET synchronous_commit = on; SELECT txid_current()`); err != nil {
				probeErr.Store(&err)
				return
			}
		}
	}()
	waitFor(t, 30*time.Second, "a probe commit to wait for the synchronous standby", func() (bool, error) {
		if err := probeErr.Load(); err != nil {
			t.Fatalf("the probe's commit failed: %v", *err)
		}
		if yes, err := probeWaiting(); yes || err != nil {
			return yes, err
		}
		// Why not, should this time out.
		var state, waitEvent, names string
		err := admin.QueryRow(t.Context(), `SELECT coalesce(state, ''), coalesce(wait_event_type || '/' || wait_event, 'on CPU'), current_setting('synchronous_standby_names')
			FROM pg_stat_activity WHERE pid = $1`, probePID).Scan(&state, &waitEvent, &names)
		if err == nil {
			err = fmt.Errorf("the probe is %s, %s; synchronous_standby_names is %q", state, waitEvent, names)
		}
		return false, err
	})
	halt.Do(func() { close(stop) })
	mustExec(t, admin, `SELECT pg_cancel_backend($1)`, probePID)
	<-probed
	conn := connect(t, url)
	_, waiting := waitingForStandby(conn)
	done := make(chan error, 1)
	go func() {
		_, err := conn.Exec(t.Context(), "SET synchronous_commit = on; "+sql)
		done <- err
	}()
	waitFor(t, 30*time.Second, "the commit to wait for the synchronous standby", waiting)
	waitFor(t, 30*time.Second, "the agent to decode the held-back commit", func() (bool, error) { return decoded(), nil })
	mustExec(t, admin, `ALTER SYSTEM RESET synchronous_standby_names`)
	mustExec(t, admin, `ALTER SYSTEM RESET synchronous_commit`)
	mustExec(t, admin, `SELECT pg_reload_conf()`)
	if err := <-done; err != nil {
		t.Fatalf("%s: %v", firstLine(sql), err)
	}
}

func connect(t *testing.T, url string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func mustExec(t *testing.T, conn *pgx.Conn, sql string, args ...any) {
	t.Helper()
	if _, err := conn.Exec(t.Context(), sql, args...); err != nil {
		t.Fatalf("%s: %v", firstLine(sql), err)
	}
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i] + " …"
	}
	return s
}

// tableDigest is a table's content in primary-key order, reduced to a count
// and an md5 over every row's text form; equal digests on both sides mean
// equal tables.
func tableDigest(ctx context.Context, conn *pgx.Conn, table, orderBy string) (string, error) {
	var count int64
	var digest *string
	err := conn.QueryRow(ctx, fmt.Sprintf(`SELECT count(*), md5(string_agg(t::text, E'\n' ORDER BY %s)) FROM %s t`, orderBy, table)).Scan(&count, &digest)
	if err != nil {
		return "", fmt.Errorf("digest %s: %w", table, err)
	}
	d := ""
	if digest != nil {
		d = *digest
	}
	return fmt.Sprintf("%d rows, md5 %s", count, d), nil
}

// markerSeen reports whether the DR side has the marker row the test wrote
// last on the primary: everything committed before it has been applied.
func markerSeen(ctx context.Context, dr *pgx.Conn, id int64) (bool, error) {
	var n int
	err := dr.QueryRow(ctx, `SELECT count(*) FROM marker WHERE id = $1`, id).Scan(&n)
	return n == 1, err
}

// assertEqual compares tables row by row (by digest) on both sides.
func assertEqual(t *testing.T, primary, dr *pgx.Conn, tables map[string]string) {
	t.Helper()
	for table, orderBy := range tables {
		want, err := tableDigest(t.Context(), primary, table, orderBy)
		if err != nil {
			t.Fatal(err)
		}
		got, err := tableDigest(t.Context(), dr, table, orderBy)
		if err != nil {
			t.Fatal(err)
		}
		if want != got {
			t.Errorf("table %s differs: primary %s, DR %s", table, want, got)
		} else {
			t.Logf("table %s equal: %s", table, want)
		}
	}
}

// metricsPage reads the /metrics page of a haven process at url.
func metricsPage(url string) (string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return string(body), err
}
