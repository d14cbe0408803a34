package e2e

import (
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// TestAnAgentThatIsNotASuperuser: the agent runs as a role that is not a
// superuser, once a superuser ran what --print-ddl-capture prints for it.
// The snapshot (with the tables' owners and grants), changes and DDL reach
// DR, the owner's DDL too, and tables another role creates join the group. A table that joins with rows the agent may not read (no
// SELECT on it, or row-level security that applies to the agent's role)
// holds only its own backfill, and the agent says what to grant; the stream
// goes on meanwhile. Once granted, every row reaches DR.
func TestAnAgentThatIsNotASuperuser(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	dr := connect(t, s.drURL())
	mustExec(t, primary, `CREATE ROLE haven LOGIN REPLICATION; GRANT CREATE ON DATABASE crm TO haven; GRANT CREATE ON SCHEMA public TO haven`)
	for _, conn := range []*pgx.Conn{primary, dr} {
		// DR replays DDL as the role that ran it.
		mustExec(t, conn, `CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app`)
	}
	mustExec(t, dr, `CREATE ROLE haven`)
	agentURL := strings.Replace(s.primaryURL(), "postgres@", "haven@", 1)
	owner := connect(t, agentURL)
	// Owners and grants reach DR with the snapshot's schema; one to a role
	// DR lacks is a warning, not a failure.
	mustExec(t, primary, `CREATE ROLE auditor`)
	mustExec(t, owner, `CREATE TABLE notes (id bigint PRIMARY KEY, body text); CREATE TABLE marker (id bigint PRIMARY KEY);
		INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 100) g;
		GRANT SELECT, INSERT ON notes TO app; GRANT SELECT ON notes TO auditor`)
	args := s.agentArgs()
	args[2] = agentURL

	script, err := exec.Command(havenBin, append(args, "--print-ddl-capture")...).Output()
	if err != nil {
		t.Fatalf("haven agent --print-ddl-capture: %v", err)
	}
	mustExec(t, primary, string(script))
	agent := startHaven(t, "agent", args...)
	standby := startHaven(t, "standby", s.standbyArgs()...)
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	var notesOwner string
	var appMayWrite bool
	if err := dr.QueryRow(t.Context(), `SELECT tableowner, has_table_privilege('app', 'public.notes', 'INSERT') FROM pg_tables WHERE tablename = 'notes'`).
		Scan(&notesOwner, &appMayWrite); err != nil || notesOwner != "haven" || !appMayWrite {
		t.Errorf("DR's notes is owned by %q, app may insert: %v (%v); want the primary's owner (haven) and grant", notesOwner, appMayWrite, err)
	}
	if out := standby.output(); !strings.Contains(out, `GRANT SELECT ON TABLE public.notes TO auditor`) || !strings.Contains(out, `role \"auditor\" does not exist`) {
		t.Errorf("the standby did not warn of the grant to a role DR lacks:\n%s", tail(out, 10))
	}

	app := connect(t, strings.Replace(s.primaryURL(), "postgres@", "app@", 1))
	mustExec(t, app, `CREATE TABLE deals AS SELECT g AS id, 'deal ' || g AS title FROM generate_series(1, 500) g;
		ALTER TABLE deals ADD PRIMARY KEY (id)`)
	mustExec(t, app, `CREATE TABLE tenant_docs AS SELECT g AS id, 'tenant' || (g % 3) AS tenant FROM generate_series(1, 300) g;
		GRANT SELECT ON tenant_docs TO haven;
		ALTER TABLE tenant_docs ENABLE ROW LEVEL SECURITY;
		CREATE POLICY own_tenant ON tenant_docs USING (tenant = current_setting('app.tenant', true));
		ALTER TABLE tenant_docs ADD PRIMARY KEY (id)`)
	waitFor(t, 60*time.Second, "the agent to say what to grant", func() (bool, error) {
		out := agent.output()
		return strings.Contains(out, "GRANT SELECT ON public.deals TO") && strings.Contains(out, "BYPASSRLS") &&
			strings.Contains(out, "public.tenant_docs"), nil
	})

	// The stream goes on: changes, DDL, and changes to the waiting tables.
	// DDL of the table's owner, who is not a superuser, replays on DR.
	mustExec(t, owner, `INSERT INTO notes VALUES (101, 'while two backfills wait'); ALTER TABLE notes ADD COLUMN extra int DEFAULT 7`)
	mustExec(t, app, `INSERT INTO deals VALUES (501, 'after it joined'); UPDATE deals SET title = 'changed' WHERE id = 7;
		DELETE FROM tenant_docs WHERE id = 5`)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	if n, err := backfillsOnDR(t.Context(), dr); err != nil || n != 2 {
		t.Fatalf("DR has %d backfills open (%v), want the 2 that wait", n, err)
	}
	assertEqual(t, primary, dr, map[string]string{"notes": "id"})
	// A restart meanwhile (a deploy, a lost connection) does not stop the
	// agent at the tables that wait.
	agent.kill()
	startHaven(t, "agent", args...)
	mustExec(t, owner, `INSERT INTO notes (id, body) VALUES (102, 'after the restart')`)
	waitCaughtUp(t, primary, dr, 3, 60*time.Second)

	mustExec(t, app, `GRANT SELECT ON deals TO haven`)
	mustExec(t, primary, `ALTER ROLE haven BYPASSRLS`)
	waitFor(t, 60*time.Second, "the backfills to finish", func() (bool, error) {
		n, err := backfillsOnDR(t.Context(), dr)
		return n == 0, err
	})
	waitCaughtUp(t, primary, dr, 4, 60*time.Second)
	assertEqual(t, primary, dr, map[string]string{"notes": "id", "deals": "id", "tenant_docs": "id"})
	assertSameSchema(t, primary, dr)
}

// TestAStandbyThatIsNotASuperuser: the standby's DR role is not a superuser
// (it may set session_replication_role and owns the DR database). The
// snapshot gives DR's tables the owners it may give them: those of roles
// it is a member of. DDL of such an owner replays. DDL of a role it may
// not act as stops apply and names the grant; once given, apply resumes.
func TestAStandbyThatIsNotASuperuser(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	dr := connect(t, s.drURL())
	for _, conn := range []*pgx.Conn{primary, dr} {
		mustExec(t, conn, `CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app; CREATE ROLE other LOGIN; GRANT CREATE ON SCHEMA public TO other`)
	}
	mustExec(t, dr, `CREATE ROLE drapply LOGIN IN ROLE app; ALTER DATABASE crm OWNER TO drapply;
		GRANT CREATE ON SCHEMA public TO drapply; GRANT SET ON PARAMETER session_replication_role TO drapply`)
	app := connect(t, strings.Replace(s.primaryURL(), "postgres@", "app@", 1))
	mustExec(t, app, `CREATE TABLE notes (id bigint PRIMARY KEY, body text); INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 50) g`)
	mustExec(t, primary, `CREATE TABLE marker (id bigint PRIMARY KEY)`)
	startHaven(t, "agent", s.agentArgs()...)
	standbyArgs := s.standbyArgs()
	standbyArgs[2] = strings.Replace(s.drURL(), "postgres@", "drapply@", 1)
	standby := startHaven(t, "standby", standbyArgs...)
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	var notesOwner, markerOwner string
	if err := dr.QueryRow(t.Context(), `SELECT (SELECT tableowner FROM pg_tables WHERE tablename = 'notes'), (SELECT tableowner FROM pg_tables WHERE tablename = 'marker')`).
		Scan(&notesOwner, &markerOwner); err != nil || notesOwner != "app" || markerOwner != "drapply" {
		t.Errorf("DR's notes belongs to %q and marker to %q (%v); want app (its role is one drapply is a member of) and drapply (it may not give it to postgres)",
			notesOwner, markerOwner, err)
	}

	mustExec(t, app, `ALTER TABLE notes ADD COLUMN extra int DEFAULT 7; INSERT INTO notes (id, body) VALUES (51, 'after the DDL')`)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	assertEqual(t, primary, dr, map[string]string{"notes": "id"})

	other := connect(t, strings.Replace(s.primaryURL(), "postgres@", "other@", 1))
	mustExec(t, other, `CREATE TABLE others (id bigint PRIMARY KEY); INSERT INTO others VALUES (1)`)
	waitFor(t, 60*time.Second, "apply to stop at the DDL it may not replay", func() (bool, error) {
		return strings.Contains(standby.output(), `GRANT \"other\" TO \"drapply\"`), nil
	})
	mustExec(t, dr, `GRANT other TO drapply`)
	waitCaughtUp(t, primary, dr, 3, 60*time.Second)
	assertEqual(t, primary, dr, map[string]string{"notes": "id", "others": "id"})
	assertSameSchema(t, primary, dr)
}
