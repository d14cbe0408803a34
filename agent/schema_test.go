package agent

import (
	"strings"
	"testing"
)

// TestFilterDumpKeepsOwnersAndGrantsAsWarnings: owners and grants of the
// primary's schema reach DR in blocks that turn a missing role into a
// warning; a function body that happens to hold such a line is left alone.
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
-- Name: TABLE notes; Type: ACL; Schema: public; Owner: app
--

GRANT SELECT ON TABLE public.notes TO "50% off";

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
		return "DO $haven_owner$ BEGIN " + st + " EXCEPTION WHEN undefined_object OR insufficient_privilege OR invalid_grant_operation THEN RAISE WARNING 'haven: not applied on DR (%): " +
			strings.ReplaceAll(strings.ReplaceAll(st, "%", "%%"), "'", "''") + "', SQLERRM; END $haven_owner$;\n"
	}
	for _, want := range []string{
		wrapped("ALTER TABLE public.notes OWNER TO app;"),
		"BEGIN\nALTER TABLE public.notes OWNER TO app;\nEND $_$;\n", // the body, as it was
		wrapped(`ALTER FUNCTION public.give() OWNER TO "Sales Team";`),
		wrapped(`GRANT SELECT ON TABLE public.notes TO "50% off";`),
		wrapped("ALTER DEFAULT PRIVILEGES FOR ROLE app IN SCHEMA public GRANT SELECT ON TABLES TO reporting;"),
	} {
		if !strings.Contains(got, want) {
			t.Errorf("filtered dump lacks\n%s\ngot:\n%s", want, got)
		}
	}
	if n := strings.Count(got, "DO $haven_owner$"); n != 4 {
		t.Errorf("%d statements wrapped, want 4:\n%s", n, got)
	}
}
