package fence

import (
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/haven-dr/haven/internal/pgtest"
)

// TestFenceEndsEverySessionButThoseKept: when FenceKeeping returns, each of
// the database's sessions is gone (an open transaction's row with it), but
// the one kept; no new session gets in; Lift lets them in again.
func TestFenceEndsEverySessionButThoseKept(t *testing.T) {
	pg := pgtest.New(t)
	ctx := t.Context()
	const db = "crm"
	if err := pg.CreateDatabase(ctx, db); err != nil {
		t.Fatal(err)
	}
	if err := pg.Exec(ctx, db, `CREATE TABLE notes (id int)`); err != nil {
		t.Fatal(err)
	}
	sessions := openSessions(t, pg.URL(db), 20)
	writer, err := sessions[0].Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := writer.Exec(ctx, `INSERT INTO notes VALUES (1)`); err != nil {
		t.Fatal(err)
	}
	kept := connectAs(t, pg.URL(db), "haven_agent_crm")

	if err := FenceKeeping(ctx, pg.URL(db), "haven_agent_crm"); err != nil {
		t.Fatal(err)
	}
	left := 0
	for _, s := range sessions {
		if s.Ping(ctx) == nil {
			left++
		}
	}
	if left > 0 {
		t.Errorf("%d of %d sessions still answer after the fence", left, len(sessions))
	}
	var notes int
	if err := kept.QueryRow(ctx, `SELECT count(*) FROM notes`).Scan(&notes); err != nil {
		t.Fatalf("the kept session: %v", err)
	}
	if notes != 0 {
		t.Errorf("the ended session's open transaction left %d rows", notes)
	}
	if c, err := pgx.Connect(ctx, pg.URL(db)); err == nil {
		c.Close(ctx)
		t.Error("a new session got into the fenced database")
	}

	if err := Lift(ctx, pg.URL(db)); err != nil {
		t.Fatal(err)
	}
	connectAs(t, pg.URL(db), "after")
}

// TestFenceSaysWhenASessionDoesNotEnd: a session that cannot take its end
// (its backend stopped here with SIGSTOP) could still commit, so the fence
// reports itself incomplete rather than done.
func TestFenceSaysWhenASessionDoesNotEnd(t *testing.T) {
	pg := pgtest.New(t)
	ctx := t.Context()
	const db = "crm"
	if err := pg.CreateDatabase(ctx, db); err != nil {
		t.Fatal(err)
	}
	stuck := openSessions(t, pg.URL(db), 1)[0]
	pid := int(stuck.PgConn().PID())
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGCONT) })
	within := sessionsEndWithin
	sessionsEndWithin = 200 * time.Millisecond
	t.Cleanup(func() { sessionsEndWithin = within })

	err := Fence(ctx, pg.URL(db))
	if err == nil || !strings.Contains(err.Error(), "1 of the 1 sessions ended are still there") {
		t.Fatalf("fence with a session that did not end: %v", err)
	}
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if err := Fence(ctx, pg.URL(db)); err != nil {
		t.Fatalf("fence once the session could end: %v", err)
	}
}

func openSessions(t *testing.T, url string, n int) []*pgx.Conn {
	t.Helper()
	conns := make([]*pgx.Conn, n)
	for i := range conns {
		conns[i] = connectAs(t, url, "crm")
	}
	return conns
}

func connectAs(t *testing.T, url, application string) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["application_name"] = application
	conn, err := pgx.ConnectConfig(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}
