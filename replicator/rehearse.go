package replicator

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/haven-dr/haven/proto/havenpb"
)

// A promote drill rehearses the promotion on a copy of the DR cluster: the
// standby clones it with pg_basebackup into haven-clone-<group> under
// --drill-dir, starts the clone on a Unix socket there (no TCP port, so no
// client can reach it by mistake; no subscription, archiving, replication
// or preloaded library of the DR cluster runs in it), runs the promotion's
// real steps on it (makePrimary), writes to every table there in a
// transaction it rolls back, and drops the clone. Each step is timed.
//
// What it deletes is only ever that directory, and only when haven made it
// (a marker file in it), under a lock (two standbys sharing --drill-dir
// never delete each other's clone); a server is stopped there only when
// its pid file names that directory as its socket's.
//
// Why pg_basebackup rather than CREATE DATABASE … TEMPLATE: a template copy
// needs every other session off the DR database for the whole copy, the
// applier's and the readers' included; pg_basebackup copies the running
// cluster over a replication connection, consistent through the WAL it
// streams with it, while apply and readers go on. Apply is not even held.
// The cost: a copy of the whole DR cluster on the DR host's disk for the
// drill's length (checked before it starts), and a replication connection
// the DR server must allow.
//
// Not rehearsed, on purpose: the promotion hook and the announcement on
// NATS (both act on production), and draining the stream (the controllers
// predict it from DR's lag).

// rehearsal is a promote drill's progress on this standby, as its
// check-ins report it.
type rehearsal struct {
	id     string
	cancel context.CancelFunc
	ended  chan struct{} // closed once it ended and dropped its clone
	mu     sync.Mutex
	steps  []*havenpb.DrillStep
	done   bool
	err    string
}

func (r *rehearsal) report(req *havenpb.CheckInRequest) {
	r.mu.Lock()
	defer r.mu.Unlock()
	req.DrillId, req.DrillDone, req.DrillError = r.id, r.done, r.err
	req.DrillSteps = slices.Clone(r.steps)
}

// step runs and times one step.
func (r *rehearsal) step(name string, f func() (string, error)) error {
	started := time.Now()
	detail, err := f()
	r.mu.Lock()
	r.steps = append(r.steps, &havenpb.DrillStep{Name: name, Seconds: time.Since(started).Seconds(), Detail: detail})
	r.mu.Unlock()
	return err
}

// rehearse starts or stops the rehearsal the controllers ask for (id; ""
// for none).
func (s *Standby) rehearse(ctx context.Context, id string) {
	s.rehearsalMu.Lock()
	defer s.rehearsalMu.Unlock()
	cur := s.rehearsal
	if cur != nil && cur.id == id {
		return
	}
	if cur != nil {
		cur.cancel() // the drill ended: the clone is dropped
		s.rehearsal = nil
	}
	if id == "" {
		return
	}
	rctx, cancel := context.WithCancel(ctx)
	r := &rehearsal{id: id, cancel: cancel, ended: make(chan struct{})}
	s.rehearsal = r
	s.rehearsals.Go(func() {
		defer close(r.ended)
		if cur != nil {
			<-cur.ended // one clone at a time
		}
		err := s.rehearsePromotion(rctx, r)
		r.mu.Lock()
		r.done = true
		if err != nil {
			r.err = err.Error()
		}
		r.mu.Unlock()
		ev := s.log.Info()
		if err != nil {
			ev = s.log.Error().Err(err)
		}
		ev.Str("drill", id).Msg("promote drill: rehearsal ended, clone dropped")
	})
}

// cloneMarker is the file that says a directory is a promote drill's.
const cloneMarker = "HAVEN_DRILL_CLONE"

// cloneDir is where this standby makes its clones.
func (s *Standby) cloneDir() string {
	return filepath.Join(s.cfg.DrillDir, "haven-clone-"+s.cfg.Group)
}

// lockClones takes the lock on this group's clone directory; release
// unlocks it.
func (s *Standby) lockClones() (release func(), err error) {
	f, err := os.OpenFile(s.cloneDir()+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open the clone lock in --drill-dir: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("another standby of group %s uses --drill-dir %s for a promote drill now", s.cfg.Group, s.cfg.DrillDir)
	}
	return func() { f.Close() }, nil
}

// rehearsePromotion runs a promote drill's steps on a clone of the DR
// cluster, and drops the clone whatever happens.
func (s *Standby) rehearsePromotion(ctx context.Context, r *rehearsal) error {
	if s.cfg.DrillDir == "" {
		return errors.New("the DR site's standby has no --drill-dir: give it a directory on a disk with room for a copy of the DR cluster (not tmpfs)")
	}
	release, err := s.lockClones()
	if err != nil {
		return err
	}
	defer release()
	conn, err := pgx.Connect(ctx, s.cfg.TargetURL)
	if err != nil {
		return fmt.Errorf("connect to the DR database: %w", err)
	}
	var version int
	var db, clusterBytes, dataDir string
	var tablespaces int
	err = conn.QueryRow(ctx, `SELECT current_setting('server_version_num')::int, current_database(),
		(SELECT sum(pg_database_size(oid))::text FROM pg_database),
		(SELECT count(*) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')),
		coalesce((SELECT setting FROM pg_settings WHERE name = 'data_directory'), '')`).Scan(&version, &db, &clusterBytes, &tablespaces, &dataDir)
	conn.Close(context.Background())
	if err != nil {
		return fmt.Errorf("read the DR cluster's version and size: %w", err)
	}
	if tablespaces > 0 {
		return errors.New("the DR cluster has tablespaces of its own: a promote drill cannot clone it into one directory")
	}
	bin, err := serverBinaries(version)
	if err != nil {
		return err
	}
	runAs, err := postgresUser()
	if err != nil {
		return err
	}
	need, _ := strconv.ParseInt(clusterBytes, 10, 64)
	if err := checkDrillDir(s.cfg.DrillDir, dataDir, need, runAs); err != nil {
		return err
	}
	dir := s.cloneDir()
	if err := removeClone(bin, dir, runAs); err != nil {
		return err
	}
	defer func() {
		if err := removeClone(bin, dir, runAs); err != nil {
			s.log.Error().Err(err).Str("dir", dir).Msg("promote drill: could not drop the clone; stop it (pg_ctl stop -m immediate -D dir/data) and remove the directory by hand")
		}
	}()
	if err := os.Mkdir(dir, 0o700); err != nil {
		return fmt.Errorf("create the clone's directory: %w", err)
	}
	if err := writeOwned(filepath.Join(dir, cloneMarker), "a promote drill's clone of the DR cluster; haven deletes this directory\n", nil); err != nil {
		return err
	}
	if runAs != nil {
		if err := os.Chown(dir, int(runAs.Uid), int(runAs.Gid)); err != nil {
			return fmt.Errorf("give the clone's directory to the postgres user: %w", err)
		}
	}
	data := filepath.Join(dir, "data")
	err = r.step("clone the DR cluster", func() (string, error) {
		conninfo, password, err := libpqURL(s.cfg.TargetURL)
		if err != nil {
			return "", err
		}
		args := []string{"-D", data, "-X", "stream", "-c", "fast", "--no-sync", "-d", conninfo}
		if s.cfg.DrillCloneRate != "" {
			args = append(args, "--max-rate", s.cfg.DrillCloneRate)
		}
		cmd := command(ctx, runAs, filepath.Join(bin, "pg_basebackup"), args...)
		if password != "" {
			// Not in the arguments, which every local user can read.
			cmd.Env = append(cmd.Env, "PGPASSWORD="+password)
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			msg := strings.TrimSpace(string(out))
			if strings.Contains(msg, "pg_hba") || strings.Contains(msg, "replication") || strings.Contains(msg, "authentication") {
				msg += " (the DR server must accept a replication connection from this host with --target-url's role: pg_hba.conf, REPLICATION)"
			}
			return "", fmt.Errorf("pg_basebackup: %v: %s", err, msg)
		}
		return fmt.Sprintf("%d MB", need>>20), nil
	})
	if err != nil {
		return err
	}
	// As the applier: the clone has the DR database's settings (read-only
	// by default, any timeouts).
	cfg, err := writerConfig(s.cfg.TargetURL)
	if err != nil {
		return err
	}
	cfg.Host, cfg.Port, cfg.TLSConfig, cfg.Fallbacks = dir, 5432, nil, nil
	var clone *pgx.Conn
	err = r.step("start the clone", func() (string, error) {
		// A Unix socket in the scratch directory only (mode 0700), let in
		// without a password; no archiving, no replication, little memory,
		// and no synchronous standby to wait for: nothing of the clone
		// reaches out. The configuration may live outside the data
		// directory (Debian's /etc/postgresql): the clone gets its own.
		conf := filepath.Join(data, "postgresql.conf")
		hba := filepath.Join(data, "haven_drill_hba.conf")
		ident := filepath.Join(data, "haven_drill_ident.conf")
		for name, content := range map[string]string{hba: "local all all trust\n", ident: ""} {
			if err := writeOwned(name, content, runAs); err != nil {
				return "", err
			}
		}
		if _, err := os.Stat(conf); err != nil {
			if err := writeOwned(conf, "", runAs); err != nil {
				return "", err
			}
		}
		// What ALTER SYSTEM set on DR (a replication source, a preloaded
		// scheduler) stays there.
		if err := writeOwned(filepath.Join(data, "postgresql.auto.conf"), "", runAs); err != nil {
			return "", err
		}
		opts := fmt.Sprintf("-c config_file='%s' -c hba_file='%s' -c ident_file='%s' -c listen_addresses='' -c unix_socket_directories='%s' -c port=5432 "+
			"-c archive_mode=off -c max_wal_senders=0 -c wal_level=minimal -c shared_buffers=128MB -c max_connections=20 "+
			"-c synchronous_standby_names='' -c hot_standby=off -c max_logical_replication_workers=0 -c shared_preload_libraries='' "+
			"-c external_pid_file='' -c logging_collector=off", conf, hba, ident, dir)
		out, err := command(ctx, runAs, filepath.Join(bin, "pg_ctl"), "-D", data, "-w", "-t", strconv.Itoa(int(cloneStart/time.Second)), "-l", filepath.Join(dir, "clone.log"), "-o", opts, "start").CombinedOutput()
		if err != nil {
			log, _ := os.ReadFile(filepath.Join(dir, "clone.log"))
			return "", fmt.Errorf("start the clone: %v: %s %s", err, strings.TrimSpace(string(out)), tail(string(log), 5))
		}
		// Started includes the end of its recovery: until then it takes
		// no connection.
		if clone, err = connectClone(ctx, cfg); err != nil {
			return "", fmt.Errorf("connect to the clone: %w", err)
		}
		return "", nil
	})
	if clone != nil {
		defer clone.Close(context.Background())
	}
	if err != nil {
		return err
	}
	steps := map[string]float64{}
	if err := makePrimary(ctx, clone, s.cfg, 0, 0, steps); err != nil {
		return err
	}
	for _, name := range []string{"sequences", "writable"} {
		r.mu.Lock()
		r.steps = append(r.steps, &havenpb.DrillStep{Name: "promotion: " + name, Seconds: steps[name]})
		r.mu.Unlock()
	}
	return r.step("promotion: a write to every table, rolled back", func() (string, error) {
		// A new session, as a client's: the database's read-only default
		// is gone now.
		delete(cfg.RuntimeParams, "default_transaction_read_only")
		w, err := pgx.ConnectConfig(ctx, cfg)
		if err != nil {
			return "", fmt.Errorf("connect to the promoted clone: %w", err)
		}
		defer w.Close(context.Background())
		return writeEveryTable(ctx, w)
	})
}

// cloneStart bounds how long the clone may take to start, and then to
// finish its recovery.
const cloneStart = 300 * time.Second

// connectClone connects to the started clone. pg_ctl returns once the
// clone's recovery is consistent, and with hot_standby off it refuses
// connections (57P03) until it has replayed the rest of the WAL written
// while it was copied: that is waited for, as long as pg_ctl would wait.
func connectClone(ctx context.Context, cfg *pgx.ConnConfig) (*pgx.Conn, error) {
	deadline := time.Now().Add(cloneStart)
	for {
		conn, err := pgx.ConnectConfig(ctx, cfg)
		var pgErr *pgconn.PgError
		if err == nil || !errors.As(err, &pgErr) || pgErr.Code != "57P03" || time.Now().After(deadline) {
			return conn, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// writeEveryTable rewrites one row of every user table to itself, in a
// transaction it rolls back: the promoted database takes writes
// everywhere (no read-only default, guard, lock or trigger in the way).
func writeEveryTable(ctx context.Context, conn *pgx.Conn) (string, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return "", err
	}
	defer tx.Rollback(context.Background())
	rows, err := tx.Query(ctx, `SELECT format('%I.%I', n.nspname, c.relname), c.relkind = 'p',
		(SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
			AND attidentity <> 'a' ORDER BY attnum LIMIT 1)
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'haven')
		AND n.nspname NOT LIKE 'pg\_%' ORDER BY 1`)
	if err != nil {
		return "", fmt.Errorf("list the tables: %w", err)
	}
	type table struct {
		name        string
		partitioned bool
		col         *string
	}
	tables, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (table, error) {
		var t table
		err := row.Scan(&t.name, &t.partitioned, &t.col)
		return t, err
	})
	if err != nil {
		return "", fmt.Errorf("list the tables: %w", err)
	}
	written, empty := 0, 0
	for _, t := range tables {
		if t.col == nil {
			continue
		}
		only := "ONLY "
		if t.partitioned {
			only = ""
		}
		tag, err := tx.Exec(ctx, fmt.Sprintf(`UPDATE %s%s SET %s = %s WHERE ctid = (SELECT ctid FROM %s%s LIMIT 1)`, only, t.name, *t.col, *t.col, only, t.name))
		if err != nil {
			return "", fmt.Errorf("write to %s: %w", t.name, err)
		}
		if tag.RowsAffected() == 0 {
			empty++
		} else {
			written++
		}
	}
	return fmt.Sprintf("%d tables written, %d empty", written, empty), nil
}

// serverBinaries finds the bin directory of the DR server's major version:
// pg_basebackup, and pg_ctl and postgres to run its clone.
func serverBinaries(serverVersion int) (string, error) {
	major := serverVersion / 10000
	var dirs []string
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		dirs = append(dirs, strings.TrimSpace(string(out)))
	}
	dirs = append(dirs, fmt.Sprintf("/usr/lib/postgresql/%d/bin", major))
	for _, d := range dirs {
		out, err := exec.Command(filepath.Join(d, "postgres"), "--version").Output()
		if err != nil {
			continue
		}
		fields := strings.Fields(string(out))
		if len(fields) > 0 && strings.HasPrefix(fields[len(fields)-1], strconv.Itoa(major)+".") {
			if _, err := os.Stat(filepath.Join(d, "pg_basebackup")); err == nil {
				return d, nil
			}
		}
	}
	return "", fmt.Errorf("a promote drill needs PostgreSQL %d's server binaries (pg_basebackup, pg_ctl, postgres) on the DR host: install them (apt-get install postgresql-%d), looked in %v", major, major, dirs)
}

// postgresUser is who runs the clone: this process's user, or, as root
// (which PostgreSQL refuses), the postgres OS user.
func postgresUser() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root, a promote drill runs its clone as the postgres OS user, and there is none: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

func command(ctx context.Context, runAs *syscall.Credential, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	// pg_basebackup dies with the standby, not to write into a directory
	// the next standby clears; stopped, it goes with its own children (the
	// WAL streamer it forks), which would keep its output open.
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: runAs, Pdeathsig: syscall.SIGKILL, Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	cmd.Env = append(os.Environ(), "PGAPPNAME=haven_drill")
	return cmd
}

// removeClone stops the clone in dir, if one runs there, and removes dir:
// only a directory with haven's marker, and only a server whose pid file
// names dir as its socket directory.
func removeClone(bin, dir string, runAs *syscall.Credential) error {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if _, err := os.Stat(filepath.Join(dir, cloneMarker)); err != nil {
		return fmt.Errorf("%s is not a promote drill's clone (no %s file in it): haven leaves it alone; move it out of --drill-dir", dir, cloneMarker)
	}
	data := filepath.Join(dir, "data")
	if pid, err := os.ReadFile(filepath.Join(data, "postmaster.pid")); err == nil {
		// Line 5 of a pid file is the socket directory.
		lines := strings.Split(string(pid), "\n")
		if len(lines) < 5 || lines[4] != dir {
			return fmt.Errorf("%s/postmaster.pid is not the clone's (socket directory %q): haven does not stop that server", data, lines[min(4, len(lines)-1)])
		}
		out, err := command(context.Background(), runAs, filepath.Join(bin, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop").CombinedOutput()
		if err != nil && !strings.Contains(string(out), "No such process") && !strings.Contains(string(out), "is not running") {
			return fmt.Errorf("stop the clone in %s: %v: %s", data, err, out)
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove the clone in %s: %w", dir, err)
	}
	return nil
}

// checkDrillDir refuses a --drill-dir that is missing, closed to the user
// the clone runs as, in memory (tmpfs),
// inside the DR data directory or holding it, or without room for a copy
// of the DR cluster (need bytes) and the WAL written meanwhile; on the DR
// data directory's own filesystem, with half as much again to spare.
func checkDrillDir(drillDir, dataDir string, need int64, runAs *syscall.Credential) error {
	fi, err := os.Stat(drillDir)
	if err != nil || !fi.IsDir() {
		return fmt.Errorf("--drill-dir %s is not a directory: create it on a disk with room for a copy of the DR cluster", drillDir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && runAs != nil {
		mode := fi.Mode().Perm()
		if !(st.Uid == runAs.Uid && mode&0o100 != 0) && !(st.Gid == runAs.Gid && mode&0o010 != 0) && mode&0o001 == 0 {
			return fmt.Errorf("--drill-dir %s is closed to the postgres OS user, who runs the clone: chown it to postgres, or chmod o+x it", drillDir)
		}
	}
	if dataDir != "" && (within(drillDir, dataDir) || within(dataDir, drillDir)) {
		return fmt.Errorf("--drill-dir %s and the DR data directory %s hold one another: use a directory of its own", drillDir, dataDir)
	}
	var fs syscall.Statfs_t
	if err := syscall.Statfs(drillDir, &fs); err != nil {
		return fmt.Errorf("read the free space of --drill-dir %s: %w", drillDir, err)
	}
	const tmpfsMagic = 0x01021994
	if fs.Type == tmpfsMagic {
		return fmt.Errorf("--drill-dir %s is in memory (tmpfs): a copy of the DR cluster would take RAM from the DR server; use a directory on disk", drillDir)
	}
	want := need + need/5 + 256<<20
	if dataDir != "" {
		if d, err := os.Stat(dataDir); err == nil && sameDevice(fi, d) {
			want = need + need/2 + 1<<30
		}
	}
	if free := int64(fs.Bavail) * fs.Bsize; free < want {
		return fmt.Errorf("--drill-dir %s has %d MB free; a copy of the DR cluster needs about %d MB there", drillDir, free>>20, want>>20)
	}
	return nil
}

// within reports whether path is dir or inside it.
func within(path, dir string) bool {
	rel, err := filepath.Rel(filepath.Clean(dir), filepath.Clean(path))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

func sameDevice(a, b os.FileInfo) bool {
	sa, ok1 := a.Sys().(*syscall.Stat_t)
	sb, ok2 := b.Sys().(*syscall.Stat_t)
	return ok1 && ok2 && sa.Dev == sb.Dev
}

// libpqURL is --target-url as pg_basebackup takes it: without the password
// (returned apart) and without the run-time settings pgx passes on but
// libpq refuses.
func libpqURL(target string) (string, string, error) {
	u, err := url.Parse(target)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return "", "", errors.New("a promote drill needs --target-url as a postgres:// URL")
	}
	password, _ := u.User.Password()
	if u.User != nil {
		u.User = url.User(u.User.Username())
	}
	q := u.Query()
	for k := range q {
		if !libpqParams[k] {
			q.Del(k)
		}
	}
	u.RawQuery = q.Encode()
	return u.String(), password, nil
}

var libpqParams = map[string]bool{"host": true, "hostaddr": true, "port": true, "user": true, "sslmode": true, "sslrootcert": true,
	"sslcert": true, "sslkey": true, "sslcrl": true, "sslpassword": true, "connect_timeout": true, "keepalives": true,
	"keepalives_idle": true, "gssencmode": true, "krbsrvname": true, "channel_binding": true, "service": true, "passfile": true}

// dropLeftoverClone drops a clone a standby that died mid-drill left in
// --drill-dir.
func (s *Standby) dropLeftoverClone() {
	dir := s.cloneDir()
	if s.cfg.DrillDir == "" {
		return
	}
	if _, err := os.Stat(dir); err != nil {
		return
	}
	release, err := s.lockClones()
	if err != nil {
		return // a drill of another standby of the group is under way
	}
	defer release()
	major := 0
	if version, err := os.ReadFile(filepath.Join(dir, "data", "PG_VERSION")); err == nil {
		major, _ = strconv.Atoi(strings.TrimSpace(string(version)))
	}
	bin, err := "", error(nil)
	if major > 0 {
		bin, err = serverBinaries(major * 10000)
	}
	var runAs *syscall.Credential
	if err == nil {
		if runAs, err = postgresUser(); err == nil {
			err = removeClone(bin, dir, runAs)
		}
	}
	if err != nil {
		s.log.Error().Err(err).Str("dir", dir).Msg("a promote drill's clone is left in --drill-dir and could not be dropped: stop it (pg_ctl stop -m immediate -D dir/data) and remove it by hand")
		return
	}
	s.log.Warn().Str("dir", dir).Msg("dropped what a promote drill left in --drill-dir (the standby stopped during the drill)")
}

func writeOwned(name, content string, runAs *syscall.Credential) error {
	if err := os.WriteFile(name, []byte(content), 0o600); err != nil {
		return fmt.Errorf("write the clone's %s: %w", filepath.Base(name), err)
	}
	if runAs != nil {
		return os.Chown(name, int(runAs.Uid), int(runAs.Gid))
	}
	return nil
}

func tail(s string, lines int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(l[max(0, len(l)-lines):], "\n")
}
