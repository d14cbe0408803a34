package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// quorum is three controller nodes on loopback.
type quorum struct {
	apis    []string
	procs   []*proc
	args    [][]string // each node's command line, to restart it
	metrics []string   // each node's /metrics URL
}

// without is the quorum's other nodes, to ask while node i is down.
func (q *quorum) without(i int) *quorum {
	return &quorum{apis: slices.Delete(slices.Clone(q.apis), i, i+1)}
}

func leaderIndex(t *testing.T, q *quorum) int {
	t.Helper()
	st, err := q.status(t)
	if err != nil {
		t.Fatal(err)
	}
	for i := range q.procs {
		if fmt.Sprintf("c%d", i+1) == st.LeaderID {
			return i
		}
	}
	t.Fatalf("no leader in %+v", st)
	return -1
}

// restart starts node i again, with its state, after it was killed.
func (q *quorum) restart(t *testing.T, i int) {
	t.Helper()
	q.procs[i] = startHaven(t, fmt.Sprintf("controller-c%d-again", i+1), q.args[i]...)
}

// freePort returns a loopback port free now for a process to bind, taken
// from just below the kernel's ephemeral range: a port the kernel hands
// out meanwhile (to a listener on port 0, such as a cut proxy, or to an
// outgoing connection) cannot be it. No port is handed out twice.
func freePort(t *testing.T) int {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	low := 32768 // Linux's default first ephemeral port
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			fmt.Sscan(f[0], &low)
		}
	}
	from := max(1024, low-12000)
	if low < from+1000 { // an ephemeral range from (almost) the start: no room below it
		from, low = 1024, 65535
	}
	for range 1000 {
		port := from + rand.IntN(low-from)
		if portsGiven[port] {
			continue
		}
		if ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			ln.Close()
			portsGiven[port] = true
			return port
		}
	}
	t.Fatalf("no free loopback port between %d and %d", from, low)
	return 0
}

var (
	portsMu    sync.Mutex
	portsGiven = map[int]bool{}
)

func startQuorum(t *testing.T, n int, extra ...string) *quorum {
	t.Helper()
	return startQuorumWith(t, n, func(int) []string { return extra })
}

// startQuorumWith starts n controller nodes, node i with extra(i) flags.
func startQuorumWith(t *testing.T, n int, extra func(i int) []string) *quorum {
	t.Helper()
	q := &quorum{}
	var peers, raftAddrs, apiAddrs []string
	for i := range n {
		raftAddrs = append(raftAddrs, fmt.Sprintf("127.0.0.1:%d", freePort(t)))
		apiAddrs = append(apiAddrs, fmt.Sprintf("127.0.0.1:%d", freePort(t)))
		peers = append(peers, fmt.Sprintf("c%d=%s", i+1, raftAddrs[i]))
	}
	for i := range n {
		httpAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		q.metrics = append(q.metrics, "http://"+httpAddr+"/metrics")
		args := append([]string{"controller", "--id", fmt.Sprintf("c%d", i+1), "--raft-addr", raftAddrs[i], "--api-addr", apiAddrs[i],
			"--data-dir", t.TempDir(), "--peers", strings.Join(peers, ","), "--http-addr", httpAddr}, extra(i)...)
		q.procs = append(q.procs, startHaven(t, fmt.Sprintf("controller-c%d", i+1), args...))
		q.args = append(q.args, args)
		q.apis = append(q.apis, "http://"+apiAddrs[i])
	}
	return q
}

// ctl runs haven ctl against the quorum.
func (q *quorum) ctl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(havenBin, append(append([]string{"ctl", "--api", strings.Join(q.apis, ",")}, args...), "--timeout", "20s")...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

type ctlStatus struct {
	LeaderID     string    `json:"leaderId"`
	RulesVersion int       `json:"rulesVersion"`
	Nodes        []ctlNode `json:"nodes"`
	Audit        []struct {
		Action  string `json:"action"`
		Actor   string `json:"actor"`
		Outcome string `json:"outcome"`
	} `json:"audit"`
	Groups []struct {
		Name        string  `json:"name"`
		PrimarySite string  `json:"primarySite"`
		DRSite      string  `json:"drSite"`
		Epoch       string  `json:"epoch"`
		State       string  `json:"state"`
		LagSeconds  float64 `json:"lagSeconds"`
		LeaseMs     string  `json:"leaseExpiresUnixMs"`
		// Former primaries not rejoined yet, and a rejoin under way.
		DeposedSites []string `json:"deposedSites"`
		Rejoin       string   `json:"rejoin"`
		Alert        string   `json:"alert"`
		DRIncomplete string   `json:"drIncomplete"`
	} `json:"groups"`
}

type ctlNode struct {
	ID           string `json:"id"`
	Voter        bool   `json:"voter"`
	RulesVersion int    `json:"rulesVersion"`
}

// holdsPrimary checks, over d and every quarter second, that the quorum
// keeps site at the given epoch as the group's primary: nothing fails over.
func (q *quorum) holdsPrimary(t *testing.T, site, epoch string, d time.Duration) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
		st, err := q.status(t)
		if err != nil || len(st.Groups) != 1 || st.Groups[0].PrimarySite != site || st.Groups[0].Epoch != epoch {
			t.Fatalf("the quorum says %+v (%v); want site %s primary at epoch %s throughout", st, err, site, epoch)
		}
	}
}

func (q *quorum) status(t *testing.T) (ctlStatus, error) {
	out, err := q.ctl(t, "status", "--json")
	if err != nil {
		return ctlStatus{}, fmt.Errorf("haven ctl status: %v: %s", err, out)
	}
	var st ctlStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return ctlStatus{}, fmt.Errorf("haven ctl status --json: %v: %s", err, out)
	}
	return st, nil
}

// failoverSite is a site with three controllers, the agent at site a and
// the standby at site b, caught up, and clients writing through a
// multi-host connection string that records every acknowledged write.
type failoverSite struct {
	*site
	q         *quorum
	agent     *proc
	standby   *proc
	primary   *pgx.Conn
	dr        *pgx.Conn
	multiHost string
	acked     *ackedWrites
	load      []*workload
}

// ackedWrites are ids whose INSERT the client saw committed.
type ackedWrites struct {
	next atomic.Int64
	mu   sync.Mutex
	ids  []int64
}

// onceEach checks that every acknowledged write is in acked on conn, once.
func (a *ackedWrites) onceEach(t *testing.T, conn *pgx.Conn) {
	t.Helper()
	var present, distinct int
	if err := conn.QueryRow(t.Context(), `SELECT count(*), count(DISTINCT id) FROM acked WHERE id = ANY($1)`, a.ids).Scan(&present, &distinct); err != nil {
		t.Fatal(err)
	}
	if present != len(a.ids) || distinct != present {
		t.Errorf("%d acknowledged writes, %d on the final primary (%d distinct): lost or duplicated", len(a.ids), present, distinct)
	} else {
		t.Logf("all %d acknowledged writes are on the final primary, once each", present)
	}
}

func startFailoverSite(t *testing.T, agentArgs ...string) *failoverSite {
	f := &failoverSite{site: newSite(t), acked: &ackedWrites{}}
	s := f.site
	f.primary = connect(t, s.primaryURL())
	seedCRM(t, f.primary, 50)
	mustExec(t, f.primary, `CREATE TABLE acked (id bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())`)
	f.q = startQuorum(t, 3)
	controllers := strings.Join(f.q.apis, ",")
	f.agent = startHaven(t, "agent", s.agentArgs(append([]string{"--controllers", controllers, "--site", "a"}, agentArgs...)...)...)
	f.standby = startHaven(t, "standby", s.standbyArgs("--controllers", controllers, "--site", "b",
		"--promote-hook", "echo promoted $HAVEN_GROUP at epoch $HAVEN_EPOCH")...)
	f.dr = connect(t, s.drURL())
	waitCaughtUp(t, f.primary, f.dr, 1, 60*time.Second)
	waitFor(t, 30*time.Second, "the quorum to know both sites, and that DR is complete", func() (bool, error) {
		st, err := f.q.status(t)
		return err == nil && len(st.Groups) == 1 && st.Groups[0].DRSite == "b" && st.Groups[0].LeaseMs != "" && st.Groups[0].DRIncomplete == "", nil
	})
	// Clients use both hosts; only a read-write one takes their writes.
	f.multiHost = fmt.Sprintf("postgres://postgres@127.0.0.1:%d,127.0.0.1:%d/%s?target_session_attrs=read-write&connect_timeout=1",
		s.primary.Port(), s.dr.Port(), s.db)
	return f
}

// startWriting starts the CRM workload and two clients inserting into
// acked through the multi-host connection string.
func (f *failoverSite) startWriting(t *testing.T) {
	f.load = append(f.load, startWorkload(t, f.primaryURL(), 2, 50))
	f.load = append(f.load, startLoad(t, f.multiHost, 2, func(ctx context.Context, conn *pgx.Conn, _ *rand.Rand) error {
		id := f.acked.next.Add(1)
		if _, err := conn.Exec(ctx, `INSERT INTO acked (id) VALUES ($1)`, id); err != nil {
			return err
		}
		f.acked.mu.Lock()
		f.acked.ids = append(f.acked.ids, id)
		f.acked.mu.Unlock()
		return nil
	}))
	waitFor(t, 30*time.Second, "writes through the multi-host connection", func() (bool, error) { return f.acked.next.Load() > 200, nil })
}

// killPrimary SIGKILLs the primary's postmaster and returns the time until
// the first write is accepted through the multi-host connection string,
// and the writes acknowledged before the kill.
func (f *failoverSite) killPrimary(t *testing.T) (time.Duration, []int64) {
	killed := time.Now()
	if err := f.site.primary.Kill(); err != nil {
		t.Fatal(err)
	}
	for _, w := range f.load {
		w.abandon()
	}
	f.acked.mu.Lock()
	acked := slices.Clone(f.acked.ids)
	f.acked.mu.Unlock()
	var rto time.Duration
	waitFor(t, 30*time.Second, "a write accepted through the multi-host connection string", func() (bool, error) {
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, f.multiHost)
		if err != nil {
			return false, nil
		}
		defer conn.Close(context.Background())
		if _, err := conn.Exec(ctx, `INSERT INTO acked (id) VALUES (-1)`); err != nil {
			return false, nil
		}
		rto = time.Since(killed)
		return true, nil
	})
	t.Logf("RTO: %s from SIGKILL of the primary to the first write accepted on the promoted DR database", rto.Round(time.Millisecond))
	if rto > 10*time.Second {
		t.Errorf("RTO %s, want within 10 s with the defaults", rto)
	}
	return rto, acked
}

// missing counts the acknowledged writes the promoted database lacks.
func (f *failoverSite) missing(t *testing.T, acked []int64) int {
	var present int
	if err := f.dr.QueryRow(t.Context(), `SELECT count(*) FROM acked WHERE id = ANY($1)`, acked).Scan(&present); err != nil {
		t.Fatal(err)
	}
	return len(acked) - present
}

// TestFailoverAfterThePrimaryIsKilled: three controllers, an agent at site
// a and a standby at site b. The primary's postmaster is SIGKILLed under a
// workload; the quorum promotes DR, and a client on a multi-host
// connection string with target_session_attrs=read-write writes there by
// itself. The old primary, restarted with its agent still running, is
// fenced and takes no write, even from a session that turns
// default_transaction_read_only off.
func TestFailoverAfterThePrimaryIsKilled(t *testing.T) {
	f := startFailoverSite(t)
	s, q, dr := f.site, f.q, f.dr

	// Bad operator input changes nothing.
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"failover", "--group", "nope"}, `no group "nope"`},
		{[]string{"failover", "--group", "crm"}, "refusing to fail over a healthy primary"},
		{[]string{"pause"}, `required flag(s) "group" not set`},
	} {
		out, err := q.ctl(t, c.args...)
		if err == nil || !strings.Contains(out, c.want) {
			t.Errorf("haven ctl %s: %v, %q; want an error saying %q", strings.Join(c.args, " "), err, out, c.want)
		}
	}
	if st, err := q.status(t); err != nil || st.Groups[0].Epoch != "1" || st.Groups[0].PrimarySite != "a" {
		t.Fatalf("after refused commands: %+v, %v", st, err)
	}

	f.startWriting(t)
	_, acked := f.killPrimary(t)
	t.Logf("asynchronous mode: %d of %d acknowledged writes did not reach DR before the kill", f.missing(t, acked), len(acked))
	st, err := q.status(t)
	if err != nil {
		t.Fatal(err)
	}
	if g := st.Groups[0]; g.PrimarySite != "b" || g.Epoch != "2" {
		t.Errorf("after failover the quorum says primary %s at epoch %s, want b at 2", g.PrimarySite, g.Epoch)
	}
	// Every node's metrics say the same.
	for _, url := range q.metrics {
		body, err := metricsPage(url)
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{`haven_controller_group_epoch{group="crm"} 2`, `haven_controller_group_primary{group="crm",site="b"} 1`} {
			if !strings.Contains(body, want) {
				t.Errorf("%s lacks %s", url, want)
			}
		}
	}

	// The old primary comes back with its agent running: it is fenced.
	if err := s.primary.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	oldURL := s.primaryURL() + "&default_transaction_read_only=off"
	waitFor(t, 30*time.Second, "the old primary to be fenced", func() (bool, error) {
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, oldURL)
		if err != nil {
			return strings.Contains(err.Error(), "not currently accepting connections"), nil
		}
		conn.Close(context.Background())
		return false, nil
	})
	var readOnly string
	maint := connect(t, s.primary.URL("postgres"))
	if err := maint.QueryRow(t.Context(), `SHOW default_transaction_read_only`).Scan(&readOnly); err != nil || readOnly != "on" {
		t.Errorf("the fenced old primary has default_transaction_read_only = %q (%v), want on", readOnly, err)
	}
	waitFor(t, 30*time.Second, "the promotion to be reported", func() (bool, error) {
		st, err := q.status(t)
		return err == nil && st.Groups[0].State == "ACTIVE", err
	})
	if out, err := q.ctl(t, "failover", "--group", "crm", "--force"); err == nil || !strings.Contains(out, "deposed primary that has not rejoined") {
		t.Errorf("a second failover was not refused: %v, %s", err, out)
	}

	// Writes now go to the new primary only.
	after := connect(t, f.multiHost)
	mustExec(t, after, `INSERT INTO acked (id) VALUES (-2)`)
	var onDR int
	if err := dr.QueryRow(t.Context(), `SELECT count(*) FROM acked WHERE id IN (-1, -2)`).Scan(&onDR); err != nil || onDR != 2 {
		t.Errorf("writes after failover: %d of 2 on the promoted database (%v)", onDR, err)
	}

	// A node without a majority behind it says so, and changes nothing.
	q.procs[0].kill()
	q.procs[1].kill()
	lone := &quorum{apis: q.apis[2:]}
	waitFor(t, 30*time.Second, "the lone controller to refuse changes", func() (bool, error) {
		out, err := lone.ctl(t, "pause", "--group", "crm")
		return err != nil && strings.Contains(out, "no majority"), nil
	})
}

// TestSynchronousFailoverLosesNoAcknowledgedWrite: with --synchronous, a
// commit returns only once JetStream has it, so every write a client saw
// committed before the primary was killed is on the promoted database.
func TestSynchronousFailoverLosesNoAcknowledgedWrite(t *testing.T) {
	f := startFailoverSite(t, "--synchronous")
	waitFor(t, 30*time.Second, "the agent to be the primary's synchronous standby", func() (bool, error) {
		var state string
		err := f.primary.QueryRow(t.Context(), `SELECT coalesce(max(sync_state), '') FROM pg_stat_replication WHERE application_name = 'haven_crm'`).Scan(&state)
		return state == "sync", err
	})
	f.startWriting(t)
	_, acked := f.killPrimary(t)
	if n := f.missing(t, acked); n != 0 {
		t.Errorf("synchronous mode: %d of %d acknowledged writes are missing on the promoted database", n, len(acked))
	} else {
		t.Logf("synchronous mode: all %d acknowledged writes are on the promoted database", len(acked))
	}
}

// TestPrimaryRestartKeepsItsRole: a restart of the primary too short for a
// failover. While its agent has not confirmed the lease since the start,
// the write guard refuses writes; then writes resume there, and reach DR.
func TestPrimaryRestartKeepsItsRole(t *testing.T) {
	f := startFailoverSite(t)
	if err := f.site.primary.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	var refused int
	waitFor(t, 30*time.Second, "the restarted primary to take writes again", func() (bool, error) {
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, f.primaryURL())
		if err != nil {
			return false, nil
		}
		defer conn.Close(context.Background())
		_, err = conn.Exec(ctx, `INSERT INTO acked (id) VALUES (1)`)
		if err != nil && strings.Contains(err.Error(), "not confirmed as the primary") {
			refused++
		}
		return err == nil, nil
	})
	t.Logf("writes refused by the write guard after the restart: %d", refused)
	f.q.holdsPrimary(t, "a", "1", 2*time.Second)
	waitCaughtUp(t, connect(t, f.primaryURL()), f.dr, 2, 60*time.Second)
	var n int
	if err := f.dr.QueryRow(t.Context(), `SELECT count(*) FROM acked WHERE id = 1`).Scan(&n); err != nil || n != 1 {
		t.Errorf("the write after the restart is not on DR: %d rows (%v)", n, err)
	}
}

// TestRejoinAfterFailover: both sites run an agent and a standby. The
// primary's agent is killed, rows are committed that never reach the
// stream, and the primary is killed too; restarted without its agent, it
// is fenced by the controllers. DR is promoted and its agent starts
// capturing; haven ctl rejoin makes the old primary's agent write those
// rows to its report and drop its slot, and the old primary's standby
// replaces its database with the new primary's snapshot and follows it.
func TestRejoinAfterFailover(t *testing.T) {
	reports := t.TempDir()
	s, q, primary, dr, agentA, _ := twoSites(t, reports)
	controllers := strings.Join(q.apis, ",")
	agentArgs := s.agentArgs("--controllers", controllers, "--site", "a", "--report-dir", reports)
	mustExec(t, primary, `INSERT INTO acked (id) SELECT g FROM generate_series(1, 100) g`)
	// A table created after the group's initial snapshot: the rejoining
	// database has it with its rows already, and must not keep them (a
	// reload from the old primary's own snapshot would: the stream's rows
	// then clash with them).
	mustExec(t, primary, `CREATE TABLE late (id int PRIMARY KEY, v text); INSERT INTO late SELECT g, 'a' FROM generate_series(1, 100) g`)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)

	// Committed on the primary, never captured: the agent is down.
	agentA.kill()
	mustExec(t, primary, `INSERT INTO acked (id) SELECT g FROM generate_series(1001, 1005) g`)
	if err := s.primary.Kill(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, "site b to be promoted", func() (bool, error) {
		st, err := q.status(t)
		return err == nil && st.Groups[0].PrimarySite == "b" && st.Groups[0].State == "ACTIVE", err
	})
	// The old primary comes back without its agent. Before any controller
	// reaches it (all three are frozen), its write guard refuses writes,
	// even from a session that asks for them; then the controllers fence
	// it.
	for _, p := range q.procs {
		if err := p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.primary.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	rogue := connect(t, s.primaryURL()+"&default_transaction_read_only=off")
	for _, sql := range []string{`INSERT INTO acked (id) VALUES (-7)`, `UPDATE contacts SET phone = 'rogue'`, `DELETE FROM deals`, `TRUNCATE accounts CASCADE`} {
		_, err := rogue.Exec(t.Context(), sql)
		if err == nil || !strings.Contains(err.Error(), "this server is not confirmed as the primary since it started") {
			t.Errorf("the restarted old primary, before any fence: %s: %v; want the write guard's refusal", sql, err)
		}
	}
	rogue.Close(t.Context())
	for _, p := range q.procs {
		if err := p.cmd.Process.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 30*time.Second, "the controllers to fence the old primary", func() (bool, error) {
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, s.primaryURL()+"&default_transaction_read_only=off")
		if err != nil {
			return strings.Contains(err.Error(), "not currently accepting connections"), nil
		}
		conn.Close(context.Background())
		return false, nil
	})
	startHaven(t, "agent-a-again", agentArgs...)
	newPrimary := connect(t, s.drWriteURL())
	mustExec(t, newPrimary, `INSERT INTO acked (id) SELECT g FROM generate_series(2001, 2050) g`)
	if out, err := q.ctl(t, "rejoin", "--group", "crm"); err != nil {
		t.Fatalf("haven ctl rejoin: %v: %s", err, out)
	}
	waitFor(t, 90*time.Second, "site a to rejoin as the standby", func() (bool, error) {
		st, err := q.status(t)
		return err == nil && len(st.Groups[0].DeposedSites) == 0 && st.Groups[0].Rejoin == "", err
	})
	old := connect(t, s.primary.URL(s.db))
	waitCaughtUp(t, newPrimary, old, 3, 60*time.Second)
	mustExec(t, newPrimary, `UPDATE contacts SET phone = 'after rejoin', n = n + 1 WHERE id % 2 = 0`)
	waitCaughtUp(t, newPrimary, old, 4, 60*time.Second)
	assertEqual(t, newPrimary, old, map[string]string{"acked": "id", "contacts": "id", "accounts": "id", "deals": "id", "late": "id"})
	// The rejoined database takes writes from its standby only.
	mustExec(t, old, `SET default_transaction_read_only = off`)
	if _, err := old.Exec(t.Context(), `INSERT INTO acked (id) VALUES (-8)`); err == nil || !strings.Contains(err.Error(), "not confirmed as the primary") {
		t.Errorf("the rejoined standby's database, a client's write: %v; want the write guard's refusal", err)
	}
	mustExec(t, old, `RESET default_transaction_read_only`)
	var lost int
	if err := old.QueryRow(t.Context(), `SELECT count(*) FROM acked WHERE id BETWEEN 1001 AND 1005`).Scan(&lost); err != nil || lost != 0 {
		t.Errorf("the rejoined database kept %d rows the new primary never had (%v)", lost, err)
	}

	files, err := filepath.Glob(filepath.Join(reports, "haven-lost-crm-*.sql"))
	if err != nil || len(files) != 1 {
		t.Fatalf("lost-transaction reports: %v, %v; want one", files, err)
	}
	report, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	for id := 1001; id <= 1005; id++ {
		if !strings.Contains(string(report), fmt.Sprintf("INSERT INTO \"public\".\"acked\" (\"id\", \"at\") VALUES ('%d'::bigint", id)) {
			t.Errorf("the report lacks the uncaptured row %d:\n%s", id, report)
		}
	}
	t.Logf("report %s:\n%s", files[0], report)
}

// twoSites starts a group whose sites a and b each run an agent and a
// standby, site a primary, DR caught up.
func twoSites(t *testing.T, reports string, agentExtra ...string) (*site, *quorum, *pgx.Conn, *pgx.Conn, *proc, *proc) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 30)
	mustExec(t, primary, `CREATE TABLE acked (id bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())`)
	q := startQuorum(t, 3)
	controllers := strings.Join(q.apis, ",")
	agentA := startHaven(t, "agent-a", s.agentArgs(append([]string{"--controllers", controllers, "--site", "a", "--report-dir", reports}, agentExtra...)...)...)
	standbyB := startHaven(t, "standby-b", s.standbyArgs("--controllers", controllers, "--site", "b")...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	// Each site also runs the other role, idle until the roles swap.
	startHaven(t, "agent-b", append([]string{"agent", "--source-url", s.drURL(), "--nats-url", s.nats.URL(), "--group", s.group,
		"--heartbeat-interval", "500ms", "--controllers", controllers, "--site", "b", "--report-dir", reports}, agentExtra...)...)
	startHaven(t, "standby-a", "standby", "--target-url", s.primaryURL(), "--nats-url", s.nats.URL(), "--group", s.group,
		"--blocked-retry", "1s", "--controllers", controllers, "--site", "a")
	// Rules version 4: a rejoin's last check-in is DR's first report, which
	// a switchover right after the rejoin relies on.
	waitFor(t, 30*time.Second, "the quorum to know that DR is complete, under rules version 4", func() (bool, error) {
		st, err := q.status(t)
		return err == nil && len(st.Groups) == 1 && st.Groups[0].DRSite == "b" && st.Groups[0].DRIncomplete == "" && st.RulesVersion == 4, err
	})
	return s, q, primary, dr, agentA, standbyB
}

// TestSwitchoverThereAndBack: under a workload writing through a
// multi-host connection string, the primary role goes from site a to b
// and back. Every write a client saw committed is on the final primary
// exactly once, the sites end equal, and the write pause is measured.
func TestSwitchoverThereAndBack(t *testing.T) { switchoverThereAndBack(t) }

// TestSynchronousSwitchoverThereAndBack: the same with both agents in
// synchronous mode, where each site's commits wait for its agent.
func TestSynchronousSwitchoverThereAndBack(t *testing.T) { switchoverThereAndBack(t, "--synchronous") }

func switchoverThereAndBack(t *testing.T, agentArgs ...string) {
	s, q, _, _, agentA, standbyB := twoSites(t, t.TempDir(), agentArgs...)
	multiHost := fmt.Sprintf("postgres://postgres@127.0.0.1:%d,127.0.0.1:%d/%s?target_session_attrs=read-write&connect_timeout=1",
		s.primary.Port(), s.dr.Port(), s.db)
	var acked ackedWrites
	var mu sync.Mutex
	var lastWrite time.Time
	var maxPause time.Duration
	writer := startLoad(t, multiHost, 2, func(ctx context.Context, conn *pgx.Conn, _ *rand.Rand) error {
		id := acked.next.Add(1)
		if _, err := conn.Exec(ctx, `INSERT INTO acked (id) VALUES ($1)`, id); err != nil {
			// The node was fenced or went read-only: reconnect through the
			// connection string, which finds the primary.
			conn.Close(context.Background())
			for ctx.Err() == nil {
				c, err := pgx.Connect(ctx, multiHost)
				if err == nil {
					*conn = *c
					return nil
				}
				time.Sleep(20 * time.Millisecond)
			}
			return nil
		}
		mu.Lock()
		now := time.Now()
		if !lastWrite.IsZero() && now.Sub(lastWrite) > maxPause {
			maxPause = now.Sub(lastWrite)
		}
		lastWrite = now
		acked.ids = append(acked.ids, id)
		mu.Unlock()
		return nil
	})
	for i, to := range []string{"b", "a"} {
		waitFor(t, 30*time.Second, "writes before the switchover", func() (bool, error) { return acked.next.Load() > int64(300*(i+1)), nil })
		mu.Lock()
		maxPause = 0
		mu.Unlock()
		if to == "a" {
			// Back to a, whose agent is slow to put its snapshot in the
			// stream: b's rejoining standby finds its own as the latest.
			if err := agentA.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
		}
		if out, err := q.ctl(t, "switchover", "--group", "crm"); err != nil {
			t.Fatalf("haven ctl switchover to %s: %v: %s", to, err, out)
		}
		if to == "a" {
			waitFor(t, 30*time.Second, "site b's standby to wait for site a's snapshot", func() (bool, error) {
				return strings.Contains(standbyB.output(), "rejoining: waiting for the new primary's initial snapshot") ||
					strings.Contains(standbyB.output(), "apply stopped"), nil
			})
			if err := agentA.cmd.Process.Signal(syscall.SIGCONT); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, 90*time.Second, "site "+to+" primary and the other rejoined", func() (bool, error) {
			st, err := q.status(t)
			if err != nil {
				return false, err
			}
			g := st.Groups[0]
			return g.PrimarySite == to && g.State == "ACTIVE" && len(g.DeposedSites) == 0 && g.Rejoin == "", nil
		})
		mu.Lock()
		t.Logf("switchover to site %s: longest pause between two acknowledged writes %s", to, maxPause.Round(time.Millisecond))
		mu.Unlock()
	}
	writer.finish(t)

	final := connect(t, s.primaryURL())
	standby := connect(t, s.drURL())
	waitCaughtUp(t, final, standby, 2, 60*time.Second)
	acked.onceEach(t, final)
	assertEqual(t, final, standby, map[string]string{"acked": "id", "contacts": "id", "accounts": "id", "deals": "id", "activities": "id"})
}

// TestControllerLeaderCutOff: the leader of the quorum stops answering
// (SIGSTOP) while the primary stays healthy. The other two elect a new
// leader and the group keeps its primary and epoch: nothing fails over.
// When the old leader comes back it follows, and still nothing changes.
func TestControllerLeaderCutOff(t *testing.T) {
	f := startFailoverSite(t)
	q := f.q
	i := leaderIndex(t, q)
	old := fmt.Sprintf("c%d", i+1)
	if err := q.procs[i].cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	rest := q.without(i)
	waitFor(t, 30*time.Second, "a new leader among the other two", func() (bool, error) {
		st, err := rest.status(t)
		return err == nil && st.LeaderID != "" && st.LeaderID != old, nil
	})
	// Longer than failover_after and the lease: a failover would have come.
	mustExec(t, f.primary, `INSERT INTO marker (id) VALUES (100)`)
	rest.holdsPrimary(t, "a", "1", 5*time.Second)
	if err := q.procs[i].cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the old leader to follow", func() (bool, error) {
		st, err := (&quorum{apis: q.apis[i : i+1]}).status(t)
		return err == nil && st.LeaderID != "" && st.LeaderID != old, nil
	})
	if st, err := q.status(t); err != nil || st.Groups[0].PrimarySite != "a" || st.Groups[0].Epoch != "1" {
		t.Fatalf("after the old leader came back: %+v, %v", st, err)
	}
	waitCaughtUp(t, f.primary, f.dr, 101, 30*time.Second)
}

// cutProxy forwards TCP connections to a target until it is cut: then it
// closes what it carries and refuses new connections, as a broken link.
type cutProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	cut    bool
	conns  []net.Conn
}

func newCutProxy(t *testing.T, target string) *cutProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln, target: target}
	t.Cleanup(func() { ln.Close(); p.setCut(true) })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			if p.cut {
				p.mu.Unlock()
				c.Close()
				continue
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				p.mu.Unlock()
				c.Close()
				continue
			}
			p.conns = append(p.conns, c, up)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(up, c); up.Close() }()
			go func() { _, _ = io.Copy(c, up); c.Close() }()
		}
	}()
	return p
}

func (p *cutProxy) setCut(cut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = cut
	if cut {
		for _, c := range p.conns {
			c.Close()
		}
		p.conns = nil
	}
}

// TestControllerLeaderPartitioned: the leader's Raft links to the other
// two nodes are cut (each node reaches each peer through its own proxy,
// --raft-route) while it keeps running and reaching the primary. The
// other two elect a new leader; nothing fails over; when the links heal,
// the old leader follows.
func TestControllerLeaderPartitioned(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 10)
	const n = 3
	var raftAddrs, apiAddrs, peers []string
	for i := range n {
		raftAddrs = append(raftAddrs, fmt.Sprintf("127.0.0.1:%d", freePort(t)))
		apiAddrs = append(apiAddrs, fmt.Sprintf("127.0.0.1:%d", freePort(t)))
		peers = append(peers, fmt.Sprintf("c%d=%s", i+1, raftAddrs[i]))
	}
	links := map[[2]int]*cutProxy{} // from, to
	q := &quorum{}
	for i := range n {
		var routes []string
		for j := range n {
			if i != j {
				links[[2]int{i, j}] = newCutProxy(t, raftAddrs[j])
				routes = append(routes, fmt.Sprintf("c%d=%s", j+1, links[[2]int{i, j}].ln.Addr()))
			}
		}
		q.procs = append(q.procs, startHaven(t, fmt.Sprintf("controller-c%d", i+1), "controller", "--id", fmt.Sprintf("c%d", i+1),
			"--raft-addr", raftAddrs[i], "--api-addr", apiAddrs[i], "--data-dir", t.TempDir(), "--peers", strings.Join(peers, ","),
			"--raft-route", strings.Join(routes, ",")))
		q.apis = append(q.apis, "http://"+apiAddrs[i])
	}
	controllers := strings.Join(q.apis, ",")
	startHaven(t, "agent", s.agentArgs("--controllers", controllers, "--site", "a")...)
	startHaven(t, "standby", s.standbyArgs("--controllers", controllers, "--site", "b")...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	var old string
	waitFor(t, 30*time.Second, "a leader that knows both sites", func() (bool, error) {
		st, err := q.status(t)
		if err != nil || len(st.Groups) != 1 || st.Groups[0].DRSite != "b" {
			return false, nil
		}
		old = st.LeaderID
		return old != "", nil
	})
	l := int(old[1] - '1')
	for j := range n {
		if j != l {
			links[[2]int{l, j}].setCut(true)
			links[[2]int{j, l}].setCut(true)
		}
	}
	rest := q.without(l)
	waitFor(t, 30*time.Second, "a new leader among the other two", func() (bool, error) {
		st, err := rest.status(t)
		return err == nil && st.LeaderID != "" && st.LeaderID != old, nil
	})
	// The cut-off node cannot commit anything: longer than failover_after
	// and the lease, nothing changes.
	rest.holdsPrimary(t, "a", "1", 5*time.Second)
	mustExec(t, primary, `UPDATE contacts SET n = n + 1`)
	waitCaughtUp(t, primary, dr, 2, 30*time.Second)
	for j := range n {
		if j != l {
			links[[2]int{l, j}].setCut(false)
			links[[2]int{j, l}].setCut(false)
		}
	}
	waitFor(t, 30*time.Second, "the old leader to follow", func() (bool, error) {
		st, err := (&quorum{apis: q.apis[l : l+1]}).status(t)
		return err == nil && st.LeaderID != "" && st.LeaderID != old, nil
	})
	if st, err := q.status(t); err != nil || st.Groups[0].PrimarySite != "a" || st.Groups[0].Epoch != "1" {
		t.Fatalf("after the links healed: %+v, %v", st, err)
	}
}

// TestOneControllerCutOffFromThePrimary: one controller node reaches the
// primary through a link that is cut (--db-route); it sees the primary down
// for longer than failover_after, the other two see it up: nothing fails
// over, and the status shows each node's view.
func TestOneControllerCutOffFromThePrimary(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 10)
	primaryAddr := fmt.Sprintf("127.0.0.1:%d", s.primary.Port())
	link := newCutProxy(t, primaryAddr)
	q := startQuorumWith(t, 3, func(i int) []string {
		if i == 0 {
			return []string{"--db-route", primaryAddr + "=" + link.ln.Addr().String()}
		}
		return nil
	})
	controllers := strings.Join(q.apis, ",")
	startHaven(t, "agent", s.agentArgs("--controllers", controllers, "--site", "a")...)
	startHaven(t, "standby", s.standbyArgs("--controllers", controllers, "--site", "b")...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	link.setCut(true)
	var seenDown time.Time
	waitFor(t, 30*time.Second, "c1 to see the primary down for longer than failover_after", func() (bool, error) {
		out, err := q.ctl(t, "status", "--json")
		if err != nil {
			return false, nil
		}
		var st struct {
			Groups []struct {
				Epoch        string `json:"epoch"`
				Observations []struct {
					NodeID string `json:"nodeId"`
					Up     bool   `json:"up"`
				} `json:"observations"`
			} `json:"groups"`
		}
		if err := json.Unmarshal([]byte(out), &st); err != nil || len(st.Groups) != 1 {
			return false, err
		}
		if st.Groups[0].Epoch != "1" {
			return false, fmt.Errorf("the group failed over (epoch %s) although only c1 lost the primary", st.Groups[0].Epoch)
		}
		views := map[string]bool{}
		for _, o := range st.Groups[0].Observations {
			views[o.NodeID] = o.Up
		}
		if up, ok := views["c1"]; !ok || up || !views["c2"] || !views["c3"] {
			seenDown = time.Time{}
			return false, nil
		}
		if seenDown.IsZero() {
			seenDown = time.Now()
		}
		return time.Since(seenDown) > 5*time.Second, nil
	})
	mustExec(t, primary, `UPDATE contacts SET n = n + 1`)
	waitCaughtUp(t, primary, dr, 2, 30*time.Second)
	assertEqual(t, primary, dr, map[string]string{"contacts": "id"})
}
