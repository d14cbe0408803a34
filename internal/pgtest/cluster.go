package pgtest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Options configures a cluster. The zero value is a working configuration.
type Options struct {
	// Name labels the cluster in logs and in its directory name.
	Name string
	// Settings are extra postgresql.conf parameters; they override the
	// defaults. port, listen_addresses and unix_socket_directories are managed
	// by the cluster and cannot be set.
	Settings map[string]string
	// Logf receives lifecycle messages; nil discards them.
	Logf func(format string, args ...any)
}

// Cluster is a PostgreSQL cluster in its own directory. Its methods are safe
// for concurrent use; lifecycle calls are serialised.
type Cluster struct {
	name    string
	binDir  string
	baseDir string // holds the data dir, the server log and the Unix socket
	dataDir string
	logFile string
	runAs   *syscall.Credential // nil: run as the current user
	logf    func(format string, args ...any)
	port    atomic.Int32 // chosen once a start succeeds, then fixed

	mu        sync.Mutex // serialises lifecycle calls
	destroyed bool
}

const (
	pgctlTimeout   = 60 * time.Second // how long pg_ctl -w waits for start or stop
	connectTimeout = 30 * time.Second // how long a started server may take to accept connections
	startAttempts  = 5                // free ports tried before giving up on clashes
	logTailLines   = 30

	dirPrefix = "haven-pg-"
	ownerFile = "owner.pid" // pid of the process that started the cluster
)

// managedSettings are chosen by the cluster itself; Options.Settings may not
// override them without breaking URL and the socket directory.
var managedSettings = []string{"port", "listen_addresses", "unix_socket_directories"}

var settingName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.]*$`)

// errPortInUse marks a start that failed only because another process took
// the port between choosing it and binding it.
var errPortInUse = errors.New("port already in use")

// Start creates a cluster in a new temporary directory and starts it. On
// error nothing is left behind.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	name := opts.Name
	if name == "" {
		name = "pg"
	}
	binDir, err := BinDir()
	if err != nil {
		return nil, err
	}
	runAs, err := runAsCredential()
	if err != nil {
		return nil, err
	}
	// As root, t.TempDir() and $TMPDIR may sit under directories only root
	// can traverse; /tmp is reachable by the postgres user.
	parent := os.TempDir()
	if runAs != nil {
		parent = "/tmp"
	}
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	destroyOrphans(parent, binDir, runAs, logf)
	baseDir, err := os.MkdirTemp(parent, dirPrefix+dirLabel(name)+"-")
	if err != nil {
		return nil, fmt.Errorf("pgtest: cluster %q: create directory: %w", name, err)
	}
	c := newCluster(name, binDir, baseDir, runAs, logf)
	err = os.WriteFile(filepath.Join(baseDir, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o644)
	if err == nil {
		err = c.create(ctx, opts.Settings)
	}
	if err != nil {
		if derr := c.Destroy(); derr != nil {
			err = errors.Join(err, derr)
		}
		return nil, fmt.Errorf("pgtest: start cluster %q: %w", name, err)
	}
	c.logf("pgtest %s: PostgreSQL %s ready on 127.0.0.1:%d, data in %s", c.name, c.version(), c.Port(), c.dataDir)
	return c, nil
}

func newCluster(name, binDir, baseDir string, runAs *syscall.Credential, logf func(string, ...any)) *Cluster {
	return &Cluster{
		name:    name,
		binDir:  binDir,
		baseDir: baseDir,
		dataDir: filepath.Join(baseDir, "data"),
		logFile: filepath.Join(baseDir, "postgresql.log"),
		runAs:   runAs,
		logf:    logf,
	}
}

// destroyOrphans destroys clusters left behind in parent by processes that
// died without cleaning up, such as a test binary killed by go test -timeout:
// their servers would otherwise run, and hold memory and ports, forever.
func destroyOrphans(parent, binDir string, runAs *syscall.Credential, logf func(string, ...any)) {
	owners, _ := filepath.Glob(filepath.Join(parent, dirPrefix+"*", ownerFile))
	for _, owner := range owners {
		content, err := os.ReadFile(owner)
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(content)))
		if err != nil || processAlive(pid) {
			continue
		}
		baseDir := filepath.Dir(owner)
		orphan := newCluster(filepath.Base(baseDir), binDir, baseDir, runAs, logf)
		logf("pgtest: destroying %s, left behind by process %d", baseDir, pid)
		if err := orphan.Destroy(); err != nil {
			logf("pgtest: %v", err)
		}
	}
}

// Port is the TCP port the cluster listens on, on 127.0.0.1. It stays the same
// across Stop, Kill and Restart.
func (c *Cluster) Port() int { return int(c.port.Load()) }

// Dir is the cluster's data directory (PGDATA).
func (c *Cluster) Dir() string { return c.dataDir }

// URL is a connection string for database as the superuser postgres.
func (c *Cluster) URL(database string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", c.Port(), url.PathEscape(database))
}

// ReplicationURL is URL with replication=database, for a logical replication
// connection to database.
func (c *Cluster) ReplicationURL(database string) string {
	return c.URL(database) + "&replication=database"
}

// CreateDatabase creates an empty database called name.
func (c *Cluster) CreateDatabase(ctx context.Context, name string) error {
	if err := c.Exec(ctx, "postgres", "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		return fmt.Errorf("pgtest: create database %q: %w", name, err)
	}
	return nil
}

// Exec runs sql in database over the simple query protocol, so sql may hold
// several statements; they run in one implicit transaction unless sql says
// otherwise (so CREATE DATABASE, which refuses to run in a transaction, must
// come alone: use CreateDatabase).
func (c *Cluster) Exec(ctx context.Context, database, sql string) error {
	conn, err := pgconn.Connect(ctx, c.URL(database))
	if err != nil {
		return fmt.Errorf("pgtest: connect to database %q on port %d: %w", database, c.Port(), err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, sql).ReadAll(); err != nil {
		return fmt.Errorf("pgtest: exec in database %q: %w", database, err)
	}
	return nil
}

// Stop shuts the server down cleanly (pg_ctl stop -m fast). Stopping a server
// that is not running does nothing.
func (c *Cluster) Stop(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.stop(ctx, "fast"); err != nil {
		return fmt.Errorf("pgtest: stop cluster %q: %w", c.name, err)
	}
	return nil
}

// Kill crashes the server: the postmaster and all its children get SIGKILL at
// once, and Kill returns when they are gone. The next Restart runs crash
// recovery. Killing a server that is not running does nothing.
func (c *Cluster) Kill() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.kill(); err != nil {
		return fmt.Errorf("pgtest: kill cluster %q: %w", c.name, err)
	}
	return nil
}

// Restart starts the server again on the same port and data directory,
// stopping it first if it is running.
func (c *Cluster) Restart(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.destroyed {
		return fmt.Errorf("pgtest: restart cluster %q: already destroyed", c.name)
	}
	if err := c.stop(ctx, "fast"); err != nil {
		return fmt.Errorf("pgtest: restart cluster %q: %w", c.name, err)
	}
	if err := c.start(ctx); err != nil {
		if errors.Is(err, errPortInUse) {
			err = fmt.Errorf("%w (another process took port %d while the cluster was down)", err, c.Port())
		}
		return fmt.Errorf("pgtest: restart cluster %q: %w", c.name, err)
	}
	c.logf("pgtest %s: restarted on port %d", c.name, c.Port())
	return nil
}

// Destroy stops the server without a checkpoint (pg_ctl stop -m immediate),
// killing it if that fails, and removes all its files. It is safe to call more
// than once.
func (c *Cluster) Destroy() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), pgctlTimeout+10*time.Second)
	defer cancel()
	var errs []error
	var procs []int
	if pid, running := c.postmasterPID(); running {
		procs = append([]int{pid}, childrenOf(pid)...)
	}
	if err := c.stop(ctx, "immediate"); err != nil {
		c.logf("pgtest %s: %v; killing it", c.name, err)
		if err := c.kill(); err != nil {
			errs = append(errs, err)
		}
	}
	// pg_ctl returns once the postmaster is gone; a backend may still be
	// exiting. Destroy returns when every server process is.
	if err := awaitExit(procs, 10*time.Second); err != nil {
		for _, p := range procs {
			if isPostgres(p) {
				_ = syscall.Kill(p, syscall.SIGKILL)
			}
		}
		if err := awaitExit(procs, 30*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(c.baseDir); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", c.baseDir, err))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("pgtest: destroy cluster %q: %w", c.name, err)
	}
	if !c.destroyed {
		c.logf("pgtest %s: destroyed", c.name)
	}
	c.destroyed = true
	return nil
}

// BinDir finds the directory holding initdb and pg_ctl: `pg_config --bindir`
// if initdb is there, else initdb on PATH, else the newest
// /usr/lib/postgresql/*/bin (Debian and Ubuntu do not put the server on PATH).
func BinDir() (string, error) {
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		if dir := strings.TrimSpace(string(out)); hasServerBinaries(dir) {
			return dir, nil
		}
	}
	if initdb, err := exec.LookPath("initdb"); err == nil {
		if resolved, err := filepath.EvalSymlinks(initdb); err == nil {
			initdb = resolved
		}
		if dir := filepath.Dir(initdb); hasServerBinaries(dir) {
			return dir, nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int { return majorVersion(b) - majorVersion(a) })
	for _, dir := range dirs {
		if hasServerBinaries(dir) {
			return dir, nil
		}
	}
	return "", errors.New("pgtest: cannot find initdb and pg_ctl (looked in `pg_config --bindir`, PATH and /usr/lib/postgresql/*/bin): " +
		"install the PostgreSQL server (`apt-get install postgresql`)")
}

func hasServerBinaries(dir string) bool {
	for _, name := range []string{"initdb", "pg_ctl"} {
		if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			return false
		}
	}
	return true
}

// majorVersion reads 15 out of /usr/lib/postgresql/15/bin; 0 if it can't.
func majorVersion(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

// runAsCredential is the identity PostgreSQL processes must take: nil for the
// current user, the postgres OS user when running as root, which initdb and
// postgres refuse to run as.
func runAsCredential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("pgtest: running as root, and PostgreSQL refuses to run as root, but there is no %q OS user to run it as (%w): "+
			"install the PostgreSQL server package (`apt-get install postgresql`), which creates it, or run as a non-root user", "postgres", err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("pgtest: postgres user: uid %q: %w", u.Uid, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("pgtest: postgres user: gid %q: %w", u.Gid, err)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// create runs initdb, writes the configuration and starts the server on a
// free port.
func (c *Cluster) create(ctx context.Context, settings map[string]string) error {
	conf, err := renderSettings(c.baseDir, settings)
	if err != nil {
		return err
	}
	if err := c.chown(c.baseDir); err != nil {
		return err
	}
	if out, err := c.command(ctx, "initdb", "-D", c.dataDir, "-U", "postgres", "-A", "trust",
		"--no-sync", "-E", "UTF8", "--locale=C").CombinedOutput(); err != nil {
		return fmt.Errorf("initdb: %w\n%s", err, out)
	}
	// Our settings live in a file of their own, included last so that they
	// win over initdb's; only the port changes between start attempts.
	if err := c.writeFile(filepath.Join(c.dataDir, "haven.conf"), conf); err != nil {
		return err
	}
	pgConf, err := os.OpenFile(filepath.Join(c.dataDir, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open postgresql.conf: %w", err)
	}
	_, err = pgConf.WriteString("\ninclude 'haven.conf'\ninclude 'haven_port.conf'\n")
	if cerr := pgConf.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("append to postgresql.conf: %w", err)
	}
	hba := "local all all trust\n" +
		"local replication all trust\n" +
		"host all all 127.0.0.1/32 trust\n" +
		"host replication all 127.0.0.1/32 trust\n"
	if err := c.writeFile(filepath.Join(c.dataDir, "pg_hba.conf"), hba); err != nil {
		return err
	}

	for attempt := 1; ; attempt++ {
		port, err := freePort()
		if err != nil {
			return err
		}
		c.port.Store(int32(port))
		if err := c.writeFile(filepath.Join(c.dataDir, "haven_port.conf"), fmt.Sprintf("port = %d\n", port)); err != nil {
			return err
		}
		err = c.start(ctx)
		if err == nil {
			return nil
		}
		if !errors.Is(err, errPortInUse) || attempt == startAttempts {
			return err
		}
		c.logf("pgtest %s: port %d was taken, trying another (attempt %d of %d)", c.name, port, attempt+1, startAttempts)
	}
}

// renderSettings is the content of haven.conf: the defaults, then the
// caller's settings in a stable order.
func renderSettings(socketDir string, extra map[string]string) (string, error) {
	var b strings.Builder
	for _, kv := range [][2]string{
		{"listen_addresses", "127.0.0.1"},
		{"unix_socket_directories", socketDir},
		{"wal_level", "logical"},
		{"max_replication_slots", "20"},
		{"max_wal_senders", "20"},
		{"max_connections", "100"},
		{"fsync", "off"},
		{"full_page_writes", "off"},
		{"shared_buffers", "128MB"},
		{"logging_collector", "off"},
	} {
		fmt.Fprintf(&b, "%s = %s\n", kv[0], quoteSetting(kv[1]))
	}
	for _, name := range slices.Sorted(maps.Keys(extra)) {
		value := extra[name]
		switch {
		case !settingName.MatchString(name):
			return "", fmt.Errorf("setting %q: not a parameter name", name)
		case slices.Contains(managedSettings, strings.ToLower(name)):
			return "", fmt.Errorf("setting %q: managed by pgtest", name)
		case strings.ContainsAny(value, "\r\n"):
			return "", fmt.Errorf("setting %q: value contains a line break", name)
		}
		fmt.Fprintf(&b, "%s = %s\n", name, quoteSetting(value))
	}
	return b.String(), nil
}

// quoteSetting quotes a postgresql.conf value; quoted numbers, booleans and
// units are accepted for every parameter type.
func quoteSetting(value string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `''`).Replace(value) + "'"
}

// start runs pg_ctl start on the configured port and waits until the server
// accepts TCP connections. The caller holds c.mu or owns c exclusively.
func (c *Cluster) start(ctx context.Context) error {
	var logOffset int64
	var out []byte
	var err error
	// A process of a killed server may still hold its shared memory for a
	// moment (it exits once it sees the postmaster gone): start again
	// until it lets go.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if fi, serr := os.Stat(c.logFile); serr == nil {
			logOffset = fi.Size()
		}
		out, err = c.command(ctx, "pg_ctl", "start", "-D", c.dataDir, "-l", c.logFile, "-w",
			"-t", strconv.Itoa(int(pgctlTimeout/time.Second)), "-s").CombinedOutput()
		if err == nil || !strings.Contains(c.logTail(logOffset), "pre-existing shared memory block") || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		if kerr := c.kill(); kerr != nil {
			return fmt.Errorf("pg_ctl start on port %d: %w, and stopping the failed attempt: %w", c.Port(), err, kerr)
		}
	}
	if err != nil {
		tail := c.logTail(logOffset)
		// A half-started postmaster must not outlive the failed attempt.
		if kerr := c.kill(); kerr != nil {
			err = errors.Join(err, kerr)
		}
		if strings.Contains(tail, "Address already in use") {
			err = fmt.Errorf("%w: %w", errPortInUse, err)
		}
		return fmt.Errorf("pg_ctl start on port %d: %w: %s\nlast lines of %s:\n%s",
			c.Port(), err, strings.TrimSpace(string(out)), c.logFile, tail)
	}
	return c.waitConnectable(ctx)
}

// waitConnectable polls until a TCP connection succeeds: pg_ctl -w checks
// readiness, but over the Unix socket.
func (c *Cluster) waitConnectable(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		conn, err := pgconn.Connect(ctx, c.URL("postgres"))
		if err == nil {
			return conn.Close(ctx)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("server started but does not accept connections on port %d: %w", c.Port(), err)
		case <-tick.C:
		}
	}
}

// stop runs pg_ctl stop if a postmaster is running. The caller holds c.mu.
func (c *Cluster) stop(ctx context.Context, mode string) error {
	pid, running := c.postmasterPID()
	if !running {
		return nil
	}
	out, err := c.command(ctx, "pg_ctl", "stop", "-D", c.dataDir, "-m", mode, "-w",
		"-t", strconv.Itoa(int(pgctlTimeout/time.Second)), "-s").CombinedOutput()
	if err != nil && processAlive(pid) {
		return fmt.Errorf("pg_ctl stop -m %s: %w: %s", mode, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// kill sends SIGKILL to the postmaster and its children and waits until they
// are gone. The caller holds c.mu or owns c exclusively.
func (c *Cluster) kill() error {
	pid, running := c.postmasterPID()
	if !running {
		return nil
	}
	// Every child of the postmaster calls setsid, so there is no process group
	// to kill. Freeze the postmaster so it forks nothing while we list its
	// children; a killed postmaster's children would otherwise linger, holding
	// the shared memory the next start refuses to reuse.
	_ = syscall.Kill(pid, syscall.SIGSTOP)
	awaitStopped(pid, 5*time.Second)
	procs := append([]int{pid}, childrenOf(pid)...)
	for _, p := range procs {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	if err := awaitExit(procs, 30*time.Second); err != nil {
		return fmt.Errorf("after SIGKILL: %w", err)
	}
	// PostgreSQL discards lock files that name a dead process, but an
	// unreaped zombie postmaster (under a container init that does not reap
	// orphans) still looks alive to it. The processes are gone, so the lock
	// files and the socket are stale: remove them as the next start would.
	stale, _ := filepath.Glob(filepath.Join(c.baseDir, ".s.PGSQL.*"))
	for _, path := range append(stale, filepath.Join(c.dataDir, "postmaster.pid")) {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove stale %s: %w", path, err)
		}
	}
	c.logf("pgtest %s: killed postmaster %d and %d children", c.name, pid, len(procs)-1)
	return nil
}

// awaitStopped waits until pid has stopped on SIGSTOP (or is gone): a
// postmaster still running on another CPU when kill returns can fork one
// more backend, which a list of its children made before that misses, and
// which then holds the shared memory for a moment after the postmaster is
// killed (see start).
func awaitStopped(pid int, timeout time.Duration) {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		state, _, ok := procStat(pid)
		if !ok || state == 'T' || state == 'Z' || state == 'X' {
			return
		}
	}
}

// awaitExit waits until the server processes are gone, at most timeout
// (a pid that now names another program is gone).
func awaitExit(procs []int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, p := range procs {
		for processAlive(p) && isPostgres(p) {
			if time.Now().After(deadline) {
				return fmt.Errorf("process %d still running after %s", p, timeout)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return nil
}

func isPostgres(pid int) bool {
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return err != nil || strings.TrimSpace(string(comm)) == "postgres" // no /proc: assume so
}

// postmasterPID reads the postmaster's pid from postmaster.pid and reports
// whether that process is alive.
func (c *Cluster) postmasterPID() (int, bool) {
	content, err := os.ReadFile(filepath.Join(c.dataDir, "postmaster.pid"))
	if err != nil {
		return 0, false
	}
	first, _, _ := strings.Cut(string(content), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(first))
	if err != nil || pid <= 0 {
		return 0, false
	}
	return pid, processAlive(pid)
}

// processAlive reports whether pid exists and is not a zombie.
func processAlive(pid int) bool {
	if err := syscall.Kill(pid, 0); err != nil && !errors.Is(err, syscall.EPERM) {
		return false
	}
	state, _, ok := procStat(pid)
	if !ok {
		return true // no /proc: trust kill(0)
	}
	return state != 'Z' && state != 'X'
}

// childrenOf lists the processes whose parent is pid, from /proc.
func childrenOf(pid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var children []int
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if _, ppid, ok := procStat(p); ok && ppid == pid {
			children = append(children, p)
		}
	}
	return children
}

// procStat reads a process's state and parent pid from /proc/<pid>/stat.
func procStat(pid int) (state byte, ppid int, ok bool) {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, false
	}
	// "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
	i := strings.LastIndexByte(string(stat), ')')
	if i < 0 {
		return 0, 0, false
	}
	fields := strings.Fields(string(stat[i+1:]))
	if len(fields) < 2 || len(fields[0]) != 1 {
		return 0, 0, false
	}
	ppid, err = strconv.Atoi(fields[1])
	if err != nil {
		return 0, 0, false
	}
	return fields[0][0], ppid, true
}

// command prepares a PostgreSQL binary to run as the cluster's OS user.
func (c *Cluster) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(c.binDir, name), args...)
	cmd.Dir = c.baseDir // the caller's working directory may be closed to the postgres user
	// PG* variables of the caller (PGDATA, PGPORT, PGOPTIONS...) must not leak
	// into the cluster.
	cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "PG") })
	if c.runAs != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.runAs}
	}
	return cmd
}

// writeFile writes a file the server must read, owned by the cluster's user.
func (c *Cluster) writeFile(path, content string) error {
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return c.chown(path)
}

func (c *Cluster) chown(path string) error {
	if c.runAs == nil {
		return nil
	}
	if err := os.Chown(path, int(c.runAs.Uid), int(c.runAs.Gid)); err != nil {
		return fmt.Errorf("chown %s to the postgres user: %w", path, err)
	}
	return nil
}

// logTail returns the last lines the server logged after offset.
func (c *Cluster) logTail(offset int64) string {
	content, err := os.ReadFile(c.logFile)
	if err != nil {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	if offset <= int64(len(content)) {
		content = content[offset:]
	}
	lines := strings.Split(strings.TrimRight(string(content), "\n"), "\n")
	if len(lines) > logTailLines {
		lines = lines[len(lines)-logTailLines:]
	}
	return strings.Join(lines, "\n")
}

// version is the cluster's major version, from PG_VERSION.
func (c *Cluster) version() string {
	v, err := os.ReadFile(filepath.Join(c.dataDir, "PG_VERSION"))
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(v))
}

// freePort asks the kernel for a free loopback port. Another process may take
// it before the server binds it; Start retries on that.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// dirLabel makes name safe and short enough for a directory name; the Unix
// socket path inside that directory must stay under 108 bytes.
func dirLabel(name string) string {
	label := []rune{}
	for _, r := range name {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
			label = append(label, r)
		default:
			label = append(label, '_')
		}
		if len(label) == 24 {
			break
		}
	}
	return string(label)
}
