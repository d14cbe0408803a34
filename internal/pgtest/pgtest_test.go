package pgtest

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"golang.org/x/sys/unix"
)

func TestBinDir(t *testing.T) {
	dir, err := BinDir()
	if err != nil {
		t.Fatal(err)
	}
	if !hasServerBinaries(dir) {
		t.Fatalf("BinDir() = %s, which lacks initdb or pg_ctl", dir)
	}
}

func TestClusterLifecycle(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	c := NewWith(t, Options{Settings: map[string]string{"max_prepared_transactions": "7"}})
	port := c.Port()

	for setting, want := range map[string]string{"wal_level": "logical", "max_prepared_transactions": "7", "fsync": "off"} {
		if got := show(t, c, setting); got != want {
			t.Errorf("SHOW %s = %q, want %q", setting, got, want)
		}
	}

	if err := c.CreateDatabase(ctx, "crm"); err != nil {
		t.Fatal(err)
	}
	if err := c.Exec(ctx, "crm", `
		CREATE TABLE contacts (id int PRIMARY KEY, name text);
		INSERT INTO contacts VALUES (1, 'ada'), (2, 'grace'), (3, 'barbara');`); err != nil {
		t.Fatal(err)
	}

	repl, err := pgconn.Connect(ctx, c.ReplicationURL("crm"))
	if err != nil {
		t.Fatalf("replication connection: %v", err)
	}
	if _, err := repl.Exec(ctx, "IDENTIFY_SYSTEM").ReadAll(); err != nil {
		t.Fatalf("IDENTIFY_SYSTEM: %v", err)
	}

	// Kill takes the postmaster and its children with it.
	pids := serverProcesses(t, c)
	if err := c.Kill(); err != nil {
		t.Fatal(err)
	}
	assertGone(t, pids)
	repl.Close(ctx)
	if conn, err := pgconn.Connect(ctx, c.URL("crm")); err == nil {
		conn.Close(ctx)
		t.Fatal("connected to a killed cluster")
	}
	// Any order, any number of times.
	for _, step := range []func() error{c.Kill, func() error { return c.Stop(ctx) }} {
		if err := step(); err != nil {
			t.Fatalf("on a killed cluster: %v", err)
		}
	}

	if err := c.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if c.Port() != port {
		t.Fatalf("port changed from %d to %d across Restart", port, c.Port())
	}
	if got := countContacts(t, c); got != 3 {
		t.Fatalf("after crash recovery: %d contacts, want 3", got)
	}

	if err := c.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Stop(ctx); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	if err := c.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Restart(ctx); err != nil {
		t.Fatalf("Restart of a running cluster: %v", err)
	}
	if got := countContacts(t, c); got != 3 {
		t.Fatalf("after restarts: %d contacts, want 3", got)
	}

	// Hold a session open so that Destroy has a backend to take down.
	conn, err := pgx.Connect(ctx, c.URL("crm"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	pids = serverProcesses(t, c)
	if err := c.Destroy(); err != nil {
		t.Fatal(err)
	}
	assertGone(t, pids)
	if _, err := os.Stat(filepath.Dir(c.Dir())); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("cluster directory %s still there after Destroy (stat: %v)", filepath.Dir(c.Dir()), err)
	}
	if err := c.Destroy(); err != nil {
		t.Fatalf("second Destroy: %v", err)
	}
	if err := c.Restart(ctx); err == nil {
		t.Fatal("Restart after Destroy succeeded")
	}
}

func TestStartFailureReportsServerLog(t *testing.T) {
	t.Parallel()
	_, err := Start(t.Context(), Options{Name: "broken", Settings: map[string]string{"shared_buffers": "plenty"}, Logf: t.Logf})
	if err == nil {
		t.Fatal("Start with an invalid setting succeeded")
	}
	if !strings.Contains(err.Error(), `"shared_buffers"`) {
		t.Fatalf("error lacks the server's complaint: %v", err)
	}
	t.Logf("got, as expected: %v", err)
}

// A cluster whose owning process died (a test binary killed by -timeout never
// runs its cleanups) is destroyed by the next Start.
func TestOrphanedClusterIsDestroyed(t *testing.T) {
	t.Parallel()
	orphan, err := Start(t.Context(), Options{Name: "orphan", Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = orphan.Destroy() })
	pids := serverProcesses(t, orphan)

	// A pid that surely names no process: one of an exited, reaped child.
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	ownerPath := filepath.Join(filepath.Dir(orphan.Dir()), ownerFile)
	if err := os.WriteFile(ownerPath, []byte(strconv.Itoa(gone.Process.Pid)), 0o644); err != nil {
		t.Fatal(err)
	}

	New(t)
	assertGone(t, pids)
	if _, err := os.Stat(filepath.Dir(orphan.Dir())); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("orphaned cluster directory still there (stat: %v)", err)
	}
}

func TestRenderSettings(t *testing.T) {
	for _, tc := range []struct {
		name     string
		settings map[string]string
		wantLine string // a line the rendered file must contain
		wantErr  string
	}{
		{name: "plain", settings: map[string]string{"work_mem": "64MB"}, wantLine: "work_mem = '64MB'"},
		{name: "quotes", settings: map[string]string{"application_name": `it's C:\x`}, wantLine: `application_name = 'it''s C:\\x'`},
		{name: "dotted", settings: map[string]string{"haven.site": "dr"}, wantLine: "haven.site = 'dr'"},
		{name: "managed", settings: map[string]string{"Port": "5432"}, wantErr: "managed"},
		{name: "bad name", settings: map[string]string{"a = 1\nb": "2"}, wantErr: "not a parameter name"},
		{name: "line break", settings: map[string]string{"work_mem": "1\nfsync = on"}, wantErr: "line break"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conf, err := renderSettings("/tmp/x", tc.settings)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(conf, "\n"+tc.wantLine+"\n") {
				t.Fatalf("rendered settings lack %q:\n%s", tc.wantLine, conf)
			}
		})
	}
}

func show(t *testing.T, c *Cluster, setting string) string {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), c.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var value string
	if err := conn.QueryRow(t.Context(), "SELECT current_setting($1)", setting).Scan(&value); err != nil {
		t.Fatalf("SHOW %s: %v", setting, err)
	}
	return value
}

func countContacts(t *testing.T, c *Cluster) int {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), c.URL("crm"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int
	if err := conn.QueryRow(t.Context(), "SELECT count(*) FROM contacts").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// serverProcesses lists the running postmaster and its children.
func serverProcesses(t *testing.T, c *Cluster) []int {
	t.Helper()
	pid, running := c.postmasterPID()
	if !running {
		t.Fatal("no running postmaster")
	}
	children := childrenOf(pid)
	if len(children) == 0 {
		t.Fatalf("postmaster %d has no children; cannot check they go away", pid)
	}
	return append([]int{pid}, children...)
}

func assertGone(t *testing.T, pids []int) {
	t.Helper()
	for _, pid := range pids {
		if processAlive(pid) {
			t.Errorf("server process %d still alive", pid)
		}
	}
}

// TestRestartWaitsForTheOldServersSharedMemory: a process of a killed
// server that still holds its shared memory for a moment (as a backend the
// postmaster forked while it was being killed does until it sees the
// postmaster gone) makes the next start refuse; Restart starts again until
// it lets go. Here the test itself holds the segment.
func TestRestartWaitsForTheOldServersSharedMemory(t *testing.T) {
	t.Parallel()
	c := New(t)
	lock, err := os.ReadFile(filepath.Join(c.dataDir, "postmaster.pid"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(lock), "\n")
	if len(lines) < 7 || len(strings.Fields(lines[6])) != 2 {
		t.Fatalf("postmaster.pid names no shared memory segment:\n%s", lock)
	}
	id, err := strconv.Atoi(strings.Fields(lines[6])[1])
	if err != nil {
		t.Fatal(err)
	}
	mem, err := unix.SysvShmAttach(id, 0, unix.SHM_RDONLY)
	if err != nil {
		t.Fatalf("attach the server's shared memory segment %d: %v", id, err)
	}
	if err := c.Kill(); err != nil {
		t.Fatal(err)
	}
	restarted := make(chan error, 1)
	go func() { restarted <- c.Restart(t.Context()) }()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if log, _ := os.ReadFile(c.logFile); strings.Contains(string(log), "pre-existing shared memory block") {
			break
		}
		select {
		case err := <-restarted:
			t.Fatalf("Restart returned (%v) while the old server's shared memory was held", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("no start was refused for the held shared memory in 30 s")
		}
	}
	if err := unix.SysvShmDetach(mem); err != nil {
		t.Fatal(err)
	}
	if err := <-restarted; err != nil {
		t.Fatalf("Restart once the shared memory was let go: %v", err)
	}
	if got := show(t, c, "wal_level"); got != "logical" {
		t.Errorf("after the restart SHOW wal_level = %q", got)
	}
}
