package agent

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/haven-dr/haven/proto/wire"
)

// ddlLogTable is the replicated table DDL is recorded in; the standby
// replays each row's DDL at its place in the stream.
const ddlLogTable = "ddl_log"

// ddlCaptureSQL installs DDL capture on the source: an event trigger that
// records, once per statement text and transaction, the statement text, the
// search_path in force and the command tags into haven.ddl_log. Objects of
// haven itself, temporary objects and objects created by extensions are not
// recorded (CREATE EXTENSION is). Everything the function calls is
// schema-qualified: it runs as its owner, with the caller's search_path.
var ddlCaptureSQL = strings.Replace(`
-- Two agents starting at once install it one after the other.
SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('haven ddl capture'));
-- Installing it again (at every start) is not DDL for the DR site.
SELECT pg_catalog.set_config('haven.internal', 'on', false);
CREATE SCHEMA IF NOT EXISTS haven;
CREATE TABLE IF NOT EXISTS haven.ddl_log (
	id             bigserial PRIMARY KEY,
	txid           bigint NOT NULL DEFAULT pg_catalog.txid_current(),
	at             timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
	username       text NOT NULL,
	search_path    text NOT NULL,
	command_tags   text NOT NULL,
	ddl            text NOT NULL,
	rewrite_reason int NOT NULL DEFAULT 0
);
ALTER TABLE haven.ddl_log ADD COLUMN IF NOT EXISTS rewrite_reason int NOT NULL DEFAULT 0;
ALTER TABLE haven.ddl_log ADD COLUMN IF NOT EXISTS relations oid[] NOT NULL DEFAULT '{}';
ALTER TABLE haven.ddl_log ADD COLUMN IF NOT EXISTS settings jsonb NOT NULL DEFAULT '{}';
ALTER TABLE haven.ddl_log ADD COLUMN IF NOT EXISTS missing_values jsonb NOT NULL DEFAULT '[]';
ALTER TABLE haven.ddl_log ADD COLUMN IF NOT EXISTS ordinal int NOT NULL DEFAULT 0;
ALTER TABLE haven.ddl_log ADD COLUMN IF NOT EXISTS rewrite_digests jsonb;
-- A DR database promoted to primary has the table as its standby made it,
-- without defaults: its ids continue after the replicated ones.
CREATE SEQUENCE IF NOT EXISTS haven.ddl_log_id_seq OWNED BY haven.ddl_log.id;
SELECT pg_catalog.setval('haven.ddl_log_id_seq', GREATEST(pg_catalog.nextval('haven.ddl_log_id_seq'),
	(SELECT COALESCE(max(id), 0) + 1 FROM haven.ddl_log)), false);
ALTER TABLE haven.ddl_log ALTER COLUMN id SET DEFAULT pg_catalog.nextval('haven.ddl_log_id_seq'),
	ALTER COLUMN txid SET DEFAULT pg_catalog.txid_current(), ALTER COLUMN at SET DEFAULT pg_catalog.clock_timestamp();
CREATE INDEX IF NOT EXISTS ddl_log_txid ON haven.ddl_log (txid);
COMMENT ON TABLE haven.ddl_log IS 'haven: DDL run on this database, replicated and replayed on the DR site in stream order, as the role that ran it';
REVOKE ALL ON haven.ddl_log FROM PUBLIC;

CREATE TABLE IF NOT EXISTS haven.groups (
	name        text PRIMARY KEY,
	publication text NOT NULL,
	all_tables  boolean NOT NULL
);
ALTER TABLE haven.groups ADD COLUMN IF NOT EXISTS via_root boolean NOT NULL DEFAULT false;

-- Published via its partitioned root, a TRUNCATE of one partition is not
-- sent by PostgreSQL at all: this statement trigger on every such partition
-- sends it through the log, for the DR site to replay.
CREATE OR REPLACE FUNCTION haven.capture_partition_truncate() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	INSERT INTO haven.ddl_log (username, search_path, command_tags, ddl)
	VALUES (session_user, '', 'TRUNCATE', format('TRUNCATE ONLY %s', TG_RELID::regclass));
	RETURN NULL;
END $$;

-- capture_truncate_of adds that trigger to a partition.
CREATE OR REPLACE FUNCTION haven.capture_truncate_of(partition regclass) RETURNS void LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	PERFORM set_config('haven.internal', 'on', true);
	EXECUTE format('CREATE OR REPLACE TRIGGER haven_capture_truncate BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION haven.capture_partition_truncate()', partition);
	PERFORM set_config('haven.internal', 'off', true);
END $$;
COMMENT ON TABLE haven.groups IS 'haven: replication groups captured from this database; all_tables groups get new tables added to their publication';
ALTER TABLE haven.groups ADD COLUMN IF NOT EXISTS write_guard boolean NOT NULL DEFAULT false;

-- The write guard of a primary run with controllers: a statement trigger on
-- every table refuses writes unless haven.write_grant names this server's
-- current start. The agent writes that grant only while it holds the
-- quorum's lease, so a primary that restarts (after a crash, or after a
-- failover) takes no write until its agent confirms it is still primary.
-- Sessions applying a stream (session_replication_role = replica, which
-- only a superuser may set) pass: the trigger is not ENABLE ALWAYS.
CREATE TABLE IF NOT EXISTS haven.write_grant (
	id               boolean PRIMARY KEY DEFAULT true CHECK (id),
	postmaster_start timestamptz,
	unguarded        boolean NOT NULL DEFAULT false,
	epoch            bigint NOT NULL DEFAULT 0,
	granted_at       timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE haven.write_grant IS 'haven: the server start during which this database may take writes (its agent holds the lease); unguarded when no controllers are used';
REVOKE ALL ON haven.write_grant FROM PUBLIC;
GRANT SELECT ON haven.write_grant TO PUBLIC;

-- Run as the writer: one index lookup per statement.
CREATE OR REPLACE FUNCTION haven.guard_writes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM haven.write_grant g WHERE g.id AND
	               (g.unguarded OR g.postmaster_start OPERATOR(pg_catalog.=) pg_catalog.pg_postmaster_start_time())) THEN
		RAISE EXCEPTION 'haven: % refused on %: this server is not confirmed as the primary since it started', tg_op, tg_relid::pg_catalog.regclass
			USING ERRCODE = 'read_only_sql_transaction',
			      HINT = 'Writes resume when its haven agent holds the controllers'' lease; if the DR site was promoted, write there (haven ctl status).';
	END IF;
	RETURN NULL;
END $$;

-- guard_table puts the write guard on a table, unless it has it.
CREATE OR REPLACE FUNCTION haven.guard_table(rel regclass) RETURNS void LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	internal text := current_setting('haven.internal', true);
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'haven_guard') THEN
		PERFORM set_config('haven.internal', 'on', true);
		EXECUTE format('CREATE TRIGGER haven_guard BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION haven.guard_writes()', rel);
		PERFORM set_config('haven.internal', coalesce(internal, 'off'), true);
	END IF;
END $$;

-- A table refused by publish_new_tables is reported when its transaction
-- commits, if it still is not published: one given its key later in the
-- same transaction (CREATE TABLE, then ALTER TABLE … ADD PRIMARY KEY, as
-- pg_dump writes it) joins the publication then, and is no alarm.
CREATE TABLE IF NOT EXISTS haven.pending_refusals (
	relid       oid NOT NULL,
	publication text NOT NULL,
	refusal     text NOT NULL
);
REVOKE ALL ON haven.pending_refusals FROM PUBLIC;
CREATE OR REPLACE FUNCTION haven.report_refusal() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	DELETE FROM haven.pending_refusals WHERE relid = NEW.relid AND publication = NEW.publication;
	IF FOUND AND EXISTS (SELECT 1 FROM pg_class WHERE oid = NEW.relid)
	   AND NOT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
	                   WHERE r.prrelid = NEW.relid AND p.pubname = NEW.publication) THEN
		RAISE WARNING 'haven: %', NEW.refusal;
		-- Also through the stream, so the DR site reports it.
		INSERT INTO haven.ddl_log (username, search_path, command_tags, ddl)
		VALUES (session_user, '', 'HAVEN NOT REPLICATED', '-- haven: ' || NEW.refusal);
	END IF;
	RETURN NULL;
END $$;
DO $$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgname = 'haven_report_refusal' AND tgrelid = 'haven.pending_refusals'::regclass) THEN
		CREATE CONSTRAINT TRIGGER haven_report_refusal AFTER INSERT ON haven.pending_refusals DEFERRABLE INITIALLY DEFERRED
			FOR EACH ROW EXECUTE FUNCTION haven.report_refusal();
	END IF;
END $$;

-- publish_new_tables adds a table just created (or just given a usable
-- replica identity) to the publication of every all-tables group, so its
-- rows are captured from its first insert; rows it already holds (CREATE
-- TABLE AS, a key added later) are backfilled. A table without a usable
-- identity is never added (the primary's own UPDATEs on it would fail);
-- the client is warned instead, at commit (see report_refusal). Like every function here that runs with
-- its owner's rights, it runs with search_path pg_catalog: a caller's
-- objects (an operator named <>) cannot stand in for the built-in ones.
CREATE OR REPLACE FUNCTION haven.publish_new_tables() RETURNS void LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	t       record;
	grp     record;
	refusal text;
BEGIN
	-- The tables the command made or changed, and their partitions (a key
	-- added to a partitioned table, a partition attached).
	FOR t IN SELECT DISTINCT x.oid::regclass AS rel, x.oid AS relid, n.nspname, k.relname, k.relkind, k.relreplident, k.relpersistence,
	                k.relispartition, pg_relation_size(x.oid) > 0 AS has_rows,
	                EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = x.oid AND
	                        i.indimmediate AND ((k.relreplident = 'd' AND i.indisprimary) OR (k.relreplident = 'i' AND i.indisreplident))) AS has_key,
	                EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = x.oid AND i.indimmediate AND i.indisprimary) AS has_pk
	         FROM (SELECT c.objid FROM pg_event_trigger_ddl_commands() c WHERE c.object_type = 'table' AND NOT c.in_extension
	               UNION
	               SELECT p.relid FROM pg_event_trigger_ddl_commands() c, pg_partition_tree(c.objid) p
	               WHERE c.object_type = 'table' AND NOT c.in_extension) x(oid)
	         JOIN pg_class k ON k.oid = x.oid JOIN pg_namespace n ON n.oid = k.relnamespace
	         WHERE n.nspname <> 'haven' AND n.nspname NOT LIKE 'pg\_temp%'
	LOOP
		CONTINUE WHEN t.relpersistence <> 'p';
		IF t.relkind IN ('r', 'p') AND EXISTS (SELECT 1 FROM haven.groups g WHERE g.write_guard) THEN
			PERFORM haven.guard_table(t.rel);
		END IF;
		IF t.relkind = 'r' AND t.relispartition AND EXISTS (SELECT 1 FROM haven.groups g WHERE g.via_root) THEN
			PERFORM haven.capture_truncate_of(t.rel);
		END IF;
		-- A group published via the partition root takes partitioned roots
		-- (their partitions come with them); others take every plain table
		-- and partition.
		FOR grp IN SELECT g.name, g.publication FROM haven.groups g WHERE g.all_tables AND
		         CASE WHEN g.via_root THEN t.relkind IN ('p', 'r') AND NOT t.relispartition ELSE t.relkind = 'r' END LOOP
			CONTINUE WHEN EXISTS (SELECT 1 FROM pg_publication_tables p
			                      WHERE p.pubname = grp.publication AND format('%I.%I', p.schemaname, p.tablename)::regclass = t.rel);
			IF NOT (t.relreplident = 'f' OR t.has_key) THEN
				refusal := format('table %s has no primary key or replica identity%s, so it is not replicated (publication %s); add a primary key or set REPLICA IDENTITY FULL', t.rel,
				                  CASE WHEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = t.relid AND i.indisprimary AND NOT i.indimmediate)
				                       THEN ' (its primary key is DEFERRABLE, and PostgreSQL identifies rows only by one that is not: drop it and add it again without DEFERRABLE)' ELSE '' END,
				                  grp.publication);
			ELSIF t.has_rows AND NOT (t.has_key OR t.has_pk) THEN
				refusal := format('table %s already holds rows but has no primary key to copy them by, so it is not added to publication %s; add a primary key (its rows are then backfilled), or re-seed the group', t.rel, grp.publication);
			END IF;
			IF refusal IS NOT NULL THEN
				INSERT INTO haven.pending_refusals (relid, publication, refusal) VALUES (t.relid, grp.publication, refusal);
				refusal := NULL;
			ELSE
				EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', grp.publication, t.rel);
				IF t.has_rows THEN
					-- The rows it already holds reach DR by a backfill, which
					-- the group's agent starts when it decodes this message:
					-- changes from here on are streamed as usual.
					PERFORM pg_logical_emit_message(true, 'haven.backfill.' || grp.name,
						json_build_object('begin', json_build_object('oid', t.relid::bigint, 'schema', t.nspname, 'name', t.relname))::text);
				END IF;
			END IF;
		END LOOP;
	END LOOP;
END $$;

-- missing_values lists the value every existing row of a table reads in a
-- column added without rewriting the table (its default, evaluated once by
-- ADD COLUMN), for the tables of the command and their partitions: a default such as now() or
-- current_setting(...) is evaluated again, to another value, when DR
-- replays the statement, and the standby then sets the primary's. The
-- values are printed in forms that read back the same under any setting.
CREATE OR REPLACE FUNCTION haven.missing_values() RETURNS jsonb LANGUAGE sql
SET search_path = pg_catalog, pg_temp SET DateStyle = 'ISO, YMD' SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET bytea_output = 'hex'
SET extra_float_digits = 1 SET lc_monetary = 'C' AS $$
	SELECT coalesce(jsonb_agg(jsonb_build_object('schema', n.nspname, 'table', k.relname, 'column', a.attname, 'value', a.attmissingval::text)), '[]')
	FROM (SELECT c.objid FROM pg_event_trigger_ddl_commands() c WHERE c.classid = 'pg_class'::regclass AND c.object_type = 'table'
	      UNION -- pg_partition_tree has no rows for a table outside one
	      SELECT p.relid FROM pg_event_trigger_ddl_commands() c, pg_partition_tree(c.objid) p
	      WHERE c.classid = 'pg_class'::regclass AND c.object_type = 'table') x(objid)
	JOIN pg_class k ON k.oid = x.objid JOIN pg_namespace n ON n.oid = k.relnamespace
	JOIN pg_attribute a ON a.attrelid = k.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.atthasmissing
$$;

-- rewrite_digests describes the rows of each table the command rewrote
-- (listed by mark_rewrite) as wire.RowsDigest does, under settings that
-- print values the same anywhere: {"tables": [...]}. DR computes the same
-- after replaying the command: rows a volatile default or USING expression
-- filled differently there give another sum. {"error": ...} when it cannot
-- read a table: DR then refuses the rewrite and says why.
CREATE OR REPLACE FUNCTION haven.rewrite_digests() RETURNS jsonb LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET DateStyle = 'ISO, YMD' SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET bytea_output = 'hex'
SET extra_float_digits = 1 SET lc_monetary = 'C' AS $$
DECLARE
	t record;
	n bigint;
	digest text;
	digests jsonb := '[]';
BEGIN
	FOR t IN SELECT DISTINCT s.nspname, k.relname,
	             (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attname) FROM pg_attribute a
	              WHERE a.attrelid = k.oid AND a.attnum > 0 AND NOT a.attisdropped) AS cols
	         FROM unnest(string_to_array(nullif(current_setting('haven.rewritten', true), ''), ',')::oid[]) r(oid)
	         JOIN pg_class k ON k.oid = r.oid JOIN pg_namespace s ON s.oid = k.relnamespace
	LOOP
		EXECUTE format({rows_digest}, t.cols, t.nspname, t.relname) INTO n, digest;
		digests := digests || jsonb_build_object('schema', t.nspname, 'table', t.relname, 'rows', n, 'digest', digest);
	END LOOP;
	RETURN jsonb_build_object('tables', digests);
EXCEPTION WHEN OTHERS THEN
	RETURN jsonb_build_object('error', SQLERRM);
END $$;

-- record_ddl writes one statement to haven.ddl_log. It runs with its
-- owner's rights (the log is not writable by others) but only inside an
-- event trigger, and it records as the role to replay as the caller's
-- current role only when the session's login role may act as it: nobody
-- can have DDL replayed on DR with rights they do not hold.
DROP FUNCTION IF EXISTS haven.record_ddl(text, text, text, text);
CREATE OR REPLACE FUNCTION haven.record_ddl(statement text, tag text, caller_search_path text, caller_role text, ordinal int)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	replay_as text := session_user;
	rewrite   int := coalesce(nullif(current_setting('haven.rewrite_reason', true), ''), '0')::int;
BEGIN
	PERFORM 1 FROM pg_event_trigger_ddl_commands() LIMIT 1; -- fails outside an event trigger
	IF pg_has_role(session_user, caller_role, 'MEMBER') THEN
		replay_as := caller_role;
	END IF;
	-- A query string of several statements is recorded at each of its DDL
	-- statements, with its place among them: DR replays each where it ran,
	-- between the rows the statements between them changed.
	IF NOT EXISTS (SELECT 1 FROM haven.ddl_log l WHERE l.txid = txid_current() AND l.ddl = statement AND l.ordinal = record_ddl.ordinal) THEN
		-- The tables the statement worked on (an index's table for an
		-- index), so that a group of some tables only can leave out DDL on
		-- others.
		-- With the caller's settings that change how literals and casts
		-- read and print dates, times and intervals: DR replays under them.
		-- A rewrite that filled a new column (2), or converted one with a
		-- USING expression (4), carries what the rows became.
		INSERT INTO haven.ddl_log (username, search_path, command_tags, ddl, rewrite_reason, relations, settings, missing_values, ordinal, rewrite_digests)
		VALUES (replay_as, caller_search_path, tag, statement, rewrite,
		        ARRAY(SELECT DISTINCT coalesce(i.indrelid, c.objid) FROM pg_event_trigger_ddl_commands() c
		              LEFT JOIN pg_index i ON i.indexrelid = c.objid
		              WHERE c.classid = 'pg_class'::regclass),
		        jsonb_build_object('DateStyle', current_setting('DateStyle'), 'TimeZone', current_setting('TimeZone'),
		                           'IntervalStyle', current_setting('IntervalStyle')),
		        CASE WHEN tag = 'ALTER TABLE' THEN haven.missing_values() ELSE '[]' END, record_ddl.ordinal,
		        CASE WHEN rewrite & 2 <> 0 OR (rewrite & 4 <> 0 AND statement ~* '\musing\M') THEN haven.rewrite_digests() END);
		PERFORM set_config('haven.rewrite_reason', '0', true), set_config('haven.rewritten', '', true);
	END IF;
	-- After recording: the ALTER PUBLICATION it may run is DDL too.
	IF tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE', 'CREATE SCHEMA') THEN
		PERFORM haven.publish_new_tables();
	END IF;
END $$;

-- The event trigger functions run as the caller: they only read the
-- caller's context and hand it to record_ddl. The search_path recorded is
-- the one in effect, resolved ("$user" and all) and quoted.
CREATE OR REPLACE FUNCTION haven.mark_temporary_drop() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
	-- sql_drop runs before ddl_command_end of the same statement.
	PERFORM pg_catalog.set_config('haven.drop_only_temporary',
		CASE WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_dropped_objects() d
		                      WHERE NOT d.is_temporary AND d.schema_name IS DISTINCT FROM 'haven')
		     THEN 'on' ELSE 'off' END, true);
END $$;

-- A rewrite is flagged with its reasons and tables: where it fills a
-- column with values the DR site may compute differently (a volatile
-- default, a new identity or serial column, a USING expression), the
-- standby replays it only if DR's rows come out the same.
CREATE OR REPLACE FUNCTION haven.mark_rewrite() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
	PERFORM pg_catalog.set_config('haven.rewrite_reason',
		(coalesce(NULLIF(pg_catalog.current_setting('haven.rewrite_reason', true), ''), '0')::int
		 | pg_catalog.pg_event_trigger_table_rewrite_reason())::text, true),
	        pg_catalog.set_config('haven.rewritten', pg_catalog.concat_ws(',',
		NULLIF(pg_catalog.current_setting('haven.rewritten', true), ''), pg_catalog.pg_event_trigger_table_rewrite_oid()::text), true);
END $$;

CREATE OR REPLACE FUNCTION haven.capture_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
DECLARE
	relevant  boolean;
	statement text := pg_catalog.current_query();
	query_key text := pg_catalog.md5(pg_catalog.concat(pg_catalog.statement_timestamp(), pg_catalog.current_query()));
	ordinal   int := 1;
BEGIN
	IF pg_catalog.current_setting('haven.internal', true) = 'on' THEN
		-- haven's own triggers on this site: not the DR site's.
		RETURN;
	END IF;
	IF tg_tag LIKE '% PUBLICATION' OR tg_tag LIKE '% SUBSCRIPTION' THEN
		-- Replication setup of this site, not schema: not the DR site's.
		RETURN;
	END IF;
	IF tg_tag IN ('CREATE TRIGGER', 'DROP TRIGGER', 'ALTER TRIGGER', 'ALTER TABLE') AND statement OPERATOR(pg_catalog.~*) '\mhaven_guard\M' THEN
		-- haven's write guard of this site (DR has none).
		RETURN;
	END IF;
	-- Which DDL statement of the client's query string this is: the first,
	-- the second… (every statement of one string shares its timestamp).
	-- Like everything here that runs as the caller, with the built-in
	-- operators only: the caller's search_path may hold others.
	IF coalesce(pg_catalog.current_setting('haven.ddl_query', true), '') OPERATOR(pg_catalog.=) query_key THEN
		ordinal := pg_catalog.current_setting('haven.ddl_ordinal')::int OPERATOR(pg_catalog.+) 1;
	END IF;
	PERFORM pg_catalog.set_config('haven.ddl_query', query_key, true), pg_catalog.set_config('haven.ddl_ordinal', ordinal::text, true);
	IF tg_tag LIKE 'DROP %' THEN
		relevant := pg_catalog.current_setting('haven.drop_only_temporary', true) IS DISTINCT FROM 'on';
		PERFORM pg_catalog.set_config('haven.drop_only_temporary', 'off', true);
	ELSE
		SELECT pg_catalog.count(*) = 0 OR pg_catalog.bool_or(NOT c.in_extension
		       AND c.schema_name IS DISTINCT FROM 'haven' AND coalesce(c.schema_name, '') NOT LIKE 'pg\_temp%')
		  INTO relevant FROM pg_catalog.pg_event_trigger_ddl_commands() c;
	END IF;
	IF tg_tag IN ('CREATE TABLE AS', 'SELECT INTO') THEN
		-- DR gets the table, not the query: the query may read what DR
		-- lacks (a temporary table), and the rows come by backfill.
		SELECT pg_catalog.format('CREATE %sTABLE %I.%I (%s)', CASE WHEN k.relpersistence = 'u' THEN 'UNLOGGED ' END, n.nspname, k.relname,
		       pg_catalog.string_agg(pg_catalog.format('%I %s%s', a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod),
		           CASE WHEN a.attcollation OPERATOR(pg_catalog.<>) t.typcollation THEN ' COLLATE ' || a.attcollation::pg_catalog.regcollation::text END),
		           ', ' ORDER BY a.attnum))
		  INTO statement
		  FROM pg_catalog.pg_event_trigger_ddl_commands() c
		  JOIN pg_catalog.pg_class k ON k.oid OPERATOR(pg_catalog.=) c.objid
		  JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) k.relnamespace
		  JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) k.oid AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
		  JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) a.atttypid
		 WHERE c.object_type OPERATOR(pg_catalog.=) 'table'
		 GROUP BY n.nspname, k.relname, k.relpersistence;
		statement := coalesce(statement, pg_catalog.current_query());
	END IF;
	IF coalesce(relevant, true) THEN
		PERFORM haven.record_ddl(statement, tg_tag,
			pg_catalog.array_to_string(ARRAY(SELECT pg_catalog.quote_ident(s) FROM pg_catalog.unnest(pg_catalog.current_schemas(false)) s), ', '),
			current_user::text, ordinal);
	END IF;
END $$;

-- Every role's DDL passes through these; only record_ddl writes the log.
GRANT USAGE ON SCHEMA haven TO PUBLIC;
GRANT EXECUTE ON FUNCTION haven.record_ddl(text, text, text, text, int), haven.capture_ddl(), haven.mark_temporary_drop(), haven.mark_rewrite(),
	haven.capture_partition_truncate(), haven.guard_writes() TO PUBLIC;
REVOKE EXECUTE ON FUNCTION haven.publish_new_tables(), haven.capture_truncate_of(regclass), haven.guard_table(regclass) FROM PUBLIC;

DO $$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'haven_mark_temporary_drop') THEN
		CREATE EVENT TRIGGER haven_mark_temporary_drop ON sql_drop EXECUTE FUNCTION haven.mark_temporary_drop();
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'haven_mark_rewrite') THEN
		CREATE EVENT TRIGGER haven_mark_rewrite ON table_rewrite EXECUTE FUNCTION haven.mark_rewrite();
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'haven_capture_ddl') THEN
		CREATE EVENT TRIGGER haven_capture_ddl ON ddl_command_end EXECUTE FUNCTION haven.capture_ddl();
	END IF;
END $$;
SELECT pg_catalog.set_config('haven.internal', 'off', false);`, "{rows_digest}", quoteLiteral(wire.RowsDigest), 1)

// DDLCaptureSQL is the SQL a superuser runs on behalf of an agent that is
// not one, given the agent's configuration: it installs DDL capture,
// records the group (so that new tables join its publication, as a
// superuser's agent records it at every start), lets the agent's role read
// the DDL log, and makes the group's publication, with the log in it, the
// role's own (adding a table to a publication takes owning both, and the
// agent adds the other tables, which its role owns).
func DDLCaptureSQL(cfg Config) (string, error) {
	if cfg.Group == "" || cfg.SourceURL == "" {
		return "", errors.New("--print-ddl-capture needs the agent's own flags: --group, and --source-url (its user is the role the agent runs as), " +
			"and --tables and --publish-via-partition-root if the agent runs with them")
	}
	if len(cfg.Controllers) > 0 {
		return "", errors.New("--print-ddl-capture is for an agent that is not a superuser, and with --controllers the agent must be one: it fences its database")
	}
	if err := wire.ValidateGroup(cfg.Group); err != nil {
		return "", err
	}
	source, err := pgx.ParseConfig(cfg.SourceURL)
	if err != nil {
		return "", fmt.Errorf("parse source URL: %w", err)
	}
	if u, err := url.Parse(cfg.SourceURL); err == nil && u.User.Username() == "" && !strings.Contains(cfg.SourceURL, "user=") {
		// Else the operator's own name would stand for the agent's role.
		return "", errors.New("--source-url names no user: give the role the agent runs as (postgres://haven@…)")
	}
	role := pgx.Identifier{source.User}.Sanitize()
	pub := wire.PublicationName(cfg.Group)
	// What follows is haven's own too: not DDL for the DR site.
	const internalOff = "SELECT pg_catalog.set_config('haven.internal', 'off', false);"
	return strings.TrimSuffix(ddlCaptureSQL, internalOff) + fmt.Sprintf(`
-- The group, as its agent (role %[1]s) runs.
INSERT INTO haven.groups (name, publication, all_tables, via_root, write_guard) VALUES (%[2]s, %[3]s, %[4]t, %[5]t, false)
	ON CONFLICT (name) DO UPDATE SET publication = excluded.publication, all_tables = excluded.all_tables, via_root = excluded.via_root,
		write_guard = excluded.write_guard;
GRANT USAGE ON SCHEMA haven TO %[1]s;
GRANT SELECT ON haven.ddl_log, haven.groups TO %[1]s;
DO $haven$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = %[3]s) THEN
		CREATE PUBLICATION %[6]s FOR TABLE haven.ddl_log WITH (publish = 'insert, update, delete, truncate', publish_via_partition_root = %[5]t);
	ELSIF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables WHERE pubname = %[3]s AND schemaname = 'haven' AND tablename = 'ddl_log') THEN
		ALTER PUBLICATION %[6]s ADD TABLE haven.ddl_log;
	END IF;
END $haven$;
ALTER PUBLICATION %[6]s OWNER TO %[1]s;
`+internalOff,
		role, quoteLiteral(cfg.Group), quoteLiteral(pub), len(cfg.Tables) == 0, cfg.PublishViaRoot, pgx.Identifier{pub}.Sanitize()), nil
}

// installDDLCapture sets up DDL capture and records the group (whether it
// takes every new table); event triggers need a superuser. It reports
// whether capture is on.
func (s *session) installDDLCapture(ctx context.Context) (bool, error) {
	var super bool
	if err := s.ctrl.QueryRow(ctx, `SELECT rolsuper FROM pg_roles WHERE rolname = current_user`).Scan(&super); err != nil {
		return false, fmt.Errorf("check for superuser: %w", err)
	}
	if !super {
		var installed bool
		if err := s.ctrl.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'haven_capture_ddl')`).Scan(&installed); err != nil {
			return false, fmt.Errorf("look up DDL capture: %w", err)
		}
		if !installed {
			s.log.Warn().Msg("DDL is NOT captured: event triggers need a superuser. Have a superuser run what haven agent --print-ddl-capture prints " +
				"(with this agent's flags); until then, schema changes on the primary must be made on DR by hand, first, and new tables do not join the group")
			return false, nil
		}
		// New tables join the groups recorded, as recorded: a group missing
		// there would leave them out, and their rows with them.
		var recorded bool
		if err := s.ctrl.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM haven.groups WHERE name = $1 AND publication = $2 AND all_tables = $3 AND via_root = $4)`,
			s.cfg.Group, wire.PublicationName(s.cfg.Group), len(s.cfg.Tables) == 0, s.cfg.PublishViaRoot).Scan(&recorded); err != nil {
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
				return false, fmt.Errorf("look up group %q in haven.groups: %w", s.cfg.Group, err)
			}
		}
		if !recorded {
			return false, needsOperator("DDL capture is installed, but group %q is not recorded in haven.groups for this agent as it runs (--tables, --publish-via-partition-root), "+
				"or the agent's role may not read that table; so tables created from now on would not join it: have a superuser run what haven agent --print-ddl-capture prints with this agent's flags", s.cfg.Group)
		}
		return true, nil
	}
	if _, err := s.ctrl.Exec(ctx, ddlCaptureSQL); err != nil {
		return false, fmt.Errorf("install DDL capture: %w", err)
	}
	guarded := len(s.cfg.Controllers) > 0
	if _, err := s.ctrl.Exec(ctx, `INSERT INTO haven.groups (name, publication, all_tables, via_root, write_guard) VALUES ($1, $2, $3, $4, $5)
		ON CONFLICT (name) DO UPDATE SET publication = excluded.publication, all_tables = excluded.all_tables, via_root = excluded.via_root,
			write_guard = excluded.write_guard`,
		s.cfg.Group, wire.PublicationName(s.cfg.Group), len(s.cfg.Tables) == 0, s.cfg.PublishViaRoot, guarded); err != nil {
		return false, fmt.Errorf("record group %q: %w", s.cfg.Group, err)
	}
	if err := s.installWriteGuard(ctx); err != nil {
		return false, err
	}
	return true, nil
}

// installWriteGuard sets the write guard up for a group run with
// controllers: this session holds the lease, so it grants writes for the
// server's current start, then guards every table that lacks the guard.
// Without controllers on any group, writes are never refused.
func (s *session) installWriteGuard(ctx context.Context) error {
	var guarded bool
	if err := s.ctrl.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM haven.groups WHERE write_guard)`).Scan(&guarded); err != nil {
		return fmt.Errorf("look up the write guard: %w", err)
	}
	if !guarded {
		_, err := s.ctrl.Exec(ctx, `INSERT INTO haven.write_grant (unguarded) VALUES (true) ON CONFLICT (id) DO UPDATE SET unguarded = true`)
		if err != nil {
			return fmt.Errorf("lift the write guard: %w", err)
		}
		return nil
	}
	if len(s.cfg.Controllers) == 0 {
		// Another group of this database holds leases: only its agent
		// lets writes in.
		return nil
	}
	if err := grantWrites(ctx, s.ctrl, s.cfg.Epoch); err != nil {
		return err
	}
	rows, err := s.ctrl.Query(ctx, `SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
		  AND n.nspname NOT IN ('haven', 'pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_%'
		  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
		  AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = 'haven_guard')`)
	if err != nil {
		return fmt.Errorf("list the tables without the write guard: %w", err)
	}
	oids, err := pgx.CollectRows(rows, pgx.RowTo[uint32])
	if err != nil {
		return fmt.Errorf("list the tables without the write guard: %w", err)
	}
	// One table at a time, each waiting a second at most for its lock:
	// writes to the others never queue behind a long transaction.
	for _, oid := range oids {
		_, err := s.ctrl.Exec(ctx, fmt.Sprintf(`SET lock_timeout = '1s'; SELECT haven.guard_table(%d::oid); RESET lock_timeout`, oid))
		if err != nil {
			_, _ = s.ctrl.Exec(ctx, `RESET lock_timeout`)
			s.log.Warn().Err(err).Uint32("table_oid", oid).Msg("could not put the write guard on a table now (busy?); the agent tries again at its next start")
		}
	}
	return nil
}

// grantWrites lets the database take writes until the server restarts: its
// agent holds the lease of epoch.
func grantWrites(ctx context.Context, conn *pgx.Conn, epoch uint64) error {
	_, err := conn.Exec(ctx, `INSERT INTO haven.write_grant (postmaster_start, unguarded, epoch) VALUES (pg_postmaster_start_time(), false, $1)
		ON CONFLICT (id) DO UPDATE SET postmaster_start = excluded.postmaster_start, unguarded = false, epoch = excluded.epoch, granted_at = now()`, int64(epoch))
	if err != nil {
		return fmt.Errorf("grant writes for this server start: %w", err)
	}
	return nil
}

// capturePartitionTruncates puts the truncate-capturing trigger on every
// partition of the partitioned tables the group publishes via their root.
func (s *session) capturePartitionTruncates(ctx context.Context) error {
	_, err := s.ctrl.Exec(ctx, `SELECT haven.capture_truncate_of(t.relid)
		FROM pg_publication_tables p
		JOIN pg_namespace n ON n.nspname = p.schemaname
		JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename AND c.relkind = 'p',
		LATERAL pg_partition_tree(c.oid) t
		WHERE p.pubname = $1 AND t.isleaf AND t.level > 0`, wire.PublicationName(s.cfg.Group))
	if err != nil {
		return fmt.Errorf("capture TRUNCATE of single partitions: %w", err)
	}
	return nil
}

// ddlLog is haven.ddl_log as a table of the group.
func ddlLog(ctx context.Context, conn *pgx.Conn) (table, error) {
	t := table{schema: "haven", name: ddlLogTable, replicaIdentity: "d", hasKey: true}
	err := conn.QueryRow(ctx, `SELECT 'haven.ddl_log'::regclass::oid`).Scan(&t.oid)
	return t, err
}
