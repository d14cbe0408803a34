package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/haven-dr/haven/proto/wire"
)

// TestRowsLargerThanAMessage: rows larger than the NATS server's
// max_payload (1 MB by default) travel through the group's object store:
// one in the initial snapshot, others inserted and updated in transactions
// next to small rows, and one in a table that joins with rows (backfill).
// The standby is killed between them, and the agent restarted (whether
// the stream's last message then names an object depends on heartbeats;
// TestAChunkTooLargeForAMessage reads such a tail). DR ends equal.
func TestRowsLargerThanAMessage(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	// Random bytes, so that no compression brings a row under a message.
	random := func(kib int) string {
		return fmt.Sprintf(`(SELECT string_agg(decode(md5(random()::text || g), 'hex'), '') FROM generate_series(1, %d) g)`, kib*64)
	}
	mustExec(t, primary, `CREATE TABLE files (id int PRIMARY KEY, name text, body bytea);
		ALTER TABLE files ALTER COLUMN body SET STORAGE EXTERNAL;
		CREATE TABLE marker (id bigint PRIMARY KEY);
		INSERT INTO files VALUES (1, 'in the snapshot', `+random(3<<10)+`), (2, 'small', '\x00')`)

	agent := startHaven(t, "agent", s.agentArgs()...)
	standby := startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	mustExec(t, primary, `BEGIN;
		INSERT INTO files VALUES (3, 'streamed', `+random(5<<10)+`), (4, 'small too', '\x01');
		UPDATE files SET body = `+random(2<<10)+`, name = 'updated' WHERE id = 1;
		COMMIT`)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	standby.kill()
	mustExec(t, primary, `UPDATE files SET name = 'renamed' WHERE id = 3; INSERT INTO files VALUES (5, 'after the kill', `+random(1536)+`)`)
	agent.stop()
	startHaven(t, "agent", s.agentArgs()...)
	startHaven(t, "standby", s.standbyArgs()...)
	waitCaughtUp(t, primary, dr, 3, 60*time.Second)

	// A table that joins with rows is backfilled with them.
	mustExec(t, primary, `CREATE TABLE scans AS SELECT g AS id, `+random(1200)+` AS page FROM generate_series(1, 2) g`)
	mustExec(t, primary, `ALTER TABLE scans ADD PRIMARY KEY (id)`)
	waitFor(t, 60*time.Second, "the backfill of scans", func() (bool, error) {
		var n int
		err := dr.QueryRow(t.Context(), `SELECT count(*) FROM scans`).Scan(&n)
		if err != nil {
			return false, nil // not made on DR yet
		}
		open, err := backfillsOnDR(t.Context(), dr)
		return n == 2 && open == 0, err
	})
	waitCaughtUp(t, primary, dr, 4, 60*time.Second)
	assertEqual(t, primary, dr, map[string]string{"files": "id", "scans": "id", "marker": "id"})
	var large int
	if err := dr.QueryRow(t.Context(), `SELECT count(*) FROM files WHERE length(body) > 1 << 20`).Scan(&large); err != nil || large != 3 {
		t.Errorf("DR has %d rows of files over 1 MiB (%v), want 3", large, err)
	}
	// They went through the object store, not as messages.
	store, err := s.nats.JetStream(t).ObjectStore(t.Context(), wire.ObjectBucket(s.group))
	if err != nil {
		t.Fatalf("object store %s: %v", wire.ObjectBucket(s.group), err)
	}
	objects, err := store.List(t.Context())
	if err != nil || len(objects) < 4 {
		t.Errorf("%d objects in %s (%v), want one per chunk of a large row (at least 4)", len(objects), wire.ObjectBucket(s.group), err)
	}
}
