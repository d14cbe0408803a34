package e2e

import (
	"testing"
	"time"
)

// TestMillionRowTransactionInBoundedMemory replicates one transaction of
// 1,000,000 rows: neither process may hold it whole. Peak RSS of both is
// logged and bounded at 256 MiB.
func TestMillionRowTransactionInBoundedMemory(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `CREATE TABLE events (id bigint PRIMARY KEY, account_id int, kind text, payload text);
		CREATE TABLE marker (id bigint PRIMARY KEY)`)
	agent := startHaven(t, "agent", s.agentArgs()...)
	standby := startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	start := time.Now()
	mustExec(t, primary, `INSERT INTO events SELECT g, g % 1000, 'import', 'row ' || g || ' ' || md5(g::text) FROM generate_series(1, 1000000) g`)
	t.Logf("1,000,000-row transaction committed on the primary in %s", time.Since(start).Round(time.Millisecond))
	waitCaughtUp(t, primary, dr, 2, 5*time.Minute)
	t.Logf("replicated to DR %s after the commit", time.Since(start).Round(time.Millisecond))
	assertEqual(t, primary, dr, map[string]string{"events": "id"})

	const limit = 256 << 20
	for _, p := range []*proc{agent, standby} {
		rss := p.peakRSS()
		t.Logf("peak RSS of %s: %.1f MiB", p.name, float64(rss)/(1<<20))
		if rss <= 0 || rss > limit {
			t.Errorf("peak RSS of %s is %d bytes, want (0, %d]", p.name, rss, limit)
		}
	}
}
