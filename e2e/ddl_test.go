package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// schemaOf lists the user schema as both sides must agree on it: columns
// (by name, with type, default and nullability) and index definitions.
func schemaOf(t *testing.T, conn *pgx.Conn) []string {
	t.Helper()
	rows, err := conn.Query(t.Context(), `
SELECT format('%s.%s.%s %s default=%s null=%s', table_schema, table_name, column_name,
              CASE WHEN data_type = 'USER-DEFINED' THEN udt_name ELSE data_type END, column_default, is_nullable)
FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', 'information_schema', 'haven')
UNION ALL
SELECT format('index %s.%s: %s', schemaname, indexname, indexdef) FROM pg_indexes WHERE schemaname NOT IN ('pg_catalog', 'haven')
UNION ALL
SELECT format('enum %s: %s', t.typname, string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder))
FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid GROUP BY t.typname
ORDER BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	list, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return list
}

func assertSameSchema(t *testing.T, primary, dr *pgx.Conn) {
	t.Helper()
	want, got := schemaOf(t, primary), schemaOf(t, dr)
	if strings.Join(want, "\n") != strings.Join(got, "\n") {
		t.Errorf("schemas differ:\nprimary:\n  %s\nDR:\n  %s", strings.Join(want, "\n  "), strings.Join(got, "\n  "))
	} else {
		t.Logf("schemas equal (%d columns, indexes and enums)", len(want))
	}
}

// TestDDLIsReplayedInOrder makes the schema changes a CRM's migrations make
// while data flows, each followed at once by changes that need it; the DR
// site ends with the same schema and the same rows. A DDL already made on
// DR by hand does not stop apply; a DDL that fails on DR stops it until DR
// is fixed, with nothing after it applied.
func TestDDLIsReplayedInOrder(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 50)
	// A comment over several lines, one of them starting like a psql
	// meta-command, travels in the snapshot's schema.
	const comment = "Imported from\n\\\\fileserver\\crm (don't edit)\nALTER TABLE public.deals OWNER TO nobody;"
	mustExec(t, primary, `COMMENT ON TABLE deals IS '`+strings.ReplaceAll(comment, "'", "''")+"'")
	startHaven(t, "agent", s.agentArgs()...)
	standby := startHaven(t, "standby", s.standbyArgs("--http-addr", "127.0.0.1:0")...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	var drComment string
	if err := dr.QueryRow(t.Context(), `SELECT coalesce(obj_description('deals'::regclass, 'pg_class'), '')`).Scan(&drComment); err != nil || drComment != comment {
		t.Errorf("DR's comment on deals is %q (%v), want %q: the snapshot's schema did not carry it", drComment, err, comment)
	}

	steps := []string{
		`CREATE SCHEMA sales`,
		`CREATE TABLE sales.quotas (id serial PRIMARY KEY, rep text NOT NULL, amount numeric(12,2))`,
		`INSERT INTO sales.quotas (rep, amount) SELECT 'rep' || g, g * 100 FROM generate_series(1, 20) g`,
		`ALTER TABLE contacts ADD COLUMN score int DEFAULT 0`,
		`UPDATE contacts SET score = id % 10, n = n + 1 WHERE id % 3 = 0`,
		`ALTER TABLE contacts RENAME COLUMN phone TO phone_number`,
		`UPDATE contacts SET phone_number = '+44-' || id, n = n + 1 WHERE id % 4 = 0`,
		`ALTER TABLE deals ALTER COLUMN amount TYPE numeric(16,4)`,
		`UPDATE deals SET amount = amount + 0.1234, n = n + 1 WHERE id % 5 = 0`,
		`ALTER TABLE deals ALTER COLUMN stage SET DEFAULT 'new', ALTER COLUMN title SET NOT NULL`,
		`INSERT INTO deals (account_id, title) VALUES (1, 'defaulted stage')`,
		`CREATE INDEX contacts_email ON contacts (email)`,
		`CREATE INDEX CONCURRENTLY deals_stage ON deals (stage)`,
		`CREATE UNIQUE INDEX quotas_rep ON sales.quotas (rep)`,
		`DROP INDEX contacts_email`,
		`ALTER TABLE activities DROP COLUMN kind`,
		`INSERT INTO activities (contact_id, body) VALUES (1, 'after drop column')`,
		`CREATE TYPE priority AS ENUM ('low', 'high')`,
		`ALTER TYPE priority ADD VALUE 'urgent'`,
		`ALTER TABLE deals ADD COLUMN prio priority`,
		`UPDATE deals SET prio = 'urgent', n = n + 1 WHERE id < 5`,
		// Several statements, DDL and data, in one query string.
		`CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'one'), (2, 'two'); ALTER TABLE notes ADD COLUMN at timestamptz DEFAULT '2024-01-01'`,
		`INSERT INTO notes (id, body) VALUES (3, 'three')`,
		// Temporary tables are not captured.
		`CREATE TEMP TABLE scratch (x int); DROP TABLE scratch`,
		// The search_path in force travels with the DDL.
		`SET search_path TO sales, public; CREATE TABLE leads (id int PRIMARY KEY, who text); INSERT INTO leads VALUES (1, 'lead'); RESET search_path`,
		`DROP TABLE sales.quotas`,
		// One text switching schemas between its statements.
		`SET search_path = sales; CREATE TABLE log2 (id int PRIMARY KEY); SET search_path = public; CREATE TABLE log2 (id int PRIMARY KEY); RESET search_path`,
		// No key: never published; DR gets the table but says its rows will not follow.
		`CREATE TABLE scratchpad (note text)`,
		`CREATE TABLE deferred (id int PRIMARY KEY DEFERRABLE)`,
		// Given its key later in the same transaction, as pg_dump writes it:
		// replicated, and no alarm.
		`CREATE TABLE keyed_later (id int NOT NULL, v text); INSERT INTO keyed_later VALUES (1, 'before the key');
		 ALTER TABLE ONLY keyed_later ADD CONSTRAINT keyed_later_pkey PRIMARY KEY (id); INSERT INTO keyed_later VALUES (2, 'after')`,
		// CREATE TABLE … AS in a text of several statements, first and
		// not: DR gets the table (its rows by backfill), and the rest.
		`CREATE TABLE big_deals AS SELECT id, title FROM deals WHERE id % 2 = 0; ALTER TABLE big_deals ADD PRIMARY KEY (id)`,
		`ALTER TABLE notes ADD COLUMN src text; CREATE TABLE odd_deals AS SELECT id, amount FROM deals WHERE id % 2 = 1 WITH DATA;
		 ALTER TABLE odd_deals ADD PRIMARY KEY (id); UPDATE odd_deals SET amount = 0 WHERE id = 1`,
	}
	for _, st := range steps {
		if err := primary.PgConn().Exec(t.Context(), st).Close(); err != nil {
			t.Fatalf("%s: %v", st, err)
		}
	}
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	assertSameSchema(t, primary, dr)
	waitFor(t, 60*time.Second, "the new tables' backfills to finish", func() (bool, error) {
		n, err := backfillsOnDR(t.Context(), dr)
		return n == 0, err
	})
	assertEqual(t, primary, dr, map[string]string{"contacts": "id", "deals": "id", "activities": "id", "notes": "id", "sales.leads": "id",
		"big_deals": "id", "odd_deals": "id", "keyed_later": "id"})
	if !strings.Contains(standby.output(), "table public.scratchpad has no primary key") {
		t.Error("the standby did not report that the key-less table is not replicated")
	}
	if !strings.Contains(standby.output(), "table public.deferred has no primary key or replica identity (its primary key is DEFERRABLE") {
		t.Error("the standby did not report that a table with a deferrable key is not replicated, and why")
	}
	if strings.Contains(standby.output(), "table public.keyed_later") {
		t.Error("the standby reported a table given its key in the transaction that created it as not replicated")
	}

	// Made on DR by hand first: replay finds it in effect and goes on.
	drWriter := connect(t, s.drWriteURL())
	mustExec(t, drWriter, `ALTER TABLE notes ADD COLUMN tag text`)
	mustExec(t, primary, `ALTER TABLE notes ADD COLUMN tag text`)
	mustExec(t, primary, `UPDATE notes SET tag = 'tagged'`)
	waitCaughtUp(t, primary, dr, 3, 60*time.Second)
	assertEqual(t, primary, dr, map[string]string{"notes": "id"})

	// A DDL that cannot succeed on DR (a row there was changed behind
	// haven's back) stops apply at it; nothing after it is applied.
	mustExec(t, drWriter, `UPDATE deals SET amount = -1 WHERE id = 1`)
	mustExec(t, primary, `ALTER TABLE deals ADD CONSTRAINT amount_positive CHECK (amount >= 0)`)
	mustExec(t, primary, `INSERT INTO notes (id, body) VALUES (100, 'after the failing DDL')`)
	waitFor(t, 30*time.Second, "apply to stop at the failing DDL", func() (bool, error) {
		return strings.Contains(standby.output(), `"reason":"ddl failed"`), nil
	})
	var after int
	if err := dr.QueryRow(t.Context(), `SELECT count(*) FROM notes WHERE id = 100`).Scan(&after); err != nil || after != 0 {
		t.Fatalf("a change after the failing DDL was applied (%d, %v)", after, err)
	}
	mustExec(t, drWriter, `UPDATE deals SET amount = (SELECT 0) WHERE id = 1`)
	waitCaughtUp(t, primary, dr, 4, 60*time.Second)
	mustExec(t, primary, `UPDATE deals SET amount = 1 WHERE id = 1`)
	waitCaughtUp(t, primary, dr, 5, 60*time.Second)
	assertSameSchema(t, primary, dr)
	assertEqual(t, primary, dr, map[string]string{"deals": "id", "notes": "id"})
}

// TestDDLDecodedBeforeItIsVisible: a migration that makes an enum, a
// domain and a table of them (and of an array of the enum) and fills the
// table, in one transaction a synchronous standby holds back: the agent
// decodes it before its types are visible to anyone. Then the same with
// the agent as that synchronous standby. DR gets it all.
func TestDDLDecodedBeforeItIsVisible(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 5)
	agent := startHaven(t, "agent", s.agentArgs()...)
	startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)
	heldBackCommit(t, s.primaryURL(), `CREATE TYPE tier AS ENUM ('bronze', 'gold'); CREATE DOMAIN score AS numeric(5,2) CHECK (VALUE >= 0);
		CREATE TABLE loyalty (id int PRIMARY KEY, tier tier, past tier[], points score);
		INSERT INTO loyalty SELECT g, 'gold', ARRAY['bronze', 'gold']::tier[], g / 3.0 FROM generate_series(1, 50) g`, func() bool {
		return strings.Contains(agent.output(), "not visible yet")
	})
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	assertSameSchema(t, primary, dr)
	assertEqual(t, primary, dr, map[string]string{"loyalty": "id"})

	// With the agent as the synchronous standby, the transaction waits for
	// the agent, which cannot see its type before it ends: the agent names
	// the type from the stream after a while.
	agent.stop()
	agent = startHaven(t, "agent", s.agentArgs("--synchronous")...)
	waitFor(t, 30*time.Second, "the agent to be the synchronous standby", func() (bool, error) {
		var sync bool
		err := primary.QueryRow(t.Context(), `SELECT EXISTS (SELECT FROM pg_stat_replication WHERE sync_state = 'sync')`).Scan(&sync)
		return sync, err
	})
	mustExec(t, primary, `CREATE TYPE stage AS ENUM ('lead', 'won'); CREATE TABLE pipeline (id int PRIMARY KEY, stage stage, history stage[]);
		INSERT INTO pipeline SELECT g, 'won', '{lead,won}' FROM generate_series(1, 50) g`)
	waitCaughtUp(t, primary, dr, 3, 60*time.Second)
	assertSameSchema(t, primary, dr)
	assertEqual(t, primary, dr, map[string]string{"loyalty": "id", "pipeline": "id"})
	if !strings.Contains(agent.output(), "named it from the stream") {
		t.Error("the agent did not say it named a type it could not see from the stream")
	}
}

// TestDDLCannotEscalate: a role that may only create tables tries to make
// haven's DDL capture (which runs with a superuser's rights) or DDL replay
// on DR (which runs on a superuser's connection) act for it; neither does.
func TestDDLCannotEscalate(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	dr := connect(t, s.drURL())
	for _, conn := range []*pgx.Conn{primary, dr} {
		mustExec(t, conn, `CREATE ROLE mallory LOGIN; GRANT CREATE ON SCHEMA public TO mallory`)
	}
	mustExec(t, primary, `CREATE TABLE marker (id bigint PRIMARY KEY)`)
	startHaven(t, "agent", s.agentArgs()...)
	startHaven(t, "standby", s.standbyArgs()...)
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	mallory := connect(t, strings.Replace(s.primaryURL(), "postgres@", "mallory@", 1))
	mustExec(t, mallory, `
CREATE FUNCTION public.evil(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
	BEGIN EXECUTE 'ALTER ROLE mallory SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
	RETURN a OPERATOR(pg_catalog.<>) b;
END $$;
CREATE OPERATOR public.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = public.evil);
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.evil);`)
	mustExec(t, mallory, `SET search_path = public, pg_catalog`)
	mustExec(t, mallory, `CREATE TABLE public.harmless (id int PRIMARY KEY)`)
	mustExec(t, mallory, `RESET search_path`)
	// Harmless where it runs first, a superuser role where run by one.
	mustExec(t, mallory, `DO $$ BEGIN
		CREATE TABLE mal_t (id int PRIMARY KEY);
		IF current_user::text OPERATOR(pg_catalog.<>) 'mallory' THEN EXECUTE 'CREATE ROLE pwned SUPERUSER LOGIN'; END IF;
	END $$`)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)

	var super bool
	if err := primary.QueryRow(t.Context(), `SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'`).Scan(&super); err != nil || super {
		t.Errorf("mallory became superuser on the primary through haven's DDL capture (%v)", err)
	}
	var pwned int
	if err := dr.QueryRow(t.Context(), `SELECT count(*) FROM pg_roles WHERE rolname = 'pwned'`).Scan(&pwned); err != nil || pwned != 0 {
		t.Errorf("DDL replay on DR created a superuser role for mallory (%v)", err)
	}
	var owner string
	if err := dr.QueryRow(t.Context(), `SELECT tableowner FROM pg_tables WHERE tablename = 'mal_t'`).Scan(&owner); err != nil || owner != "mallory" {
		t.Errorf("mallory's table on DR is owned by %q (%v), want mallory: DDL replays as the role that ran it", owner, err)
	}
}

// TestAddedColumnsReadThePrimarysValues: DDL replays under the date and
// time settings it ran under on the primary, and the rows a column is added
// to read on DR the value its default gave them on the primary (now() and
// current_setting() are evaluated once by ADD COLUMN, and again, to
// another value, by DR's replay).
func TestAddedColumnsReadThePrimarysValues(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `CREATE TABLE notes (id int PRIMARY KEY, body text); CREATE TABLE marker (id bigint PRIMARY KEY);
		CREATE TABLE visits (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
		CREATE TABLE visits_eu PARTITION OF visits FOR VALUES IN ('eu');
		INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 50) g; INSERT INTO visits SELECT g, 'eu' FROM generate_series(1, 20) g`)
	startHaven(t, "agent", s.agentArgs()...)
	startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	for _, st := range []string{
		`SET TimeZone = 'Asia/Tokyo'`, `SET DateStyle = 'SQL, DMY'`, `SET application_name = 'crm-migration'`,
		`ALTER TABLE notes ADD COLUMN created timestamptz NOT NULL DEFAULT now(), ADD COLUMN source text DEFAULT current_setting('application_name'),
			ADD COLUMN due date DEFAULT '03/04/2020', ADD COLUMN starts timestamptz DEFAULT '2020-01-01 00:00', ADD COLUMN priority int DEFAULT 3`,
		`ALTER TABLE visits ADD COLUMN seen timestamptz DEFAULT now()`,
		`ALTER TABLE notes ALTER COLUMN due TYPE text`,
		`INSERT INTO notes (id, body) VALUES (51, 'after')`,
		`RESET ALL`,
	} {
		mustExec(t, primary, st)
	}
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	assertEqual(t, primary, dr, map[string]string{"notes": "id", "visits": "id"})
	var due string
	if err := dr.QueryRow(t.Context(), `SELECT due FROM notes WHERE id = 1`).Scan(&due); err != nil || due != "03/04/2020" {
		t.Errorf("due on DR is %q (%v), want 03/04/2020 as the primary printed it", due, err)
	}
}

// TestDDLOfAQueryStringReplaysWhereEachStatementRan: a migration sent as
// one query string, with data changes between its DDL statements, replays
// each DDL statement at its own place in the stream, so that the rows
// changed between them land in the columns they were written to.
func TestDDLOfAQueryStringReplaysWhereEachStatementRan(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `CREATE TABLE pairs (id int PRIMARY KEY, a int, b int); CREATE TABLE people (id int PRIMARY KEY, first text, last text);
		CREATE TABLE marker (id bigint PRIMARY KEY);
		INSERT INTO pairs SELECT g, g, -g FROM generate_series(1, 10) g; INSERT INTO people SELECT g, 'First' || g, 'Last' || g FROM generate_series(1, 10) g`)
	startHaven(t, "agent", s.agentArgs()...)
	startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	mustExec(t, primary, `ALTER TABLE pairs ADD COLUMN note text; UPDATE pairs SET a = 1, b = 2 WHERE id <= 5;
		ALTER TABLE pairs RENAME a TO tmp; ALTER TABLE pairs RENAME b TO a; ALTER TABLE pairs RENAME tmp TO b; UPDATE pairs SET note = 'swapped'`)
	mustExec(t, primary, `ALTER TABLE people ADD COLUMN fullname text; UPDATE people SET fullname = first || ' ' || last;
		ALTER TABLE people DROP COLUMN first, DROP COLUMN last`)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	assertEqual(t, primary, dr, map[string]string{"pairs": "id", "people": "id"})
	assertSameSchema(t, primary, dr)
}

// TestVolatileRewriteIsRefused: a column filled on the primary with values
// DR would compute differently (a volatile default) cannot be replicated by
// replaying the DDL; apply stops there and says so instead of diverging.
func TestVolatileRewriteIsRefused(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `CREATE TABLE tokens (id int PRIMARY KEY); CREATE TABLE marker (id bigint PRIMARY KEY);
		INSERT INTO tokens SELECT generate_series(1, 50)`)
	startHaven(t, "agent", s.agentArgs()...)
	standby := startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	mustExec(t, primary, `ALTER TABLE tokens ADD COLUMN token text DEFAULT md5(random()::text)`)
	waitFor(t, 30*time.Second, "apply to refuse the rewrite", func() (bool, error) {
		return strings.Contains(standby.output(), `"reason":"ddl not replayable"`), nil
	})
	var columns int
	if err := dr.QueryRow(t.Context(), `SELECT count(*) FROM information_schema.columns WHERE table_name = 'tokens' AND column_name = 'token'`).Scan(&columns); err != nil || columns != 0 {
		t.Errorf("the refused DDL was applied on DR (%d, %v)", columns, err)
	}
}

// TestRewritesReplayWhereDRComputesTheSameValues: a DDL that rewrote a
// table to compute a column's values (a stored generated column, a domain
// with a check, a USING expression) replays when DR's rows come out as the
// primary's, and stops apply where they do not (a USING expression that
// calls random()).
func TestRewritesReplayWhereDRComputesTheSameValues(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `CREATE DOMAIN positive AS int CHECK (VALUE > 0);
		CREATE TABLE tokens (id int PRIMARY KEY, n int); CREATE TABLE amounts (id int PRIMARY KEY, cents int); CREATE TABLE marker (id bigint PRIMARY KEY);
		INSERT INTO tokens SELECT g, g FROM generate_series(1, 50) g; INSERT INTO amounts SELECT g, g * 101 FROM generate_series(1, 50) g`)
	startHaven(t, "agent", s.agentArgs()...)
	standby := startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	mustExec(t, primary, `ALTER TABLE tokens ADD COLUMN doubled int GENERATED ALWAYS AS (n * 2) STORED`)
	mustExec(t, primary, `ALTER TABLE tokens ADD COLUMN rank positive DEFAULT 7`)
	mustExec(t, primary, `ALTER TABLE amounts ALTER COLUMN cents TYPE numeric(12,2) USING cents / 100.0`)
	mustExec(t, primary, `INSERT INTO tokens (id, n) VALUES (51, 51); INSERT INTO amounts VALUES (51, 0.51)`)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	assertEqual(t, primary, dr, map[string]string{"tokens": "id", "amounts": "id"})
	assertSameSchema(t, primary, dr)

	mustExec(t, primary, `ALTER TABLE amounts ALTER COLUMN cents TYPE float8 USING cents + random()`)
	waitFor(t, 30*time.Second, "apply to refuse the rewrite", func() (bool, error) {
		return strings.Contains(standby.output(), `"reason":"ddl not replayable"`), nil
	})
	if out := standby.output(); !strings.Contains(out, `left \"public\".\"amounts\" (51 rows) with other values`) {
		t.Errorf("the refusal does not name the table that came out differently:\n%s", out)
	}
	var typ string
	if err := dr.QueryRow(t.Context(), `SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'amounts'::regclass AND attname = 'cents'`).Scan(&typ); err != nil || typ != "numeric(12,2)" {
		t.Errorf("cents on DR is %q (%v): the refused DDL was applied", typ, err)
	}
}

// TestDDLOfAGroupOfSomeTables: a group limited with --tables replays the
// DDL of its tables and leaves out DDL on tables outside it.
func TestDDLOfAGroupOfSomeTables(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	seedCRM(t, primary, 10)
	startHaven(t, "agent", s.agentArgs("--tables", "accounts,marker")...)
	startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	mustExec(t, primary, `CREATE TABLE other (id int PRIMARY KEY)`)
	mustExec(t, primary, `ALTER TABLE other ADD COLUMN v int`)
	mustExec(t, primary, `CREATE INDEX other_v ON other (v)`)
	mustExec(t, primary, `ALTER TABLE accounts ADD COLUMN tier int`)
	mustExec(t, primary, `UPDATE accounts SET tier = id % 3`)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	assertEqual(t, primary, dr, map[string]string{"accounts": "id"})
	var others int
	if err := dr.QueryRow(t.Context(), `SELECT count(*) FROM pg_class WHERE relname IN ('other', 'other_v')`).Scan(&others); err != nil || others != 0 {
		t.Errorf("DDL on a table outside the group reached DR (%d objects, %v)", others, err)
	}
}
