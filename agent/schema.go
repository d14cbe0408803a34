package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
)

// findPgDump locates pg_dump: the configured path, else PATH, else the
// newest /usr/lib/postgresql/*/bin. It must be at least the server's major
// version (pg_dump refuses newer servers).
func findPgDump(configured string, serverVersion int) (string, error) {
	candidates := []string{}
	if configured != "" {
		candidates = append(candidates, configured)
	} else {
		if p, err := exec.LookPath("pg_dump"); err == nil {
			candidates = append(candidates, p)
		}
		dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_dump")
		sort.Slice(dirs, func(i, j int) bool { return majorOf(dirs[i]) > majorOf(dirs[j]) })
		candidates = append(candidates, dirs...)
	}
	var problems []string
	for _, c := range candidates {
		out, err := exec.Command(c, "--version").Output()
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", c, err))
			continue
		}
		major := versionMajor(string(out))
		if major*10000 < serverVersion/10000*10000 {
			problems = append(problems, fmt.Sprintf("%s is version %d, older than the server", c, major))
			continue
		}
		return c, nil
	}
	if len(problems) == 0 {
		return "", errors.New("no pg_dump on PATH or in /usr/lib/postgresql/*/bin")
	}
	return "", errors.New(strings.Join(problems, "; "))
}

func majorOf(path string) int {
	// /usr/lib/postgresql/<major>/bin/pg_dump
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(path))))
	return n
}

// versionMajor reads the major version from "pg_dump (PostgreSQL) 15.18 …".
func versionMajor(s string) int {
	for _, f := range strings.Fields(s) {
		if n, err := strconv.Atoi(strings.SplitN(f, ".", 2)[0]); err == nil && n > 0 {
			return n
		}
	}
	return 0
}

// dumpSchema runs pg_dump --schema-only with options (under the exported
// snapshot for the initial snapshot, so the schema is exactly the one the
// copied rows have; for one table for a backfill). Objects that belong to
// haven itself, and event triggers (they call functions in haven's schema),
// are left out; so are tablespaces, which the DR site need not share.
// Owners and privileges are kept, as far as DR can take them (filterDump).
func dumpSchema(ctx context.Context, pgDump, sourceURL string, options ...string) (string, error) {
	args := append([]string{"--schema-only",
		"--no-publications", "--no-subscriptions", "--no-tablespaces", "--no-security-labels", "--exclude-schema=haven",
		"--dbname=" + sourceURL}, options...)
	cmd := exec.CommandContext(ctx, pgDump, args...)
	cmd.Env = append(os.Environ(), "PGCONNECT_TIMEOUT=30")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s --schema-only: %w: %s", pgDump, err, strings.TrimSpace(stderr.String()))
	}
	return filterDump(out)
}

// filterDump drops what the DR side must not run from a plain pg_dump
// script: psql meta-commands (\restrict, \unrestrict), event triggers and
// haven's own triggers. Owners and grants are kept, each in a block that
// turns its failure into a warning (ownedOrGranted).
// Sections start with pg_dump's "-- Name: …; Type: …; Schema: …; Owner: …"
// headers.
func filterDump(dump []byte) (string, error) {
	var b strings.Builder
	skip, acl := false, false
	var owner, quote string
	sc := bufio.NewScanner(bytes.NewReader(dump))
	sc.Buffer(make([]byte, 0, 64<<10), 64<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "-- Name: ") || strings.HasPrefix(line, "-- Data for Name: ") {
			// A section starts outside any quote; this also ends a quote
			// taken for open by mistake (a dollar sign in a name).
			quote = ""
			// Event triggers and haven's triggers (truncate capture on
			// partitions, the write guard) call functions of haven's
			// schema, which the DR site has not.
			skip = strings.Contains(line, "; Type: EVENT TRIGGER;") ||
				strings.Contains(line, " haven_capture_truncate; Type: TRIGGER;") ||
				strings.Contains(line, " haven_guard; Type: TRIGGER;")
			acl = strings.Contains(line, "; Type: ACL;") || strings.Contains(line, "; Type: DEFAULT ACL;")
			_, owner, _ = strings.Cut(line, "; Owner: ")
		}
		if skip {
			continue
		}
		if quote == "" && ownedOrGranted(line, acl, owner) {
			// A role DR lacks, or a DR role that may not give objects away:
			// the DR copy keeps the standby's role as owner, or lacks the
			// grant, and the standby logs the warning.
			said := strings.ReplaceAll(strings.ReplaceAll(line, "%", "%%"), "'", "''")
			tag := "$haven_owner$"
			for strings.Contains(line, tag) { // a name may hold it
				tag = strings.TrimSuffix(tag, "$") + "_$"
			}
			line = fmt.Sprintf("DO %s BEGIN %s EXCEPTION WHEN undefined_object OR insufficient_privilege OR invalid_grant_operation THEN "+
				"RAISE WARNING 'haven: not applied on DR (%%): %s', SQLERRM; END %s;", tag, line, said, tag)
		}
		inBody := quote != ""
		quote = dollarQuoteAfter(line, quote)
		if !inBody && strings.HasPrefix(line, `\`) {
			if strings.HasPrefix(line, `\restrict `) || strings.HasPrefix(line, `\unrestrict `) {
				continue
			}
			return "", fmt.Errorf("pg_dump output has a psql meta-command haven cannot run: %.40q", line)
		}
		b.WriteString(line)
		b.WriteByte('\n')
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read pg_dump output: %w", err)
	}
	return b.String(), nil
}

// ownedOrGranted: line is a statement of an ACL section (GRANT, REVOKE,
// ALTER DEFAULT PRIVILEGES, SET or RESET SESSION AUTHORIZATION for a
// grantor), or pg_dump's ALTER … OWNER TO for the section's owner.
func ownedOrGranted(line string, acl bool, owner string) bool {
	if !strings.HasSuffix(line, ";") {
		return false
	}
	if acl {
		for _, p := range []string{"GRANT ", "REVOKE ", "ALTER DEFAULT PRIVILEGES ", "SET SESSION AUTHORIZATION ", "RESET SESSION AUTHORIZATION"} {
			if strings.HasPrefix(line, p) {
				return true
			}
		}
		return false
	}
	if owner == "" || owner == "-" || !strings.HasPrefix(line, "ALTER ") {
		return false
	}
	return strings.HasSuffix(line, " OWNER TO "+owner+";") || strings.HasSuffix(line, " OWNER TO "+pgx.Identifier{owner}.Sanitize()+";")
}

// dollarTag matches a dollar quote's delimiter at the start of a text.
var dollarTag = regexp.MustCompile(`^\$(?:[A-Za-z_][A-Za-z_0-9]*)?\$`)

// dollarQuoteAfter returns the quote open at the end of line, given the one
// open at its start ("" for none): a function's body, or a comment's text
// in single quotes, spans lines, and what is inside it is not pg_dump's.
// Outside a dollar quote, comments and text in single or double quotes (a
// default of '$$', a name with dollar signs) open no dollar quote.
func dollarQuoteAfter(line, open string) string {
	for {
		if open == "'" || open == `"` {
			rest, closed := afterQuote(line, open[0])
			if !closed {
				return open
			}
			line, open = rest, ""
			continue
		}
		if open != "" {
			i := strings.Index(line, open)
			if i < 0 {
				return open
			}
			line, open = line[i+len(open):], ""
			continue
		}
		i := strings.IndexAny(line, `$'"-`)
		switch {
		case i < 0:
			return ""
		case line[i] == '-':
			if strings.HasPrefix(line[i:], "--") {
				return "" // a comment to the end of the line
			}
			line = line[i+1:]
		case line[i] == '$':
			tag := dollarTag.FindString(line[i:])
			if tag == "" || (i > 0 && isIdentByte(line[i-1])) { // $1, or a name's dollar sign
				line = line[i+1:]
				continue
			}
			open, line = tag, line[i+len(tag):]
		default: // a quoted text or name: to its closing quote
			rest, closed := afterQuote(line[i+1:], line[i])
			if !closed {
				return line[i : i+1] // it goes on past the line (a long comment's text)
			}
			line = rest
		}
	}
}

// afterQuote returns what follows the quote q that closes a text or name
// begun before line (a doubled q stands for itself), and whether it closes
// on this line.
func afterQuote(line string, q byte) (string, bool) {
	for {
		j := strings.IndexByte(line, q)
		if j < 0 {
			return "", false
		}
		if j+1 < len(line) && line[j+1] == q {
			line = line[j+2:]
			continue
		}
		return line[j+1:], true
	}
}

func isIdentByte(c byte) bool {
	return c == '_' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}
