// Package fence stops, and lets again, every write to a PostgreSQL
// database, in a way no client can undo and that outlives a restart: the
// agent of a deposed or lease-less primary fences its own database, and the
// controllers fence an old primary they find reachable again.
//
// A fence is
//   - ALTER SYSTEM SET default_transaction_read_only = on (reloaded), and the
//     same as the database's default, so that clients with
//     target_session_attrs=read-write skip the node;
//   - ALTER DATABASE … ALLOW_CONNECTIONS false, and the database's sessions
//     ended: no client can undo that with SET.
package fence

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// IsFenced reports whether the database of url is fenced.
func IsFenced(ctx context.Context, url string) (bool, error) {
	conn, db, err := maintenanceConn(ctx, url)
	if err != nil {
		return false, err
	}
	defer conn.Close(context.Background())
	var allow bool
	if err := conn.QueryRow(ctx, `SELECT datallowconn FROM pg_database WHERE datname = $1`, db).Scan(&allow); err != nil {
		return false, fmt.Errorf("read the fence state of %q: %w", db, err)
	}
	return !allow, nil
}

// Ping checks that the server of url answers, through its postgres
// database (a fenced database takes no connections), and returns when the
// server started.
func Ping(ctx context.Context, url string) (time.Time, error) {
	conn, _, err := maintenanceConn(ctx, url)
	if err != nil {
		return time.Time{}, err
	}
	defer conn.Close(context.Background())
	var started time.Time
	err = conn.QueryRow(ctx, `SELECT pg_postmaster_start_time()`).Scan(&started)
	return started, err
}

// maintenanceConn connects to the source server's postgres database: a
// fenced database takes no connections.
func maintenanceConn(ctx context.Context, sourceURL string) (*pgx.Conn, string, error) {
	cfg, err := pgx.ParseConfig(sourceURL)
	if err != nil {
		return nil, "", err
	}
	db := cfg.Database
	cfg.Database = "postgres"
	cfg.RuntimeParams["default_transaction_read_only"] = "off"
	// A fenced primary in synchronous mode has no synchronous standby.
	cfg.RuntimeParams["synchronous_commit"] = "local"
	cfg.RuntimeParams["application_name"] = "haven_fence"
	cfg.ConnectTimeout = 5 * time.Second
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, "", fmt.Errorf("connect to the postgres database of the source server: %w", err)
	}
	return conn, db, nil
}

// Fence stops every write to the database of sourceURL, persistently. It
// needs a superuser.
func Fence(ctx context.Context, sourceURL string) error { return FenceKeeping(ctx, sourceURL) }

// FenceKeeping fences like Fence but leaves the sessions whose
// application_name is one of keep (for a switchover, the agent's own: its
// capture drains what was committed before the fence).
func FenceKeeping(ctx context.Context, sourceURL string, keep ...string) error {
	s, err := Connect(ctx, sourceURL)
	if err != nil {
		return err
	}
	defer s.Close()
	return s.FenceKeeping(ctx, keep...)
}

// Session is a connection from which to fence a database, opened ahead
// when writes wait for the fence (a switchover's).
type Session struct {
	conn *pgx.Conn
	db   string
}

// Connect opens a Session for the database of sourceURL.
func Connect(ctx context.Context, sourceURL string) (*Session, error) {
	conn, db, err := maintenanceConn(ctx, sourceURL)
	if err != nil {
		return nil, err
	}
	return &Session{conn: conn, db: db}, nil
}

// Close ends the session.
func (s *Session) Close() { _ = s.conn.Close(context.Background()) }

// FenceKeeping is FenceKeeping on the session's database.
func (s *Session) FenceKeeping(ctx context.Context, keep ...string) error {
	keep = append([]string{}, keep...) // an empty array, never NULL
	return s.run(ctx, "fence", func(db string) []string {
		return []string{
			`ALTER SYSTEM SET default_transaction_read_only = on`,
			`SELECT pg_reload_conf()`,
			`ALTER DATABASE ` + db + ` ALLOW_CONNECTIONS false`,
			`ALTER DATABASE ` + db + ` SET default_transaction_read_only = on`,
		}
	}, func(ctx context.Context, conn *pgx.Conn, db string) error {
		return endSessions(ctx, conn, db, keep)
	})
}

// sessionsEndWithin bounds the wait for the sessions a fence ended. (A
// variable for tests.)
var sessionsEndWithin = 5 * time.Second

// endSessions ends the sessions of database db but those whose
// application_name is in keep (the fence's own session is in another
// database), and waits until they are gone: a session in the middle of a
// commit has finished it, or is gone, when the fence is in place. They are
// signalled all at once and waited for together: pg_terminate_backend's
// own wait looks every 100 ms, one session after the other, which made a
// fence of 50 sessions take 5 s.
func endSessions(ctx context.Context, conn *pgx.Conn, db string, keep []string) error {
	var ended []int32
	if err := conn.QueryRow(ctx, `WITH s AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()
			AND NOT coalesce(application_name, '') = ANY($2))
		SELECT coalesce(array_agg(pid) FILTER (WHERE pg_terminate_backend(pid)), '{}') FROM s`, db, keep).Scan(&ended); err != nil {
		return err
	}
	deadline := time.Now().Add(sessionsEndWithin)
	for len(ended) > 0 {
		var left int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)`, ended).Scan(&left); err != nil {
			return err
		}
		if left == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of the %d sessions ended are still there after %s (stuck in a system call?); "+
				"they could still commit, so the fence is not complete", left, len(ended), sessionsEndWithin)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
	return nil
}

// Lift undoes Fence.
func Lift(ctx context.Context, sourceURL string) error {
	return run(ctx, sourceURL, "lift the fence of", func(db string) []string {
		return []string{
			`ALTER DATABASE ` + db + ` RESET default_transaction_read_only`,
			`ALTER DATABASE ` + db + ` ALLOW_CONNECTIONS true`,
			`ALTER SYSTEM RESET default_transaction_read_only`,
			`SELECT pg_reload_conf()`,
		}
	}, nil)
}

// Reopen lets connections in again but keeps the database read-only by
// default, as a DR database is: a deposed primary about to become a
// standby, whose agent must read its slot and whose standby must load it.
func Reopen(ctx context.Context, sourceURL string) error {
	return run(ctx, sourceURL, "reopen", func(db string) []string {
		return []string{
			`ALTER DATABASE ` + db + ` SET default_transaction_read_only = on`,
			`ALTER DATABASE ` + db + ` ALLOW_CONNECTIONS true`,
			`ALTER SYSTEM RESET default_transaction_read_only`,
			`SELECT pg_reload_conf()`,
		}
	}, nil)
}

// run executes, from the server's postgres database, the statements made
// for the database of sourceURL (its quoted name), then finish if any.
func run(ctx context.Context, sourceURL, what string, statements func(db string) []string,
	finish func(ctx context.Context, conn *pgx.Conn, db string) error) error {
	s, err := Connect(ctx, sourceURL)
	if err != nil {
		return err
	}
	defer s.Close()
	return s.run(ctx, what, statements, finish)
}

func (s *Session) run(ctx context.Context, what string, statements func(db string) []string,
	finish func(ctx context.Context, conn *pgx.Conn, db string) error) error {
	for _, sql := range statements(pgx.Identifier{s.db}.Sanitize()) {
		if _, err := s.conn.Exec(ctx, sql); err != nil {
			return fmt.Errorf("%s %q (%s): %w", what, s.db, sql, err)
		}
	}
	if finish != nil {
		if err := finish(ctx, s.conn, s.db); err != nil {
			return fmt.Errorf("%s %q: end its sessions: %w", what, s.db, err)
		}
	}
	return nil
}
