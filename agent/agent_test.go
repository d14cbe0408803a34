package agent

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/haven-dr/haven/internal/natstest"
	"github.com/haven-dr/haven/internal/pgtest"
	"github.com/haven-dr/haven/internal/testlog"
	"github.com/haven-dr/haven/proto/wire"
)

type running struct {
	cancel context.CancelFunc
	done   chan error
	logs   *testlog.Buffer
	reg    *prometheus.Registry
}

// startAgent runs an agent in-process until the test ends.
func startAgent(t *testing.T, cfg Config) *running {
	t.Helper()
	logs := testlog.New(t)
	reg := prometheus.NewRegistry()
	a, err := New(cfg, zerolog.New(logs), reg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel, done: make(chan error, 1), logs: logs, reg: reg}
	go func() { r.done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(20 * time.Second):
			t.Error("agent did not stop within 20s")
		}
	})
	return r
}

// runToError runs an agent that must stop by itself with an operator error.
func runToError(t *testing.T, cfg Config) error {
	t.Helper()
	r := startAgent(t, cfg)
	select {
	case err := <-r.done:
		r.done <- err // for the cleanup
		if !IsOperatorError(err) {
			t.Errorf("error %v is not marked as needing an operator", err)
		}
		return err
	case <-time.After(60 * time.Second):
		t.Fatal("agent kept running; it should have stopped with an error")
		return nil
	}
}

func testConfig(sourceURL, natsURL string) Config {
	cfg := DefaultConfig()
	cfg.SourceURL, cfg.NATSURL, cfg.Group = sourceURL, natsURL, "crm"
	cfg.HeartbeatInterval = 200 * time.Millisecond
	cfg.StatusInterval = 100 * time.Millisecond
	cfg.PublishTimeout = 2 * time.Second
	return cfg
}

func execSQL(t *testing.T, url, sql string, args ...any) {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(t.Context(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func queryInt(t *testing.T, url, sql string, args ...any) int64 {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int64
	if err := conn.QueryRow(t.Context(), sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func assertContains(t *testing.T, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want one mentioning %q", parts)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not mention %q", err, p)
		}
	}
}

// One cluster serves the refusal cases, each in its own database.
func TestRefusesWhatOnlyAnOperatorCanFix(t *testing.T) {
	pg := pgtest.New(t)
	nats := natstest.New(t)
	ctx := t.Context()

	t.Run("wal_level", func(t *testing.T) {
		replicaLevel := pgtest.NewWith(t, pgtest.Options{Name: "replica", Settings: map[string]string{"wal_level": "replica"}})
		err := runToError(t, testConfig(replicaLevel.URL("postgres"), nats.URL()))
		assertContains(t, err, `wal_level is "replica"`, "ALTER SYSTEM SET wal_level = logical", "restart PostgreSQL")
	})

	t.Run("replication privilege", func(t *testing.T) {
		if err := pg.CreateDatabase(ctx, "noprivs"); err != nil {
			t.Fatal(err)
		}
		execSQL(t, pg.URL("noprivs"), `CREATE ROLE app LOGIN`)
		url := strings.Replace(pg.URL("noprivs"), "postgres@", "app@", 1)
		err := runToError(t, testConfig(url, nats.URL()))
		assertContains(t, err, `role "app" may not use replication`, `ALTER ROLE "app" REPLICATION`)
	})

	t.Run("table without identity", func(t *testing.T) {
		if err := pg.CreateDatabase(ctx, "noident"); err != nil {
			t.Fatal(err)
		}
		url := pg.URL("noident")
		execSQL(t, url, `CREATE TABLE good (id int PRIMARY KEY); CREATE TABLE audit_log (at timestamptz, line text);
			CREATE TABLE "Odd Name" (v int); ALTER TABLE "Odd Name" REPLICA IDENTITY NOTHING;
			CREATE TABLE deferred (id int PRIMARY KEY DEFERRABLE)`)
		err := runToError(t, testConfig(url, nats.URL()))
		assertContains(t, err, "public.audit_log", "public.Odd Name", "ADD PRIMARY KEY", "REPLICA IDENTITY FULL", "--tables",
			"the primary key of public.deferred is DEFERRABLE")
		// Never added to a publication, so the primary's own UPDATEs keep working.
		if n := queryInt(t, url, `SELECT count(*) FROM pg_publication`); n != 0 {
			t.Errorf("%d publications exist after the refusal, want 0", n)
		}
		execSQL(t, url, `INSERT INTO audit_log VALUES (now(), 'x'); UPDATE audit_log SET line = 'y'`)
		// Excluding them with --tables works.
		cfg := testConfig(url, nats.URL())
		cfg.Tables = []string{"good"}
		r := startAgent(t, cfg)
		waitFor(t, 30*time.Second, "the agent to stream", func() bool { return r.logs.Count("streaming changes") == 1 })
	})

	t.Run("replica identity set on request", func(t *testing.T) {
		cfg := testConfig(pg.URL("noident"), nats.URL())
		cfg.Group = "setfull"
		cfg.SetReplicaIdentityFull = true
		r := startAgent(t, cfg)
		waitFor(t, 30*time.Second, "the agent to stream", func() bool { return r.logs.Count("streaming changes") == 1 })
		if n := r.logs.Count("set REPLICA IDENTITY FULL on it"); n != 3 {
			t.Errorf("the agent said %d times that it set REPLICA IDENTITY FULL, want once per table (3)", n)
		}
		if n := queryInt(t, pg.URL("noident"), `SELECT count(*) FROM pg_class WHERE relname IN ('audit_log', 'Odd Name', 'deferred') AND relreplident = 'f'`); n != 3 {
			t.Errorf("%d of the 3 tables have REPLICA IDENTITY FULL", n)
		}
	})

	t.Run("table the role may not read", func(t *testing.T) {
		if err := pg.CreateDatabase(ctx, "noselect"); err != nil {
			t.Fatal(err)
		}
		execSQL(t, pg.URL("noselect"), `CREATE ROLE reader LOGIN REPLICATION; GRANT CREATE ON DATABASE noselect TO reader; GRANT CREATE ON SCHEMA public TO reader`)
		url := strings.Replace(pg.URL("noselect"), "postgres@", "reader@", 1)
		execSQL(t, pg.URL("noselect"), `CREATE SCHEMA priv; GRANT USAGE, CREATE ON SCHEMA priv TO reader`)
		execSQL(t, url, `CREATE TABLE readable (id int PRIMARY KEY); CREATE TABLE secret (id int PRIMARY KEY, pin text); REVOKE SELECT ON secret FROM reader;
			CREATE TABLE priv.hidden (id int PRIMARY KEY)`)
		execSQL(t, pg.URL("noselect"), `REVOKE USAGE ON SCHEMA priv FROM reader`)
		cfg := testConfig(url, nats.URL())
		cfg.Group = "noselect"
		assertContains(t, runToError(t, cfg), `role "reader" may not read every column of public.secret`, `GRANT SELECT ON public.secret TO "reader"`,
			`GRANT USAGE ON SCHEMA priv TO "reader"`)
	})

	t.Run("snapshot taken over under row-level security", func(t *testing.T) {
		// A slot whose snapshot never completed (here: made by hand) is
		// dropped and the snapshot taken again: under policies that apply
		// to the agent's role, it would copy only the rows they show.
		if err := pg.CreateDatabase(ctx, "takeover"); err != nil {
			t.Fatal(err)
		}
		execSQL(t, pg.URL("takeover"), `CREATE ROLE taker LOGIN REPLICATION; GRANT CREATE ON DATABASE takeover TO taker; GRANT CREATE ON SCHEMA public TO taker`)
		url := strings.Replace(pg.URL("takeover"), "postgres@", "taker@", 1)
		execSQL(t, url, `CREATE TABLE notes (id int PRIMARY KEY, owner text); INSERT INTO notes SELECT g, 'someone' FROM generate_series(1, 10) g;
			ALTER TABLE notes ENABLE ROW LEVEL SECURITY; ALTER TABLE notes FORCE ROW LEVEL SECURITY; CREATE POLICY mine ON notes USING (owner = current_user)`)
		execSQL(t, pg.URL("takeover"), `SELECT pg_create_logical_replication_slot('`+wire.SlotName("takeover")+`', 'pgoutput')`)
		cfg := testConfig(url, nats.URL())
		cfg.Group = "takeover"
		assertContains(t, runToError(t, cfg), `row-level security applies to the agent's role "taker" on public.notes`, "BYPASSRLS")
	})

	t.Run("DDL capture without the group", func(t *testing.T) {
		if err := pg.CreateDatabase(ctx, "unrecorded"); err != nil {
			t.Fatal(err)
		}
		execSQL(t, pg.URL("unrecorded"), ddlCaptureSQL)
		execSQL(t, pg.URL("unrecorded"), `CREATE ROLE capturer LOGIN REPLICATION; GRANT CREATE ON DATABASE unrecorded TO capturer; GRANT CREATE ON SCHEMA public TO capturer`)
		url := strings.Replace(pg.URL("unrecorded"), "postgres@", "capturer@", 1)
		execSQL(t, url, `CREATE TABLE t (id int PRIMARY KEY)`)
		cfg := testConfig(url, nats.URL())
		cfg.Group = "unrecorded"
		assertContains(t, runToError(t, cfg), `group "unrecorded" is not recorded in haven.groups`, "haven agent --print-ddl-capture")
		script, err := DDLCaptureSQL(cfg)
		if err != nil {
			t.Fatal(err)
		}
		execSQL(t, pg.URL("unrecorded"), script)
		r := startAgent(t, cfg)
		waitFor(t, 30*time.Second, "the agent to stream", func() bool { return r.logs.Count("streaming changes") == 1 })
		if _, err := DDLCaptureSQL(Config{Group: "g"}); err == nil || !strings.Contains(err.Error(), "--source-url") {
			t.Errorf("DDLCaptureSQL without a source URL: %v, want an error naming --source-url", err)
		}
	})

	t.Run("growing --tables without owning them", func(t *testing.T) {
		// A superuser's agent made the publication; the agent runs as a
		// role of its own afterwards, and its --tables grows.
		if err := pg.CreateDatabase(ctx, "grow"); err != nil {
			t.Fatal(err)
		}
		execSQL(t, pg.URL("grow"), `CREATE ROLE grower LOGIN REPLICATION; CREATE ROLE crm_app; CREATE TABLE a (id int PRIMARY KEY);
			CREATE TABLE b (id int PRIMARY KEY); ALTER TABLE b OWNER TO grower; INSERT INTO b VALUES (1);
			CREATE TABLE c (id int PRIMARY KEY); ALTER TABLE c OWNER TO crm_app; GRANT SELECT ON a, c TO grower`)
		cfg := testConfig(pg.URL("grow"), nats.URL())
		cfg.Group, cfg.Tables = "grow", []string{"a"}
		first := startAgent(t, cfg)
		waitFor(t, 30*time.Second, "the superuser's agent to stream", func() bool { return first.logs.Count("streaming changes") == 1 })
		first.cancel()
		<-first.done
		first.done <- nil
		execSQL(t, pg.URL("grow"), `GRANT USAGE ON SCHEMA haven TO grower; GRANT SELECT ON ALL TABLES IN SCHEMA haven TO grower`)
		cfg.SourceURL, cfg.Tables = strings.Replace(pg.URL("grow"), "postgres@", "grower@", 1), []string{"a", "b"}
		assertContains(t, runToError(t, cfg), `add public.b to publication "haven_grow"`, "the publication belongs to postgres", "haven agent --print-ddl-capture")
		script, err := DDLCaptureSQL(cfg)
		if err != nil {
			t.Fatal(err)
		}
		execSQL(t, pg.URL("grow"), script)
		cfg.Tables = []string{"a", "b", "c"}
		err = runToError(t, cfg)
		assertContains(t, err, `add public.c to publication "haven_grow"`, `the table belongs to crm_app: GRANT crm_app TO grower`)
		if strings.Contains(err.Error(), "the publication belongs") {
			t.Errorf("the publication is the agent's now, yet the error says otherwise: %v", err)
		}
	})

	t.Run("unknown table", func(t *testing.T) {
		cfg := testConfig(pg.URL("postgres"), nats.URL())
		cfg.Tables = []string{"nope"}
		assertContains(t, runToError(t, cfg), `table "nope"`, "does not exist")
	})

	t.Run("invalidated slot", func(t *testing.T) {
		if err := pg.CreateDatabase(ctx, "lost"); err != nil {
			t.Fatal(err)
		}
		url := pg.URL("lost")
		execSQL(t, url, `CREATE TABLE t (id int PRIMARY KEY)`)
		cfg := testConfig(url, nats.URL())
		cfg.Group = "lost"
		first := startAgent(t, cfg)
		waitFor(t, 30*time.Second, "the agent to stream", func() bool { return first.logs.Count("streaming changes") == 1 })
		first.cancel()
		<-first.done
		first.done <- nil
		// Invalidate the slot the way max_slot_wal_keep_size does.
		execSQL(t, url, `ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'`)
		execSQL(t, url, `SELECT pg_reload_conf()`)
		for i := range 6 {
			execSQL(t, url, `INSERT INTO t SELECT g FROM generate_series($1::int, $1::int + 20000) g`, i*100000)
			execSQL(t, url, `SELECT pg_switch_wal()`)
			execSQL(t, url, `CHECKPOINT`)
		}
		waitFor(t, 30*time.Second, "the slot to be invalidated", func() bool {
			return queryInt(t, url, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'haven_lost' AND wal_status = 'lost'`) == 1
		})
		err := runToError(t, cfg)
		assertContains(t, err, `slot "haven_lost" was invalidated`, "pg_drop_replication_slot('haven_lost')", "fresh snapshot")
		execSQL(t, url, `ALTER SYSTEM RESET max_slot_wal_keep_size`)
		execSQL(t, url, `SELECT pg_reload_conf()`)
	})
}

func closedPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return port
}

func TestRetriesWhileServersAreUnreachable(t *testing.T) {
	nats := natstest.New(t)
	t.Run("PostgreSQL", func(t *testing.T) {
		r := startAgent(t, testConfig(fmt.Sprintf("postgres://postgres@127.0.0.1:%d/crm?connect_timeout=2", closedPort(t)), nats.URL()))
		waitFor(t, 30*time.Second, "two retries", func() bool { return r.logs.Count("retrying") >= 2 })
		if r.logs.Count("connect to source database") < 2 {
			t.Error("the log does not say the source database is unreachable")
		}
	})
	t.Run("NATS", func(t *testing.T) {
		pg := pgtest.New(t)
		r := startAgent(t, testConfig(pg.URL("postgres"), fmt.Sprintf("nats://127.0.0.1:%d", closedPort(t))))
		waitFor(t, 30*time.Second, "two retries", func() bool { return r.logs.Count("retrying") >= 2 })
		if r.logs.Count("connect to NATS") < 2 {
			t.Error("the log does not say NATS is unreachable")
		}
	})
}

// TestConfirmsOnlyWhatJetStreamAcknowledged stops NATS while the agent
// streams: the transactions it then receives must not be confirmed to
// PostgreSQL (the slot keeps them) until NATS is back and has them.
func TestConfirmsOnlyWhatJetStreamAcknowledged(t *testing.T) {
	pg := pgtest.New(t)
	nats := natstest.New(t)
	url := pg.URL("postgres")
	execSQL(t, url, `CREATE TABLE t (id int PRIMARY KEY, v text)`)
	r := startAgent(t, testConfig(url, nats.URL()))
	waitFor(t, 30*time.Second, "the agent to stream", func() bool { return r.logs.Count("streaming changes") == 1 })

	confirmed := func() pglogrepl.LSN {
		return pglogrepl.LSN(queryInt(t, url, `SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = 'haven_crm'`))
	}
	nats.Shutdown()
	execSQL(t, url, `INSERT INTO t SELECT g, 'while NATS is down' FROM generate_series(1, 100) g`)
	commitLSN := pglogrepl.LSN(queryInt(t, url, `SELECT (pg_current_wal_lsn() - '0/0')::bigint`))
	// Whether the agent received the transaction before its session failed
	// or not, JetStream cannot have acknowledged it.
	waitFor(t, 30*time.Second, "the session to fail on the missing acknowledgement", func() bool { return r.logs.Count("retrying") >= 1 })
	t.Logf("the agent had received up to %s", pglogrepl.LSN(gaugeValue(r.reg, "haven_agent_received_lsn")))
	if c := confirmed(); c >= commitLSN {
		t.Fatalf("slot confirmed %s although NATS was down when the transaction ending before %s was captured", c, commitLSN)
	}
	if err := nats.Restart(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, "the slot to confirm the transaction once NATS has it", func() bool { return confirmed() >= commitLSN })
}

func gaugeValue(reg *prometheus.Registry, name string) float64 {
	families, err := reg.Gather()
	if err != nil {
		return 0
	}
	for _, f := range families {
		if f.GetName() == name {
			for _, m := range f.GetMetric() {
				return m.GetGauge().GetValue()
			}
		}
	}
	return 0
}

// TestHeartbeatsAdvanceAnIdleSlot: only another database on the cluster
// writes; without heartbeats through the slot, the idle group's slot would
// pin all that WAL. With them, its confirmed and restart positions follow.
// The same test checks the retained-WAL warning.
func TestHeartbeatsAdvanceAnIdleSlot(t *testing.T) {
	pg := pgtest.New(t)
	nats := natstest.New(t)
	if err := pg.CreateDatabase(t.Context(), "busy"); err != nil {
		t.Fatal(err)
	}
	url := pg.URL("postgres")
	execSQL(t, url, `CREATE TABLE idle (id int PRIMARY KEY)`)
	cfg := testConfig(url, nats.URL())
	cfg.RetainedWALWarning = 1 // warn at once: any retained WAL is above it
	r := startAgent(t, cfg)
	waitFor(t, 30*time.Second, "the agent to stream", func() bool { return r.logs.Count("streaming changes") == 1 })
	waitFor(t, 30*time.Second, "the retained-WAL warning", func() bool { return r.logs.Count("more WAL on the primary than --retained-wal-warning") >= 1 })

	lsn := func(sql string) int64 { return queryInt(t, url, sql) }
	start := lsn(`SELECT (pg_current_wal_lsn() - '0/0')::bigint`)
	execSQL(t, pg.URL("busy"), `CREATE TABLE noise AS SELECT g, md5(g::text) FROM generate_series(1, 300000) g`)
	execSQL(t, url, `CHECKPOINT`)
	end := lsn(`SELECT (pg_current_wal_lsn() - '0/0')::bigint`)
	t.Logf("the other database wrote %d MiB of WAL", (end-start)>>20)
	waitFor(t, 30*time.Second, "the idle slot to confirm past the other database's WAL", func() bool {
		return lsn(`SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = 'haven_crm'`) >= end
	})
	waitFor(t, 60*time.Second, "the idle slot to release the other database's WAL", func() bool {
		execSQL(t, url, `CHECKPOINT`)
		return lsn(`SELECT (restart_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = 'haven_crm'`) > start+(end-start)/2
	})
}

// TestSnapshotStateLostIsRecoveredFromTheStream: without its record in the
// key-value bucket (deleted, recreated), a restarted agent finds the
// snapshot's end marker in the stream and resumes instead of re-seeding,
// which would empty every DR copy for the length of a copy.
func TestSnapshotStateLostIsRecoveredFromTheStream(t *testing.T) {
	pg := pgtest.New(t)
	nats := natstest.New(t)
	url := pg.URL("postgres")
	execSQL(t, url, `CREATE TABLE t (id int PRIMARY KEY)`)
	cfg := testConfig(url, nats.URL())
	first := startAgent(t, cfg)
	waitFor(t, 30*time.Second, "the agent to stream", func() bool { return first.logs.Count("streaming changes") == 1 })
	first.cancel()
	<-first.done
	first.done <- nil

	js := nats.JetStream(t)
	if err := js.DeleteKeyValue(t.Context(), wire.StateBucket); err != nil {
		t.Fatal(err)
	}
	second := startAgent(t, cfg)
	waitFor(t, 30*time.Second, "the restarted agent to stream", func() bool { return second.logs.Count("streaming changes") == 1 })
	if second.logs.Count("resuming from the slot") != 1 || second.logs.Count("taking a new snapshot") != 0 {
		t.Error("the restarted agent re-seeded instead of resuming from its slot")
	}
	if second.logs.Count("the stream's end marker shows the snapshot finished") != 1 {
		t.Error("the agent did not say it recovered the snapshot state from the stream")
	}
}
