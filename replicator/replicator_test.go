package replicator

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/haven-dr/haven/internal/natstest"
	"github.com/haven-dr/haven/internal/pgtest"
	"github.com/haven-dr/haven/internal/testlog"
	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

const testSystemID = 7000000000000000001

// feed is a group's stream that a test writes chunks into, as an agent
// would.
type feed struct {
	t     *testing.T
	js    jetstream.JetStream
	group string
}

func newFeed(t *testing.T, ns *natstest.Server, group string) *feed {
	t.Helper()
	js := ns.JetStream(t)
	if _, err := js.CreateStream(t.Context(), jetstream.StreamConfig{Name: wire.StreamName(group),
		Subjects: []string{wire.SubjectPrefix(group) + ">"}, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	return &feed{t: t, js: js, group: group}
}

func (f *feed) publishRaw(headers map[string]string, payload []byte) uint64 {
	f.t.Helper()
	msg := &nats.Msg{Subject: wire.TransactionSubject(f.group), Data: payload, Header: nats.Header{}}
	for k, v := range headers {
		msg.Header.Set(k, v)
	}
	ack, err := f.js.PublishMsg(f.t.Context(), msg)
	if err != nil {
		f.t.Fatal(err)
	}
	return ack.Sequence
}

func (f *feed) publish(c *havenpb.Chunk) uint64 {
	f.t.Helper()
	payload, encoding, err := wire.Encode(c, wire.Plain)
	if err != nil {
		f.t.Fatal(err)
	}
	return f.publishRaw(map[string]string{wire.HeaderEncoding: encoding, wire.HeaderFormat: wire.FormatHeader()}, payload)
}

var itemsRelation = &havenpb.Relation{Id: 16400, Schema: "public", Name: "items", ReplicaIdentity: "d", Columns: []*havenpb.Column{
	{Name: "id", Type: "bigint", TypeOid: 20, TypeModifier: -1, Key: true, NotNull: true},
	{Name: "note", Type: "text", TypeOid: 25, TypeModifier: -1},
}}

func chunk(group string, kind havenpb.Kind, lsn uint64) *havenpb.Chunk {
	return &havenpb.Chunk{FormatVersion: wire.FormatVersion, Kind: kind, SystemId: testSystemID, Group: group, Slot: "haven_" + group,
		Epoch: 1, CommitLsn: lsn, SnapshotLsn: 0x1000, LastChunk: true, CommitTimeUs: time.Now().UnixMicro()}
}

func text(s string) *havenpb.Datum {
	return &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT, Text: []byte(s)}
}

func insert(id, note string) *havenpb.Change {
	return &havenpb.Change{Op: havenpb.Op_OP_INSERT, RelationId: itemsRelation.Id, New: &havenpb.Row{Values: []*havenpb.Datum{text(id), text(note)}}}
}

// snapshotAndTxn publishes a one-row snapshot of items and a transaction
// inserting row 2 at LSN 0x2000.
// beginSnapshot publishes the start of a snapshot of items.
func (f *feed) beginSnapshot() {
	begin := chunk(f.group, havenpb.Kind_KIND_SNAPSHOT_BEGIN, 0x1000)
	begin.Relations = []*havenpb.Relation{itemsRelation}
	f.publish(begin)
}

func (f *feed) snapshotAndTxn() {
	f.beginSnapshot()
	rows := chunk(f.group, havenpb.Kind_KIND_SNAPSHOT_ROWS, 0x1000)
	rows.Relations = []*havenpb.Relation{itemsRelation}
	rows.Changes = []*havenpb.Change{insert("1", "from the snapshot")}
	f.publish(rows)
	f.publish(chunk(f.group, havenpb.Kind_KIND_SNAPSHOT_END, 0x1000))
	f.publish(f.txn(0x2000, insert("2", "first transaction")))
}

func (f *feed) txn(lsn uint64, changes ...*havenpb.Change) *havenpb.Chunk {
	c := chunk(f.group, havenpb.Kind_KIND_TRANSACTION, lsn)
	c.Xid = uint32(lsn)
	c.Relations = []*havenpb.Relation{itemsRelation}
	c.Changes = changes
	return c
}

// startStandby runs a standby for the test; tune, if given, changes its
// configuration first.
func startStandby(t *testing.T, targetURL, natsURL, group string, tune ...func(*Config)) (*Standby, *testlog.Buffer, *prometheus.Registry) {
	t.Helper()
	cfg := DefaultConfig()
	cfg.TargetURL, cfg.NATSURL, cfg.Group = targetURL, natsURL, group
	cfg.BlockedRetry = 200 * time.Millisecond
	for _, f := range tune {
		f(&cfg)
	}
	logs := testlog.New(t)
	reg := prometheus.NewRegistry()
	s, err := New(cfg, zerolog.New(logs), reg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Error("standby did not stop within 20s")
		}
	})
	return s, logs, reg
}

// newGroup starts a DR server with an empty database named after the group,
// and a NATS server.
func newGroup(t *testing.T, group string) (*pgtest.Cluster, *natstest.Server) {
	t.Helper()
	pg := pgtest.New(t)
	if err := pg.CreateDatabase(t.Context(), group); err != nil {
		t.Fatal(err)
	}
	return pg, natstest.New(t)
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

func notes(t *testing.T, url string) []string {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(t.Context(), `SELECT id || ':' || note FROM items ORDER BY id`)
	if err != nil {
		return nil
	}
	list, _ := pgx.CollectRows(rows, pgx.RowTo[string])
	return list
}

func metric(reg *prometheus.Registry, name string) float64 {
	families, _ := reg.Gather()
	for _, f := range families {
		if f.GetName() == name && len(f.GetMetric()) > 0 {
			m := f.GetMetric()[0]
			if m.GetGauge() != nil {
				return m.GetGauge().GetValue()
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

// TestStopsAtMessagesItCannotApply: for each kind of bad message, apply
// stops exactly there: what came before is applied, nothing after it is,
// the message is not acknowledged, and health and metrics say which and why.
func TestStopsAtMessagesItCannotApply(t *testing.T) {
	pg := pgtest.New(t)
	ns := natstest.New(t)
	encode := func(c *havenpb.Chunk) []byte {
		payload, _, err := wire.Encode(c, wire.Plain)
		if err != nil {
			t.Fatal(err)
		}
		return payload
	}
	cases := []struct {
		name   string
		bad    func(f *feed) uint64 // publishes the bad message(s), returns the sequence apply must stop at
		reason string
	}{
		{"undecodable", func(f *feed) uint64 {
			return f.publishRaw(map[string]string{wire.HeaderEncoding: wire.EncodingProto}, []byte("\xff\xfe not protobuf"))
		}, "undecodable"},
		{"foreign message without headers", func(f *feed) uint64 {
			return f.publishRaw(nil, []byte(`{"hello":"world"}`))
		}, "not a haven message"},
		{"unknown format version", func(f *feed) uint64 {
			return f.publishRaw(map[string]string{wire.HeaderEncoding: wire.EncodingProto, wire.HeaderFormat: "2"}, encode(f.txn(0x3000, insert("3", "x"))))
		}, "format version"},
		{"another group", func(f *feed) uint64 {
			c := f.txn(0x3000, insert("3", "x"))
			c.Group = "other"
			return f.publish(c)
		}, `group "other"`},
		{"another source system", func(f *feed) uint64 {
			c := f.txn(0x3000, insert("3", "x"))
			c.SystemId = 42
			return f.publish(c)
		}, "source system 42"},
		{"message of an older epoch", func(f *feed) uint64 {
			newer := f.txn(0x2800)
			newer.Epoch = 2 // the group failed over: this is the new primary's
			f.publish(newer)
			return f.publish(f.txn(0x3000, insert("3", "from the deposed primary"))) // epoch 1
		}, "stale epoch"},
		{"chunk out of order", func(f *feed) uint64 {
			c := f.txn(0x3000, insert("3", "x"))
			c.FirstChange = 1
			return f.publish(c)
		}, "without its beginning"},
		{"change of an undescribed relation", func(f *feed) uint64 {
			c := f.txn(0x3000, insert("3", "x"))
			c.Relations = nil
			return f.publish(c)
		}, "undescribed relation"},
		{"gap in the stream", func(f *feed) uint64 {
			seq := f.publish(f.txn(0x3000, insert("3", "removed before it was applied")))
			st, err := f.js.Stream(f.t.Context(), wire.StreamName(f.group))
			if err != nil {
				f.t.Fatal(err)
			}
			if err := st.DeleteMsg(f.t.Context(), seq); err != nil {
				f.t.Fatal(err)
			}
			return seq + 1
		}, "expected stream sequence"},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			group := "g" + string(rune('a'+i))
			db := group
			if err := pg.CreateDatabase(t.Context(), db); err != nil {
				t.Fatal(err)
			}
			f := newFeed(t, ns, group)
			f.snapshotAndTxn()
			stopAt := tc.bad(f)
			f.publish(f.txn(0x9000, insert("9", "after the bad message")))

			s, logs, reg := startStandby(t, pg.URL(db), ns.URL(), group)
			waitFor(t, 30*time.Second, "apply to block", func() bool { return metric(reg, "haven_standby_blocked") == 1 })
			if got, want := strings.Join(notes(t, pg.URL(db)), ","), "1:from the snapshot,2:first transaction"; got != want {
				t.Errorf("DR rows %q, want %q (everything before the bad message, nothing after)", got, want)
			}
			health := s.Healthy()
			if health == nil || !strings.Contains(health.Error(), tc.reason) || !strings.Contains(health.Error(), "message "+strconv.FormatUint(stopAt, 10)) {
				t.Errorf("health %v does not name message %d and %q", health, stopAt, tc.reason)
			}
			if !strings.Contains(logs.String(), "apply is blocked") {
				t.Error("the log does not say apply is blocked")
			}
			// Not acknowledged: the consumer's ack floor is below it.
			st, err := f.js.Stream(t.Context(), wire.StreamName(group))
			if err != nil {
				t.Fatal(err)
			}
			var id string
			if err := pgxQueryRow(t, pg.URL(db), `SELECT replace(id::text, '-', '') FROM haven.standby_identity`).Scan(&id); err != nil {
				t.Fatal(err)
			}
			cons, err := st.Consumer(t.Context(), wire.ConsumerName(group, id[:12]))
			if err != nil {
				t.Fatal(err)
			}
			info, err := cons.Info(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			if info.AckFloor.Stream >= stopAt {
				t.Errorf("consumer ack floor %d: the bad message %d was acknowledged", info.AckFloor.Stream, stopAt)
			}
			// Retries keep stopping at the same place.
			retriesBefore := strings.Count(logs.String(), "apply is blocked")
			waitFor(t, 30*time.Second, "a retry", func() bool { return strings.Count(logs.String(), "apply is blocked") > retriesBefore })
			if got := len(notes(t, pg.URL(db))); got != 2 {
				t.Errorf("after a retry DR has %d rows, want 2", got)
			}
		})
	}
}

// TestLeavesForeignTablesAlone: a DR table that already holds rows in a
// database haven never applied to is not emptied by a snapshot, and a table
// whose columns differ is named with the difference.
func TestLeavesForeignTablesAlone(t *testing.T) {
	pg := pgtest.New(t)
	ns := natstest.New(t)
	for _, tc := range []struct {
		group, setup, reason string
	}{
		{"full", `CREATE TABLE items (id bigint PRIMARY KEY, note text); INSERT INTO items VALUES (42, 'precious')`, "already has rows"},
		{"shape", `CREATE TABLE items (id bigint PRIMARY KEY, note varchar(10))`, `column "note" is character varying(10) on DR but text on the primary`},
		{"required", `CREATE TABLE items (id bigint PRIMARY KEY, note text, region text NOT NULL)`, `DR-only column "region" is NOT NULL without a default`},
	} {
		t.Run(tc.group, func(t *testing.T) {
			if err := pg.CreateDatabase(t.Context(), tc.group); err != nil {
				t.Fatal(err)
			}
			if err := pg.Exec(t.Context(), tc.group, tc.setup); err != nil {
				t.Fatal(err)
			}
			f := newFeed(t, ns, tc.group)
			f.snapshotAndTxn()
			s, _, reg := startStandby(t, pg.URL(tc.group), ns.URL(), tc.group)
			waitFor(t, 30*time.Second, "apply to block", func() bool { return metric(reg, "haven_standby_blocked") == 1 })
			if err := s.Healthy(); err == nil || !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("health %v does not say %q", err, tc.reason)
			}
			if tc.group == "full" {
				if got := strings.Join(notes(t, pg.URL(tc.group)), ","); got != "42:precious" {
					t.Errorf("DR rows %q: the existing row must be left alone", got)
				}
			}
		})
	}
}

// TestDROnlyColumnsThatFillThemselvesAreAllowed: a DR table may have
// columns the primary's lacks, NOT NULL ones too, when DR fills them (a
// default, an identity, a generated column).
func TestDROnlyColumnsThatFillThemselvesAreAllowed(t *testing.T) {
	const group = "extra"
	pg, ns := newGroup(t, group)
	if err := pg.Exec(t.Context(), group, `CREATE TABLE items (id bigint PRIMARY KEY, note text,
		copied_at timestamptz NOT NULL DEFAULT now(), n bigint NOT NULL GENERATED ALWAYS AS IDENTITY,
		note_length int NOT NULL GENERATED ALWAYS AS (coalesce(length(note), 0)) STORED)`); err != nil {
		t.Fatal(err)
	}
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	_, _, reg := startStandby(t, pg.URL(group), ns.URL(), group)
	waitFor(t, 30*time.Second, "the snapshot and the first transaction", func() bool {
		return len(notes(t, pg.URL(group))) == 2 || metric(reg, "haven_standby_blocked") == 1
	})
	var filled int
	if err := pgxQueryRow(t, pg.URL(group), `SELECT count(*) FROM items WHERE copied_at IS NOT NULL AND n > 0 AND note_length = length(note)`).Scan(&filled); err != nil {
		t.Fatal(err)
	}
	if filled != 2 {
		t.Errorf("%d of 2 DR rows have their DR-only columns filled by DR (blocked: %v)", filled, metric(reg, "haven_standby_blocked"))
	}
}

// TestWaitsForATargetInRecovery: a DR database that takes no writes (here
// a cluster started with standby.signal, as a physical standby is) is
// named as such, not through the first write it refuses.
func TestWaitsForATargetInRecovery(t *testing.T) {
	const group = "recovering"
	pg, ns := newGroup(t, group)
	signal := filepath.Join(pg.Dir(), "standby.signal")
	if err := os.WriteFile(signal, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := pg.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	s, _, reg := startStandby(t, pg.URL(group), ns.URL(), group)
	waitFor(t, 30*time.Second, "health to say why apply waits", func() bool {
		err := s.Healthy()
		return err != nil && strings.Contains(err.Error(), "the DR database is in recovery")
	})
	if metric(reg, "haven_standby_blocked") != 0 {
		t.Error("apply is reported blocked at a message; the target is at fault")
	}
}

// TestADRRoleUnderRowSecurityIsStopped: a DR role that row-level security
// policies apply to could not reach every row; apply stops and says how to
// fix it, and resumes once the role bypasses them.
func TestADRRoleUnderRowSecurityIsStopped(t *testing.T) {
	const group = "policed"
	pg, ns := newGroup(t, group)
	if err := pg.Exec(t.Context(), group, `CREATE ROLE drapply LOGIN; ALTER DATABASE policed OWNER TO drapply;
		GRANT CREATE ON SCHEMA public TO drapply; GRANT SET ON PARAMETER session_replication_role TO drapply;
		SET ROLE drapply;
		CREATE TABLE items (id bigint PRIMARY KEY, note text);
		ALTER TABLE items ENABLE ROW LEVEL SECURITY; ALTER TABLE items FORCE ROW LEVEL SECURITY;
		CREATE POLICY mine ON items USING (note LIKE 'mine%')`); err != nil {
		t.Fatal(err)
	}
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	url := strings.Replace(pg.URL(group), "postgres@", "drapply@", 1)
	s, _, reg := startStandby(t, url, ns.URL(), group)
	waitFor(t, 30*time.Second, "apply to stop", func() bool { return metric(reg, "haven_standby_blocked") == 1 })
	if err := s.Healthy(); err == nil || !strings.Contains(err.Error(), `row-level security applies to haven's DR role on "public"."items"`) {
		t.Errorf("health %v does not name the table and row-level security", err)
	}
	if err := pg.Exec(t.Context(), group, `BEGIN READ WRITE; ALTER ROLE drapply BYPASSRLS; COMMIT`); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "apply to resume", func() bool {
		return strings.Join(notes(t, pg.URL(group)), ",") == "1:from the snapshot,2:first transaction"
	})
}

// TestAChangeDRRefusesIsNamed: a change that DR refuses (a constraint only
// DR has) stops apply with the table and the rows in the message.
func TestAChangeDRRefusesIsNamed(t *testing.T) {
	const group = "refused"
	pg, ns := newGroup(t, group)
	if err := pg.Exec(t.Context(), group, `CREATE TABLE items (id bigint PRIMARY KEY, note text CHECK (note <> 'refused'))`); err != nil {
		t.Fatal(err)
	}
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	f.publish(f.txn(0x3000, insert("3", "kept"), insert("4", "refused")))
	s, _, reg := startStandby(t, pg.URL(group), ns.URL(), group)
	waitFor(t, 30*time.Second, "apply to stop", func() bool { return metric(reg, "haven_standby_blocked") == 1 })
	if err := s.Healthy(); err == nil || !regexp.MustCompile(`insert of public\.items \(rows [^)]*id=4\): ERROR: new row for relation "items" violates check constraint`).MatchString(err.Error()) {
		t.Errorf("health %v does not name the table and rows DR refused", err)
	}
}

// TestRowsADRRuleDropsAreReported: inserted rows that a DR rule swallows
// (one enabled ALWAYS, so that it fires during apply) are reported, like an
// update that found no row: the DR copy has drifted.
func TestRowsADRRuleDropsAreReported(t *testing.T) {
	const group = "swallowed"
	pg, ns := newGroup(t, group)
	if err := pg.Exec(t.Context(), group, `CREATE TABLE items (id bigint PRIMARY KEY, note text);
		CREATE RULE swallow AS ON INSERT TO items WHERE NEW.note = 'swallowed' DO INSTEAD NOTHING;
		ALTER TABLE items ENABLE ALWAYS RULE swallow`); err != nil {
		t.Fatal(err)
	}
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	f.publish(f.txn(0x3000, insert("3", "kept"), insert("4", "swallowed"), insert("5", "swallowed"), insert("6", "kept")))
	f.publish(f.txn(0x4000, insert("7", "swallowed")))
	_, logs, reg := startStandby(t, pg.URL(group), ns.URL(), group)
	waitFor(t, 30*time.Second, "the transactions", func() bool { return len(notes(t, pg.URL(group))) == 4 })
	waitFor(t, 10*time.Second, "three dropped rows reported", func() bool { return metric(reg, "haven_standby_missing_rows_total") == 3 })
	if n := logs.Count("DR kept fewer rows than an insert from the primary carried"); n == 0 {
		t.Error("no log line says that DR dropped inserted rows")
	}
	if n := logs.Count("rule swallow"); n == 0 {
		t.Error("no warning names the DR rule that fires during apply")
	}
}

// TestOperatorInspectsAndSkips: an operator reads the message apply stopped
// at, then deliberately skips it; the skip is recorded with the message, and
// apply resumes after it. Any other message is refused.
func TestOperatorInspectsAndSkips(t *testing.T) {
	const group = "ops"
	pg, ns := newGroup(t, group)
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	bad := f.publishRaw(map[string]string{wire.HeaderEncoding: wire.EncodingProto}, []byte("garbage"))
	f.publish(f.txn(0x9000, insert("9", "after the bad message")))

	s, _, reg := startStandby(t, pg.URL(group), ns.URL(), group)
	waitFor(t, 30*time.Second, "apply to block", func() bool { return metric(reg, "haven_standby_blocked") == 1 })

	view, err := Inspect(t.Context(), ns.URL(), group, bad)
	if err != nil {
		t.Fatal(err)
	}
	if view.DecodeError == "" || view.Chunk != nil || view.RawPrefix != hexOf("garbage") {
		t.Errorf("inspect of the bad message: %+v", view)
	}
	good, err := Inspect(t.Context(), ns.URL(), group, bad-1)
	if err != nil {
		t.Fatal(err)
	}
	if good.Chunk == nil || len(good.Chunk.Changes) != 1 || good.Chunk.Changes[0].Table != "public.items" ||
		good.Chunk.Changes[0].New["note"] != "first transaction" || good.Chunk.CommitLSN != "0/2000" {
		t.Errorf("inspect of a transaction: %+v", good.Chunk)
	}
	if _, err := Inspect(t.Context(), ns.URL(), group, 999); err == nil || !strings.Contains(err.Error(), "has no message 999") {
		t.Errorf("inspect of a missing message: %v", err)
	}

	req := SkipRequest{TargetURL: pg.URL(group), NATSURL: ns.URL(), Group: group, Seq: bad + 1, Reason: "test", Operator: "alice"}
	if err := Skip(t.Context(), req); err == nil || !strings.Contains(err.Error(), "only the message apply stops at") {
		t.Errorf("skipping a message apply is not stopped at: %v", err)
	}
	req.Seq, req.Reason = bad, ""
	if err := Skip(t.Context(), req); err == nil || !strings.Contains(err.Error(), "--reason") {
		t.Errorf("skipping without a reason: %v", err)
	}
	req.Reason = "garbage published by a test tool, nothing of the CRM's"
	skipOnceUnlocked(t, req)
	waitFor(t, 30*time.Second, "apply to resume after the skipped message", func() bool {
		return strings.Join(notes(t, pg.URL(group)), ",") == "1:from the snapshot,2:first transaction,9:after the bad message"
	})
	if err := s.Healthy(); err != nil {
		t.Errorf("standby still unhealthy after the skip: %v", err)
	}
	var who, why, decodeErr string
	err = pgxQueryRow(t, pg.URL(group), `SELECT operator, reason, message->>'decode_error' FROM haven.skipped_messages WHERE stream_seq = $1`, int64(bad)).
		Scan(&who, &why, &decodeErr)
	if err != nil || who != "alice" || why != req.Reason || decodeErr == "" {
		t.Errorf("recorded skip: operator %q, reason %q, decode error %q (%v)", who, why, decodeErr, err)
	}
}

// TestASecondStandbyNamesTheSessionHoldingTheApplyLock: a second standby
// of the same group on the same DR database waits, and names the DR session
// in its way, which an operator can end when the first standby is gone.
func TestASecondStandbyNamesTheSessionHoldingTheApplyLock(t *testing.T) {
	const group = "twice"
	pg, ns := newGroup(t, group)
	newFeed(t, ns, group).snapshotAndTxn()
	startStandby(t, pg.URL(group), ns.URL(), group)
	waitFor(t, 30*time.Second, "the transaction on DR", func() bool { return len(notes(t, pg.URL(group))) == 2 })
	var pid int
	if err := pgxQueryRow(t, pg.URL(group), `SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted`).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	second, _, _ := startStandby(t, pg.URL(group), ns.URL(), group)
	want := fmt.Sprintf("DR session %d from", pid)
	waitFor(t, 30*time.Second, "the second standby to name the session holding the lock", func() bool {
		err := second.Healthy()
		return err != nil && strings.Contains(err.Error(), want)
	})
}

// waitBlockedAt waits until apply stops, blocked, at exactly stream
// message seq.
func waitBlockedAt(t *testing.T, s *Standby, reg *prometheus.Registry, seq uint64) {
	t.Helper()
	name := "message " + strconv.FormatUint(seq, 10)
	waitFor(t, 60*time.Second, "apply to stop at exactly "+name, func() bool {
		err := s.Healthy()
		return metric(reg, "haven_standby_blocked") == 1 && err != nil && strings.Contains(err.Error(), name)
	})
}

// skipOnceUnlocked runs req as soon as apply, blocked, lets go of its lock.
func skipOnceUnlocked(t *testing.T, req SkipRequest) {
	t.Helper()
	waitFor(t, 30*time.Second, "the skip", func() bool {
		err := Skip(t.Context(), req)
		if err != nil && !strings.Contains(err.Error(), "holds the apply lock") {
			t.Fatal(err)
		}
		return err == nil
	})
}

func hexOf(s string) string { return fmt.Sprintf("%x", s) }

func pgxQueryRow(t *testing.T, url, sql string, args ...any) pgx.Row {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn.QueryRow(t.Context(), sql, args...)
}

// TestDRsOwnFailuresAreRetriedNotBlamedOnAMessage: DR failing for a
// reason of its own (a full disk, memory, a limit of its configuration)
// does not stop apply at the message it was applying, which an operator
// might then skip: apply retries and says why, applies nothing meanwhile,
// and once DR is fixed it applies every change exactly once. (The failure
// is injected by a DR trigger raising the error PostgreSQL reports.)
func TestDRsOwnFailuresAreRetriedNotBlamedOnAMessage(t *testing.T) {
	for _, c := range []struct{ code, message, says string }{
		{"disk_full", `could not extend file "base/1/2": No space left on device`, "DR's disk is full"},
		{"out_of_memory", "out of shared memory", "raise max_locks_per_transaction on DR"},
		{"configuration_limit_exceeded", "temporary file size exceeds temp_file_limit (1024kB)", "raise it on DR"},
	} {
		t.Run(c.code, func(t *testing.T) {
			group := strings.ReplaceAll(c.code, "_", "")
			pg, ns := newGroup(t, group)
			f := newFeed(t, ns, group)
			f.snapshotAndTxn()
			s, _, reg := startStandby(t, pg.URL(group), ns.URL(), group)
			waitFor(t, 30*time.Second, "the snapshot and the first transaction", func() bool { return len(notes(t, pg.URL(group))) == 2 })
			if err := pg.Exec(t.Context(), group, fmt.Sprintf(`BEGIN READ WRITE;
				CREATE TABLE dr_fault (since timestamptz DEFAULT now());
				INSERT INTO dr_fault DEFAULT VALUES;
				CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$
				BEGIN
					IF EXISTS (SELECT FROM public.dr_fault) THEN
						RAISE EXCEPTION '%s' USING ERRCODE = '%s';
					END IF;
					RETURN NEW;
				END $$;
				CREATE TRIGGER fault BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION fault();
				ALTER TABLE items ENABLE ALWAYS TRIGGER fault;
				COMMIT`, c.message, c.code)); err != nil {
				t.Fatal(err)
			}
			want := publishTenRowTransactions(f)

			waitFor(t, 30*time.Second, "apply to retry DR's failure twice (or stop)", func() bool {
				return metric(reg, "haven_standby_errors_total") >= 2 || metric(reg, "haven_standby_blocked") == 1
			})
			err := s.Healthy()
			if err == nil || !strings.Contains(err.Error(), c.says) || !strings.Contains(err.Error(), c.message) {
				t.Errorf("health %v does not say %q and %q", err, c.says, c.message)
			}
			if metric(reg, "haven_standby_blocked") != 0 {
				t.Error("apply is reported blocked at a message: DR's own failure is not the message's fault")
			}
			if got := notes(t, pg.URL(group)); len(got) != 2 {
				t.Errorf("DR rows %q while DR fails", got)
			}

			if err := pg.Exec(t.Context(), group, `BEGIN READ WRITE; DELETE FROM dr_fault; COMMIT`); err != nil {
				t.Fatal(err)
			}
			want = append([]string{"1:from the snapshot", "2:first transaction"}, want...)
			waitFor(t, 60*time.Second, "apply to resume once DR is fixed", func() bool {
				return slices.Equal(notes(t, pg.URL(group)), want)
			})
			waitFor(t, 10*time.Second, "health to clear", func() bool { return s.Healthy() == nil })
		})
	}
}

// publishTenRowTransactions publishes three transactions after
// snapshotAndTxn's, of ten inserted rows each, and returns the rows as
// notes lists them.
func publishTenRowTransactions(f *feed) []string {
	var rows []string
	for i := 3; i <= 5; i++ {
		var changes []*havenpb.Change
		for j := range 10 {
			id := strconv.Itoa(i*100 + j)
			changes = append(changes, insert(id, "row"))
			rows = append(rows, id+":row")
		}
		f.publish(f.txn(uint64(i)<<12, changes...))
	}
	return rows
}

// TestAGroupDRRefusesIsRetriedOneTransactionAtATime: a target transaction
// of several source transactions that DR refuses under a limit of its own
// (here "out of shared memory" past ten rows in one transaction, as a lock
// table too small for a group's many partitions would) is retried with one
// source transaction per target transaction, which DR takes: a retry of
// the same group would fail for ever.
func TestAGroupDRRefusesIsRetriedOneTransactionAtATime(t *testing.T) {
	const group = "biggroup"
	pg, ns := newGroup(t, group)
	if err := pg.Exec(t.Context(), group, `CREATE TABLE items (id bigint PRIMARY KEY, note text);
		CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF (SELECT count(*) FROM public.items WHERE xmin::text = pg_current_xact_id()::text) >= 10 THEN
				RAISE EXCEPTION 'out of shared memory' USING ERRCODE = 'out_of_memory', HINT = 'You might need to increase max_locks_per_transaction.';
			END IF;
			RETURN NEW;
		END $$;
		CREATE TRIGGER fault BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION fault();
		ALTER TABLE items ENABLE ALWAYS TRIGGER fault`); err != nil {
		t.Fatal(err)
	}
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	want := append([]string{"1:from the snapshot", "2:first transaction"}, publishTenRowTransactions(f)...)
	// Everything is in the stream before the standby starts: its first
	// group holds the four transactions.
	_, _, reg := startStandby(t, pg.URL(group), ns.URL(), group)
	waitFor(t, 60*time.Second, "every transaction applied", func() bool {
		return slices.Equal(notes(t, pg.URL(group)), want)
	})
	if metric(reg, "haven_standby_errors_total") < 1 {
		t.Error("DR took the transactions at the first try: the test did not make it refuse a group")
	}
	if metric(reg, "haven_standby_blocked") != 0 {
		t.Error("apply is reported blocked at a message: DR's own failure is not the message's fault")
	}
}

// TestAssemblesTransactionsAsTheAgentRepublishesThem: the transaction whose
// commit record starts exactly at the snapshot's consistent point is
// applied; a transaction published again after an agent restart, cut into
// different chunks, is applied once; a copy of an applied transaction
// arriving in the middle of another is skipped.
func TestAssemblesTransactionsAsTheAgentRepublishesThem(t *testing.T) {
	const group = "chunks"
	pg, ns := newGroup(t, group)
	f := newFeed(t, ns, group)
	f.beginSnapshot()
	f.publish(chunk(group, havenpb.Kind_KIND_SNAPSHOT_END, 0x1000))
	// Commit record at the consistent point itself: not in the snapshot.
	f.publish(f.txn(0x1000, insert("1", "at the consistent point")))

	part := func(lsn uint64, first uint32, last bool, ids ...string) *havenpb.Chunk {
		c := f.txn(lsn)
		c.FirstChange, c.LastChunk = first, last
		for _, id := range ids {
			c.Changes = append(c.Changes, insert(id, "big"))
		}
		return c
	}
	// 0x2000: changes 0-2 in a chunk, then the agent restarted and sent it
	// again as 0-1, 2-4 (overlapping), with a copy of 0x1000 in between.
	f.publish(part(0x2000, 0, false, "10", "11", "12"))
	f.publish(f.txn(0x1000, insert("1", "at the consistent point")))
	f.publish(part(0x2000, 0, false, "10", "11"))
	f.publish(part(0x2000, 2, true, "12", "13", "14"))
	// 0x3000: 0-1, then an overlapping 1-3.
	f.publish(part(0x3000, 0, false, "20", "21"))
	f.publish(part(0x3000, 1, true, "21", "22", "23"))

	_, _, reg := startStandby(t, pg.URL(group), ns.URL(), group)
	want := "1:at the consistent point,10:big,11:big,12:big,13:big,14:big,20:big,21:big,22:big,23:big"
	waitFor(t, 30*time.Second, "every transaction applied once", func() bool {
		return strings.Join(notes(t, pg.URL(group)), ",") == want
	})
	if metric(reg, "haven_standby_blocked") != 0 {
		t.Error("apply blocked")
	}
}

// TestAFailingTransactionInAGroupIsNamedExactly: several source
// transactions share a target transaction; one of them cannot be applied
// (a key DR already has). The retry applies them one by one, so apply
// stops at exactly that transaction, which the operator can then skip.
func TestAFailingTransactionInAGroupIsNamedExactly(t *testing.T) {
	const group = "grouped"
	pg, ns := newGroup(t, group)
	f := newFeed(t, ns, group)
	f.snapshotAndTxn() // row 1 from the snapshot, row 2 in a transaction
	f.publish(f.txn(0x3000, insert("3", "fine")))
	bad := f.publish(f.txn(0x4000, insert("1", "a key DR already has")))
	f.publish(f.txn(0x5000, insert("5", "after the bad one")))

	s, _, reg := startStandby(t, pg.URL(group), ns.URL(), group)
	waitBlockedAt(t, s, reg, bad)
	if got := strings.Join(notes(t, pg.URL(group)), ","); got != "1:from the snapshot,2:first transaction,3:fine" {
		t.Errorf("DR rows %q: the transactions before the failing one must be applied", got)
	}
	req := SkipRequest{TargetURL: pg.URL(group), NATSURL: ns.URL(), Group: group, Seq: bad, Reason: "duplicate key", Operator: "bob"}
	skipOnceUnlocked(t, req)
	waitFor(t, 30*time.Second, "apply to resume", func() bool {
		return strings.Join(notes(t, pg.URL(group)), ",") == "1:from the snapshot,2:first transaction,3:fine,5:after the bad one"
	})
}

// TestStopsWhenTheStreamNoLongerHoldsWhatWasApplied: a JetStream server that
// lost acknowledged messages hands their sequence numbers out again; the
// standby checks, when it starts, that the message at its stored position
// is the one it applied there, and stops if not.
func TestStopsWhenTheStreamNoLongerHoldsWhatWasApplied(t *testing.T) {
	const group = "rewritten"
	pg, ns := newGroup(t, group)
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	ctx, cancel := context.WithCancel(t.Context())
	cfg := DefaultConfig()
	cfg.TargetURL, cfg.NATSURL, cfg.Group, cfg.BlockedRetry = pg.URL(group), ns.URL(), group, 200*time.Millisecond
	first, err := New(cfg, zerolog.New(testlog.New(t)), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- first.Run(ctx) }()
	waitFor(t, 30*time.Second, "the transaction on DR", func() bool { return len(notes(t, pg.URL(group))) == 2 })
	cancel()
	<-done

	// As if the message at the stored position were another transaction.
	if err := pgxQueryRow(t, pg.URL(group)+"&default_transaction_read_only=off", `UPDATE haven.apply_position SET commit_lsn = '0/1FFF' RETURNING 1`).Scan(new(int)); err != nil {
		t.Fatal(err)
	}
	s, _, reg := startStandby(t, pg.URL(group), ns.URL(), group)
	waitFor(t, 30*time.Second, "apply to stop", func() bool { return metric(reg, "haven_standby_blocked") == 1 })
	if err := s.Healthy(); err == nil || !strings.Contains(err.Error(), "is not the one the DR copy applied there") {
		t.Errorf("health %v does not say the stream changed under the position", err)
	}
}

// TestStopsWhenTheStreamLostMessagesWhileConnected: a NATS server that
// comes back without the end of its stream (one replica, not synced to
// disk) gives new messages the sequence numbers of ones DR applied. A
// standby that stayed in its session through the reconnect would skip
// them; it starts a new session instead, whose check finds the stream no
// longer holds what was applied, and stops there.
func TestStopsWhenTheStreamLostMessagesWhileConnected(t *testing.T) {
	const group = "rewound"
	pg, ns := newGroup(t, group)
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	f.publish(f.txn(0x3000, insert("3", "second transaction")))
	s, _, reg := startStandby(t, pg.URL(group), ns.URL(), group)
	waitFor(t, 30*time.Second, "the transactions on DR", func() bool { return len(notes(t, pg.URL(group))) == 3 })

	ns.Shutdown()
	msgs := filepath.Join(ns.StoreDir(), "jetstream", "$G", "streams", wire.StreamName(group), "msgs")
	if err := os.RemoveAll(msgs); err != nil {
		t.Fatal(err)
	}
	if err := ns.Restart(); err != nil {
		t.Fatal(err)
	}
	f = &feed{t: t, js: ns.JetStream(t), group: group}
	for i := range 8 {
		f.publish(f.txn(0x4000+uint64(i)*0x100, insert(strconv.Itoa(10+i), "after the loss")))
	}
	waitFor(t, 30*time.Second, "apply to stop", func() bool { return metric(reg, "haven_standby_blocked") == 1 })
	if err := s.Healthy(); err == nil || !strings.Contains(err.Error(), "lost messages it had acknowledged") {
		t.Errorf("health %v does not say the stream lost messages", err)
	}
}

// TestATransactionMissingFromTheStreamStopsApply: each transaction names
// the one the agent published before it; when that is not the one DR
// applied last, the stream lost messages before DR read them (and may have
// handed their sequence numbers to later ones), and apply stops there.
func TestATransactionMissingFromTheStreamStopsApply(t *testing.T) {
	const group = "chained"
	pg, ns := newGroup(t, group)
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	chained := func(lsn, prev uint64, changes ...*havenpb.Change) *havenpb.Chunk {
		c := f.txn(lsn, changes...)
		c.PrevCommitLsn = prev
		return c
	}
	f.publish(chained(0x3000, 0x2000, insert("3", "second transaction")))
	after := f.publish(chained(0x5000, 0x4000, insert("5", "after a lost transaction")))
	f.publish(chained(0x6000, 0x5000, insert("6", "later")))
	s, _, reg := startStandby(t, pg.URL(group), ns.URL(), group)
	waitBlockedAt(t, s, reg, after)
	if got, want := strings.Join(notes(t, pg.URL(group)), ","), "1:from the snapshot,2:first transaction,3:second transaction"; got != want {
		t.Errorf("DR rows %q, want %q (everything before the gap, nothing after)", got, want)
	}
	if err := s.Healthy(); err == nil || !strings.Contains(err.Error(), "follows the transaction at 0/4000 in the stream, but the last one DR applied is at 0/3000") {
		t.Errorf("health %v does not name the missing transaction", err)
	}
}

// TestRetriesSoonAfterASessionThatApplied: a session that applied
// something before it failed (here, DR restarted under it) is retried
// after the shortest wait, however long the waits before it had grown.
func TestRetriesSoonAfterASessionThatApplied(t *testing.T) {
	const group = "progress"
	pg, ns := newGroup(t, group)
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	_, logs, _ := startStandby(t, pg.URL(group), ns.URL(), group)
	waitFor(t, 30*time.Second, "the first transaction", func() bool { return len(notes(t, pg.URL(group))) == 2 })
	retries := regexp.MustCompile(`"retry_in":([0-9.]+)`)
	for i := range 3 {
		seen := len(retries.FindAllString(logs.String(), -1))
		if err := pg.Restart(t.Context()); err != nil {
			t.Fatal(err)
		}
		f.publish(f.txn(0x3000+uint64(i)*0x100, insert(strconv.Itoa(10+i), "after a DR restart")))
		waitFor(t, 60*time.Second, "the transaction after the restart", func() bool { return len(notes(t, pg.URL(group))) == 3+i })
		all := retries.FindAllStringSubmatch(logs.String(), -1)
		if len(all) == seen {
			t.Fatalf("restart %d: no session ended", i+1)
		}
		if first := all[seen][1]; first != "500" {
			t.Errorf("restart %d: the first retry after a session that applied waited %s ms, want 500", i+1, first)
		}
	}
}

// TestAFailureInAPipelinedBatchIsNamedExactly: transactions large enough
// that their statements go out in batches the DR server executes while the
// next is built and sent; a failure inside such a batch, early (with a batch
// already sent behind it) or late, still stops apply at exactly the failing
// transaction, with every transaction before it applied and nothing of it
// or after it.
func TestAFailureInAPipelinedBatchIsNamedExactly(t *testing.T) {
	const group = "pipelined"
	pg, ns := newGroup(t, group)
	rows := func(from, n, duplicateAt int) []*havenpb.Change {
		var changes []*havenpb.Change
		for i := range n {
			id := strconv.Itoa(from + i)
			if i == duplicateAt {
				id = "1" // a key DR already has
			}
			changes = append(changes, insert(id, "row"))
		}
		return changes
	}
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	f.publish(f.txn(0x3000, rows(1000, 700, -1)...))
	early := f.publish(f.txn(0x4000, rows(2000, 1500, 10)...))
	late := f.publish(f.txn(0x4800, rows(4000, 700, 600)...))
	f.publish(f.txn(0x5000, rows(5000, 10, -1)...))

	s, _, reg := startStandby(t, pg.URL(group), ns.URL(), group)
	for _, bad := range []uint64{early, late} {
		// The first stop may come before the retry one transaction at a
		// time has committed those before the failing one.
		waitBlockedAt(t, s, reg, bad)
		waitFor(t, 30*time.Second, "the 702 rows of the transactions before the failing one", func() bool {
			return len(notes(t, pg.URL(group))) == 2+700
		})
		waitBlockedAt(t, s, reg, bad)
		req := SkipRequest{TargetURL: pg.URL(group), NATSURL: ns.URL(), Group: group, Seq: bad, Reason: "duplicate key", Operator: "bob"}
		skipOnceUnlocked(t, req)
	}
	waitFor(t, 30*time.Second, "apply to resume past the skipped transactions", func() bool {
		return len(notes(t, pg.URL(group))) == 2+700+10
	})
}

// TestARestartedStandbyReportsWhatDRHolds: a standby that starts on a DR
// database with changes applied reports their position at once, as the
// controllers measure a drill's RPO by it, not 0 until its next
// transaction.
func TestARestartedStandbyReportsWhatDRHolds(t *testing.T) {
	const group = "restarted"
	pg, ns := newGroup(t, group)
	newFeed(t, ns, group).snapshotAndTxn()
	t.Run("first session", func(t *testing.T) {
		startStandby(t, pg.URL(group), ns.URL(), group)
		waitFor(t, 30*time.Second, "the first transaction", func() bool { return len(notes(t, pg.URL(group))) == 2 })
	})
	s, _, _ := startStandby(t, pg.URL(group), ns.URL(), group)
	waitFor(t, 30*time.Second, "the restarted standby to report the transaction DR holds, 0/2000, as applied", func() bool {
		return s.control.appliedLSN.Load() == 0x2000
	})
}

// TestASnapshotEndsTheBackfillsOfTheCopyItReplaces: a backfill left open
// on DR (its END never came) ends with the next snapshot, which holds
// every table whole; left open, DR would report itself incomplete to the
// controllers for ever. Nor does the standby go on reporting the replaced
// copy's last transaction as applied (a rejoin's end is DR's first report).
func TestASnapshotEndsTheBackfillsOfTheCopyItReplaces(t *testing.T) {
	const group = "reseeded"
	pg, ns := newGroup(t, group)
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	s, _, _ := startStandby(t, pg.URL(group), ns.URL(), group)
	waitFor(t, 30*time.Second, "the first transaction", func() bool { return len(notes(t, pg.URL(group))) == 2 })
	if err := pg.Exec(t.Context(), group, `BEGIN READ WRITE; INSERT INTO haven.backfills (group_name, relid, table_name) VALUES ('`+group+`', 'public.items'::regclass, 'public.items'); COMMIT`); err != nil {
		t.Fatal(err)
	}

	begin := chunk(group, havenpb.Kind_KIND_SNAPSHOT_BEGIN, 0x3000)
	begin.SnapshotLsn, begin.Relations = 0x3000, []*havenpb.Relation{itemsRelation}
	f.publish(begin)
	rows := chunk(group, havenpb.Kind_KIND_SNAPSHOT_ROWS, 0x3000)
	rows.SnapshotLsn, rows.Relations, rows.Changes = 0x3000, []*havenpb.Relation{itemsRelation}, []*havenpb.Change{insert("3", "from the second snapshot")}
	f.publish(rows)
	end := chunk(group, havenpb.Kind_KIND_SNAPSHOT_END, 0x3000)
	end.SnapshotLsn = 0x3000
	f.publish(end)
	// What the first snapshot's transaction left is gone with its copy:
	// the position reported is the second snapshot's end.
	waitFor(t, 30*time.Second, "the standby to report the second snapshot's end, 0/2FFF, as applied", func() bool {
		return s.control.appliedLSN.Load() == 0x2fff
	})
	if got := strings.Join(notes(t, pg.URL(group)), ","); got != "3:from the second snapshot" {
		t.Errorf("DR holds %q after the second snapshot, want only its row", got)
	}
	var open int
	if err := pgxQueryRow(t, pg.URL(group), `SELECT count(*) FROM haven.backfills`).Scan(&open); err != nil || open != 0 {
		t.Errorf("%d backfills open after the snapshot (%v), want none", open, err)
	}
	if lacks := s.control.incomplete.Load(); lacks == nil || *lacks != "" {
		t.Errorf("the standby reports its copy lacks %v, want nothing", lacks)
	}
}
