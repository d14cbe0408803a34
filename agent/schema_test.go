package agent

import (
	"strings"
	"testing"
)

// TestFilterDumpKeepsOwnersAndGrantsAsWarnings: owners and grants of the
// primary's schema reach DR in blocks that turn a missing role into a
// warning; a function body that happens to hold such a line is left alone,
// and dollar signs in quoted text or names open no body.
func TestFilterDumpKeepsOwnersAndGrantsAsWarnings(t *testing.T) {
	dump := `--
-- Name: notes; Type: TABLE; Schema: public; Owner: app
--

CREATE TABLE public.notes (
    id bigint NOT NULL
);


ALTER TABLE public.notes OWNER TO app;

--
-- Name: give(); Type: FUNCTION; Schema: public; Owner: Sales Team
--

CREATE FUNCTION public.give() RETURNS void
    LANGUAGE plpgsql
    AS $_$
BEGIN
ALTER TABLE public.notes OWNER TO app;
END $_$;


ALTER FUNCTION public.give() OWNER TO "Sales Team";

--
-- Name: prices; Type: TABLE; Schema: public; Owner: app
--

CREATE TABLE public.prices (
    price text DEFAULT '$$'::text
);


ALTER TABLE public.prices OWNER TO app;

--
-- Name: haven_capture_ddl; Type: EVENT TRIGGER; Schema: -; Owner: postgres
--

CREATE EVENT TRIGGER haven_capture_ddl ON ddl_command_end
   EXECUTE FUNCTION haven.capture_ddl();

--
-- Name: TABLE notes; Type: ACL; Schema: public; Owner: app
--

GRANT SELECT ON TABLE public.notes TO "50% off";
GRANT SELECT ON TABLE public.notes TO "a$haven_owner$b";

--
-- Name: TABLE notes; Type: COMMENT; Schema: public; Owner: app
--

COMMENT ON TABLE public.notes IS 'Imported from
\\fileserver\crm (don''t edit):
ALTER TABLE public.notes OWNER TO app;
done';

--
-- Name: DEFAULT PRIVILEGES FOR TABLES; Type: DEFAULT ACL; Schema: public; Owner: app
--

ALTER DEFAULT PRIVILEGES FOR ROLE app IN SCHEMA public GRANT SELECT ON TABLES TO reporting;
`
	got, err := filterDump([]byte(dump))
	if err != nil {
		t.Fatal(err)
	}
	wrapped := func(st string) string {
		tag := "$haven_owner$"
		if strings.Contains(st, tag) {
			tag = "$haven_owner_$"
		}
		return "DO " + tag + " BEGIN " + st + " EXCEPTION WHEN undefined_object OR insufficient_privilege OR invalid_grant_operation THEN RAISE WARNING 'haven: not applied on DR (%): " +
			strings.ReplaceAll(strings.ReplaceAll(st, "%", "%%"), "'", "''") + "', SQLERRM; END " + tag + ";\n"
	}
	for _, want := range []string{
		wrapped("ALTER TABLE public.notes OWNER TO app;"),
		"BEGIN\nALTER TABLE public.notes OWNER TO app;\nEND $_$;\n", // the body, as it was
		wrapped(`ALTER FUNCTION public.give() OWNER TO "Sales Team";`),
		wrapped(`GRANT SELECT ON TABLE public.notes TO "50% off";`),
		wrapped(`GRANT SELECT ON TABLE public.notes TO "a$haven_owner$b";`),
		wrapped("ALTER TABLE public.prices OWNER TO app;"), // after dollar signs in quotes
		wrapped("ALTER DEFAULT PRIVILEGES FOR ROLE app IN SCHEMA public GRANT SELECT ON TABLES TO reporting;"),
		// A comment's text over several lines, as it was.
		"COMMENT ON TABLE public.notes IS 'Imported from\n\\\\fileserver\\crm (don''t edit):\nALTER TABLE public.notes OWNER TO app;\ndone';\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("filtered dump lacks\n%s\ngot:\n%s", want, got)
		}
	}
	if n := strings.Count(got, "DO $haven_owner"); n != 6 {
		t.Errorf("%d statements wrapped, want 6:\n%s", n, got)
	}
	if strings.Contains(got, "EVENT TRIGGER") {
		t.Errorf("the event trigger was kept:\n%s", got)
	}
}
