package e2e

import (
	"testing"
	"time"
)

const partitionedSchema = `
CREATE TABLE events (id bigint, region text, body text, n int NOT NULL DEFAULT 0, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
CREATE TABLE marker (id bigint PRIMARY KEY);
INSERT INTO events SELECT g, (ARRAY['eu','us'])[1 + g % 2], 'before' FROM generate_series(1, 200) g;`

// exercisePartitions changes rows in every partition, moves rows between
// partitions, adds a partition and fills it, and truncates one.
func exercisePartitions(t *testing.T, s *site) {
	t.Helper()
	primary := connect(t, s.primaryURL())
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	mustExec(t, primary, `INSERT INTO events SELECT g, (ARRAY['eu','us'])[1 + g % 2], 'after' FROM generate_series(201, 400) g`)
	mustExec(t, primary, `UPDATE events SET body = 'updated', n = n + 1 WHERE id % 3 = 0`)
	mustExec(t, primary, `UPDATE events SET region = 'us' WHERE region = 'eu' AND id % 7 = 0`) // moves rows between partitions
	mustExec(t, primary, `DELETE FROM events WHERE id % 11 = 0`)
	mustExec(t, primary, `CREATE TABLE events_apac PARTITION OF events FOR VALUES IN ('apac')`)
	mustExec(t, primary, `INSERT INTO events SELECT g, 'apac', 'new region' FROM generate_series(1, 50) g`)
	mustExec(t, primary, `TRUNCATE events_us`)
	mustExec(t, primary, `INSERT INTO events SELECT g, 'us', 'after truncate' FROM generate_series(1, 20) g`)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	tables := map[string]string{"events_eu": "id", "events_us": "id", "events_apac": "id", "events": "id, region"}
	assertEqual(t, primary, dr, tables)
}

// TestPartitionedTables: rows land in the matching partitions on both
// sides, whether each partition is published as a table of its own (the
// default) or everything via the partition root, also when they move
// between partitions, a partition is added or one is truncated on its own
// (which PostgreSQL does not publish via the root: haven captures it).
func TestPartitionedTables(t *testing.T) {
	for _, mode := range []struct {
		name string
		args []string
	}{
		{"per partition", nil},
		{"via the partition root", []string{"--publish-via-partition-root"}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			s := newSite(t)
			primary := connect(t, s.primaryURL())
			mustExec(t, primary, partitionedSchema)
			startHaven(t, "agent", s.agentArgs(mode.args...)...)
			startHaven(t, "standby", s.standbyArgs()...)
			exercisePartitions(t, s)
		})
	}
}
