package e2e

import (
	"strings"
	"testing"
	"time"
)

// TestRowLevelSecurityHidesNoRows: an agent whose role is subject to a
// table's row-level security policies would copy only the rows they let it
// see (here none: FORCE applies them to the owner too). It refuses to
// start, saying how to let it see every row; given BYPASSRLS, every row
// reaches DR.
func TestRowLevelSecurityHidesNoRows(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `CREATE ROLE haven LOGIN REPLICATION; GRANT CREATE ON DATABASE crm TO haven; GRANT CREATE ON SCHEMA public TO haven`)
	agentURL := strings.Replace(s.primaryURL(), "postgres@", "haven@", 1)
	mustExec(t, connect(t, agentURL), `CREATE TABLE tenant_notes (id bigint PRIMARY KEY, tenant text NOT NULL, body text);
		CREATE TABLE marker (id bigint PRIMARY KEY);
		INSERT INTO tenant_notes SELECT g, 'tenant' || (g % 3), 'note ' || g FROM generate_series(1, 300) g;
		ALTER TABLE tenant_notes ENABLE ROW LEVEL SECURITY; ALTER TABLE tenant_notes FORCE ROW LEVEL SECURITY;
		CREATE POLICY own_tenant ON tenant_notes USING (tenant = current_setting('app.tenant', true))`)
	args := s.agentArgs()
	args[2] = agentURL

	refused := startHaven(t, "agent-under-policies", args...)
	waitFor(t, 30*time.Second, "the agent to refuse", func() (bool, error) { return refused.exited(), nil })
	if out := refused.output(); !strings.Contains(out, "public.tenant_notes") || !strings.Contains(out, `ALTER ROLE "haven" BYPASSRLS`) {
		t.Fatalf("the agent did not name the table and the fix:\n%s", tail(out, 5))
	}

	mustExec(t, primary, `ALTER ROLE haven BYPASSRLS`)
	startHaven(t, "agent", args...)
	startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	mustExec(t, primary, `INSERT INTO tenant_notes VALUES (301, 'tenant9', 'after the snapshot')`)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	assertEqual(t, primary, dr, map[string]string{"tenant_notes": "id"})
}
