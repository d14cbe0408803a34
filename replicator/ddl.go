package replicator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// A row inserted into haven.ddl_log on the source carries a DDL statement
// text (as the client sent it), the search_path it ran under and its command
// tags. The standby replays it at that row's place in the stream, inside the
// open target transaction, so the changes after it see the new schema and a
// crash can neither lose nor repeat it.

// ddlLogColumns names the haven.ddl_log columns replay reads.
var ddlLogColumns = struct{ ddl, searchPath, tags, role, rewrite, settings, missing, ordinal, digests string }{
	"ddl", "search_path", "command_tags", "username", "rewrite_reason", "settings", "missing_values", "ordinal", "rewrite_digests"}

// replaySettings are the settings of the primary's session that DDL is
// replayed under: they decide how literals and casts read and print dates,
// times and intervals (a DEFAULT '03/04/2020', a timestamp column turned
// into text).
var replaySettings = []string{"DateStyle", "TimeZone", "IntervalStyle"}

// canonicalSettings print every value in a form that reads back the same
// under any setting; the primary prints the values of missingValue and
// rewriteDigests so (with the search_path pg_catalog, pg_temp).
var canonicalSettings = map[string]string{"DateStyle": "ISO, YMD", "TimeZone": "UTC", "IntervalStyle": "postgres", "bytea_output": "hex",
	"extra_float_digits": "1", "lc_monetary": "C"}

// rewriteDigests is what the rows of the tables a DDL rewrote on the
// primary came to (wire.RowsDigest), or why the primary could not say.
type rewriteDigests struct {
	Tables []struct {
		Schema string `json:"schema"`
		Table  string `json:"table"`
		Rows   int64  `json:"rows"`
		Digest string `json:"digest"`
	} `json:"tables"`
	Error string `json:"error"`
}

// missingValue is the value every row that existed when a column was added
// reads in it on the primary: ADD COLUMN evaluated its default once, and
// stored it instead of rewriting the table (pg_attribute.attmissingval,
// printed as an array of one element). A default such as now() or
// current_setting(…) is not volatile, so PostgreSQL does so, but replayed
// on DR it gives DR's value.
type missingValue struct {
	Schema string `json:"schema"`
	Table  string `json:"table"`
	Column string `json:"column"`
	Value  string `json:"value"`
}

// notReplicatedTag marks a haven.ddl_log row in which the source's event
// trigger reports a new table it could not add to the publication.
const notReplicatedTag = "HAVEN NOT REPLICATED"

// Reasons PostgreSQL gives for rewriting a table whose values DR computes
// on its own when it replays the DDL, perhaps differently:
// AT_REWRITE_DEFAULT_VAL fills a new column (a volatile default, a new
// identity or serial column, a stored generated column, a domain with
// constraints), AT_REWRITE_COLUMN_REWRITE converts a column (by a USING
// expression, if the statement has one).
const (
	rewriteDefaultValue = 0x02
	rewriteColumn       = 0x04
)

// usingClause finds a USING expression in an ALTER TABLE's text.
var usingClause = regexp.MustCompile(`(?i)\busing\b`)

// notReplayed are leading keywords of statements that a DDL text may carry
// but that replay leaves out: data changes arrive through the stream
// anyway, and session or transaction control does not belong to replay.
var notReplayed = map[string]bool{
	"INSERT": true, "UPDATE": true, "DELETE": true, "MERGE": true, "COPY": true, "SELECT": true, "VALUES": true,
	"TABLE": true, "WITH": true, "TRUNCATE": true, "SET": true, "RESET": true, "BEGIN": true, "START": true,
	"COMMIT": true, "END": true, "ROLLBACK": true, "ABORT": true, "SAVEPOINT": true, "RELEASE": true, "PREPARE": true,
	"EXECUTE": true, "DEALLOCATE": true, "LISTEN": true, "UNLISTEN": true, "NOTIFY": true, "LOCK": true, "VACUUM": true,
	"ANALYZE": true, "ANALYSE": true, "CHECKPOINT": true, "DISCARD": true, "SHOW": true, "EXPLAIN": true, "FETCH": true,
	"MOVE": true, "CLOSE": true, "DECLARE": true, "CLUSTER": true, "LOAD": true,
}

// concurrently drops CONCURRENTLY from statements that cannot run inside a
// transaction with it, as replay does (DR takes the brief lock instead).
var concurrently = regexp.MustCompile(`(?is)^(\s*(?:CREATE\s+(?:UNIQUE\s+)?INDEX|DROP\s+INDEX|REINDEX\s+(?:\(.*?\)\s*)?(?:INDEX|TABLE|SCHEMA|DATABASE|SYSTEM)|ALTER\s+TABLE\s+.*?\s+DETACH\s+PARTITION\s+\S+))\s+CONCURRENTLY\b`)

// replayableStatements splits a DDL text into statements and keeps those
// to replay, comments before them dropped.
func replayableStatements(text string) []string {
	var out []string
	for _, st := range splitStatements(text) {
		if local, ok := searchPathStatement(st); ok {
			// A text that switches schemas between its statements must
			// switch on DR too; for this transaction only.
			out = append(out, local)
			continue
		}
		if notReplayed[leadingKeyword(st)] {
			continue
		}
		out = append(out, concurrently.ReplaceAllString(stripLeadingComments(st), "$1"))
	}
	return out
}

// createTableAs matches the start of CREATE TABLE … AS up to the table's
// name (submatch 1).
var createTableAs = regexp.MustCompile(`(?is)^CREATE\s+(?:(?:GLOBAL|LOCAL)\s+)?(?:(?:TEMP|TEMPORARY|UNLOGGED)\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?` +
	`((?:"(?:[^"]|"")*"|[^\s(".]+)(?:\s*\.\s*(?:"(?:[^"]|"")*"|[^\s(".]+))*)`)

// trailingComments matches comments at the end of a statement, and
// withData the WITH [NO] DATA that ends a CREATE TABLE … AS.
var (
	trailingComments = regexp.MustCompile(`(?s)(?:\s*(?:--[^\n]*|/\*.*?\*/))+\s*$`)
	withData         = regexp.MustCompile(`(?is)\s+WITH\s+(?:NO\s+)?DATA\s*$`)
)

// tableFromQuery recognises CREATE TABLE … AS (a query, or EXECUTE): it
// returns the table the statement names and the statement made to create
// it without running the query (WITH NO DATA).
//
// The source records such a statement as the table's definition, not its
// query (the query may read what DR lacks, and the rows come by backfill).
// A text of several statements is recorded whole, at its first DDL: a
// CREATE TABLE … AS in it comes once more as its own definition, before
// the text when it was the text's first DDL, after it otherwise.
func tableFromQuery(st string) (table, noData string, ok bool) {
	st = trailingComments.ReplaceAllString(stripLeadingComments(st), "")
	m := createTableAs.FindStringSubmatchIndex(st)
	if m == nil {
		return "", "", false
	}
	// The words at the top level: quoted text, lists and comments stay
	// whole, and are no keyword.
	words := []string{st[m[1]:]}
	for _, space := range []byte{' ', '\n', '\t', '\r'} {
		var split []string
		for _, w := range words {
			split = append(split, splitTopLevel(w, space)...)
		}
		words = split
	}
	for i, w := range words {
		switch {
		case len(w) > 2 && strings.EqualFold(w[:3], "AS("):
			words[i] = "AS" // AS(SELECT …)
		case strings.ContainsAny(w, `"'$(`) || strings.Contains(w, "--") || strings.Contains(w, "/*"):
			words[i] = ""
		}
	}
	if !slices.ContainsFunc(words, func(w string) bool { return strings.EqualFold(w, "AS") }) {
		return "", "", false
	}
	// A trailing WITH [NO] DATA gives way to WITH NO DATA.
	return st[m[2]:m[3]], withData.ReplaceAllString(st, "") + "\nWITH NO DATA", true
}

var (
	setSearchPath   = regexp.MustCompile(`(?is)^\s*SET\s+(?:SESSION\s+|LOCAL\s+)?(search_path\b.*)$`)
	resetSearchPath = regexp.MustCompile(`(?is)^\s*RESET\s+search_path\s*$`)
)

// searchPathStatement rewrites SET or RESET of search_path as SET LOCAL,
// so that replay does not change the apply session beyond its transaction.
func searchPathStatement(st string) (string, bool) {
	st = stripLeadingComments(st)
	if m := setSearchPath.FindStringSubmatch(st); m != nil {
		return "SET LOCAL " + m[1], true
	}
	if resetSearchPath.MatchString(st) {
		return "SET LOCAL search_path TO DEFAULT", true
	}
	return "", false
}

// leadingKeyword is a statement's first word, upper-cased, past comments
// and opening parentheses.
func leadingKeyword(st string) string {
	st = strings.TrimLeft(stripLeadingComments(st), "( \t\r\n")
	end := strings.IndexFunc(st, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r == '_')
	})
	if end < 0 {
		end = len(st)
	}
	return strings.ToUpper(st[:end])
}

func stripLeadingComments(s string) string {
	for {
		s = strings.TrimLeft(s, " \t\r\n")
		switch {
		case strings.HasPrefix(s, "--"):
			i := strings.IndexByte(s, '\n')
			if i < 0 {
				return ""
			}
			s = s[i+1:]
		case strings.HasPrefix(s, "/*"):
			_, rest := scanBlockComment(s)
			s = rest
		default:
			return s
		}
	}
}

// scanBlockComment returns a (possibly nested) /* */ comment and the rest.
func scanBlockComment(s string) (string, string) {
	depth := 0
	for i := 0; i < len(s)-1; i++ {
		switch {
		case s[i] == '/' && s[i+1] == '*':
			depth++
			i++
		case s[i] == '*' && s[i+1] == '/':
			depth--
			i++
			if depth == 0 {
				return s[:i+1], s[i+1:]
			}
		}
	}
	return s, ""
}

var (
	dollarTag   = regexp.MustCompile(`^\$([A-Za-z_][A-Za-z_0-9]*)?\$`)
	beginAtomic = regexp.MustCompile(`(?i)^BEGIN\s+ATOMIC\b`)
	endWord     = regexp.MustCompile(`(?i)^END\b`)
	caseWord    = regexp.MustCompile(`(?i)^CASE\b`)
)

// splitStatements splits SQL text at top-level semicolons, honouring
// quotes ('…', E'…', "…"), dollar quotes and comments. Empty statements
// are dropped; each statement is trimmed.
func splitStatements(text string) []string { return splitTopLevel(text, ';') }

// splitTopLevel splits SQL text at sep where it stands outside quotes,
// comments, parentheses and bodies.
func splitTopLevel(text string, sep byte) []string {
	var out []string
	start := 0
	emit := func(end int) {
		if st := strings.TrimSpace(text[start:end]); st != "" && strings.TrimSpace(stripLeadingComments(st)) != "" {
			out = append(out, st)
		}
	}
	// Semicolons inside parentheses (CREATE RULE … (a; b)) or a BEGIN
	// ATOMIC … END body do not end a statement; CASE … END inside a body
	// does not end the body.
	parens, atomic, cases := 0, 0, 0
	wordAt := func(i int, re *regexp.Regexp) bool {
		return (i == 0 || !isIdentChar(text[i-1])) && re.MatchString(text[i:])
	}
	for i := 0; i < len(text); i++ {
		c := text[i]
		switch {
		case c == '(':
			parens++
		case c == ')':
			parens = max(0, parens-1)
		case (c == 'B' || c == 'b') && wordAt(i, beginAtomic):
			atomic++
			i += len(beginAtomic.FindString(text[i:])) - 1
		case (c == 'C' || c == 'c') && atomic > 0 && wordAt(i, caseWord):
			cases++
			i += 3
		case (c == 'E' || c == 'e') && atomic > 0 && wordAt(i, endWord):
			if cases > 0 {
				cases--
			} else {
				atomic--
			}
			i += 2
		case c == sep && (parens > 0 || atomic > 0):
		case c == sep:
			emit(i)
			start = i + 1
		case c == '-' && i+1 < len(text) && text[i+1] == '-':
			if j := strings.IndexByte(text[i:], '\n'); j >= 0 {
				i += j
			} else {
				i = len(text)
			}
		case c == '/' && i+1 < len(text) && text[i+1] == '*':
			comment, _ := scanBlockComment(text[i:])
			i += len(comment) - 1
		case c == '\'':
			escapes := i > 0 && (text[i-1] == 'E' || text[i-1] == 'e') && (i < 2 || !isIdentChar(text[i-2]))
			i = endOfQuoted(text, i, '\'', escapes)
		case c == '"':
			i = endOfQuoted(text, i, '"', false)
		case c == '$' && (i == 0 || !isIdentChar(text[i-1])):
			if tag := dollarTag.FindString(text[i:]); tag != "" {
				if j := strings.Index(text[i+len(tag):], tag); j >= 0 {
					i += len(tag) + j + len(tag) - 1
				} else {
					i = len(text)
				}
			}
		}
	}
	emit(len(text))
	return out
}

func isIdentChar(c byte) bool {
	return c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

// endOfQuoted returns the index of the quote closing the one at i; a
// doubled quote is an escaped quote, and so is a backslash-escaped one in
// an E” string.
func endOfQuoted(text string, i int, quote byte, backslashEscapes bool) int {
	for j := i + 1; j < len(text); j++ {
		switch {
		case backslashEscapes && text[j] == '\\':
			j++
		case text[j] == quote:
			if j+1 < len(text) && text[j+1] == quote {
				j++
				continue
			}
			return j
		}
	}
	return len(text)
}

// alreadyApplied reports a replay error that means DR already has the
// change (the operator made it there too): an object that exists for a
// statement creating it, or one that is gone for a statement dropping it.
func alreadyApplied(err error, statement string) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return false
	}
	if len(splitTopLevel(statement, ',')) > 1 {
		// Several actions or objects (ALTER TABLE t DROP x, ADD y): one of
		// them being in effect says nothing of the others.
		return false
	}
	switch pgErr.Code {
	case "42P07", "42710", "42701", "42P06", "42723", "42P16":
		// duplicate table, object, column, schema, function; invalid table definition for a duplicate constraint
		return pgErr.Code != "42P16" || strings.Contains(pgErr.Message, "already exists")
	case "42P01", "42704", "42703", "3F000", "42883":
		// undefined table, object, column, schema, function
		return leadingKeyword(statement) == "DROP" || strings.Contains(strings.ToUpper(statement), " DROP ")
	}
	return false
}

// replayDDL runs the DDL a haven.ddl_log insert carries, statement by
// statement, each under a savepoint, with the search_path it ran under on
// the source. A statement that would also change rows is refused (the rows
// arrive through the stream: they would be changed twice).
func (a *applier) replayDDL(ctx context.Context, seq uint64, rel *havenpb.Relation, row *havenpb.Row) error {
	field := func(name string) string {
		for i, c := range rel.Columns {
			if c.Name == name && row.Values[i].Kind == havenpb.DatumKind_DATUM_TEXT {
				return string(row.Values[i].Text)
			}
		}
		return ""
	}
	text, searchPath, tags, role := field(ddlLogColumns.ddl), field(ddlLogColumns.searchPath), field(ddlLogColumns.tags), field(ddlLogColumns.role)
	if tags == notReplicatedTag {
		a.metrics.unreplicatedTables.Inc()
		a.log.Error().Uint64("seq", seq).Str("reason", strings.TrimPrefix(text, "-- haven: ")).
			Msg("a table created on the primary is not replicated: DR has it (from its DDL) but will not receive its rows")
		return nil
	}
	// A rewrite that computed values replays only where the primary said
	// what its rows came to, and DR's come to the same.
	rewrite, _ := strconv.Atoi(field(ddlLogColumns.rewrite))
	var digests *rewriteDigests
	if js := field(ddlLogColumns.digests); js != "" {
		digests = &rewriteDigests{}
		if err := json.Unmarshal([]byte(js), digests); err != nil {
			return blocked(seq, "unappliable", "read what the rows DDL %q rewrote came to: %w", text, err)
		}
	}
	notReplayable := func(why string) error {
		a.metrics.ddlFailures.Inc()
		return blocked(seq, "ddl not replayable", "DDL %q filled or converted a column on the primary with values DR may compute differently "+
			"(a volatile default or USING expression such as random() or now(), or a new identity or serial column numbered in each side's row order), "+
			"and %s: replaying it could make DR differ silently. Re-seed the group (drop the agent's slot), or make such changes as ADD COLUMN "+
			"without the default followed by an UPDATE, whose rows are replicated", text, why)
	}
	if rewrite&rewriteDefaultValue != 0 || rewrite&rewriteColumn != 0 && usingClause.MatchString(text) {
		switch {
		case digests != nil && digests.Error != "":
			return notReplayable(fmt.Sprintf("the primary could not read the rows it rewrote (%s; the agent's role needs SELECT on them)", digests.Error))
		case digests == nil && rewrite&rewriteDefaultValue != 0:
			return notReplayable("the primary's agent predates comparing the rows it rewrote (upgrade it)")
		}
	} else {
		digests = nil
	}
	if err := a.flush(ctx, seq); err != nil {
		return err
	}
	clear(a.unique) // the DDL may add or drop unique indexes
	statements := replayableStatements(text)
	if tags == "TRUNCATE" {
		// Sent by the source's trigger for a partition published via its
		// root (PostgreSQL does not publish it): haven's own statement.
		statements = []string{text}
	}
	if ordinal, _ := strconv.Atoi(field(ddlLogColumns.ordinal)); ordinal > 0 && tags != "TRUNCATE" && tags != "CREATE TABLE AS" && tags != "SELECT INTO" {
		var exact bool
		if statements, exact = statementOfEvent(statements, ordinal, tags); !exact {
			a.log.Warn().Uint64("seq", seq).Int("ordinal", ordinal).Str("command_tag", tags).Str("ddl", text).
				Msg("DDL came in one query string with other statements, and which of them ran here is not clear: replaying it and those after it now. " +
					"Rows the statements between them changed may land in the wrong columns: compare the tables it touches (haven drill run --kind verify)")
		}
		if len(statements) == 0 {
			return nil // replayed with the text's first DDL statement
		}
	}
	onlySearchPath := true
	for _, st := range statements {
		if _, ok := searchPathStatement(st); !ok {
			onlySearchPath = false
		}
	}
	if onlySearchPath {
		a.metrics.ddlNotReplayed.Inc()
		a.log.Error().Uint64("seq", seq).Str("command_tags", tags).Str("ddl", text).
			Msg("DDL ran inside a statement haven does not replay (a function called by SELECT?); make the same schema change on DR by hand: " +
				"changes to tables it touched stop at a schema mismatch until DR matches")
		return nil
	}
	var settings map[string]string
	var missing []missingValue
	if text := field(ddlLogColumns.settings); text != "" {
		if err := json.Unmarshal([]byte(text), &settings); err != nil {
			return blocked(seq, "unappliable", "read the settings DDL %q ran under: %w", text, err)
		}
	}
	if text := field(ddlLogColumns.missing); text != "" {
		if err := json.Unmarshal([]byte(text), &missing); err != nil {
			return blocked(seq, "unappliable", "read the values DDL %q gave existing rows: %w", text, err)
		}
	}
	var hadMissing map[[2]int64]bool
	if len(missing) > 0 {
		var err error
		if hadMissing, err = a.missingValues(ctx, func(attrelid, attnum int64, _, _, _, _, _ string) {}); err != nil {
			return err
		}
	}
	restoreSettings, err := a.setLocal(ctx, settings, replaySettings)
	if err != nil {
		return blocked(seq, "ddl failed", "set the settings DDL %q ran under on the primary: %w; DR needs the same time zones (tzdata)", text, err)
	}
	exec := func(sql string) error { return a.pg.Exec(ctx, sql).Close() }
	var restore string
	if err := a.conn.QueryRow(ctx, `SELECT current_setting('search_path')`).Scan(&restore); err != nil {
		return fmt.Errorf("read search_path: %w", err)
	}
	// The search_path in force at the text's first DDL; SET statements in
	// the text change it from there, as they did on the primary.
	if _, err := a.conn.Exec(ctx, `SELECT set_config('search_path', $1, true)`, searchPath); err != nil {
		return fmt.Errorf("set the DDL's search_path %q: %w", searchPath, err)
	}
	for _, st := range statements {
		if table, noData, ok := tableFromQuery(st); ok && len(statements) > 1 {
			// Its definition, recorded on its own, creates the table.
			var exists bool
			if err := a.conn.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, table).Scan(&exists); err != nil {
				return blocked(seq, "ddl failed", "look up table %s of DDL %q on DR: %w; make the table on DR by hand, apply resumes by itself", table, st, err)
			}
			if exists {
				a.log.Info().Uint64("seq", seq).Str("ddl", st).Msg("table already created from its definition; its query is not replayed")
				continue
			}
			// The definition comes later: the statements after this one
			// may need the table before then.
			st = noData
		}
		if err := exec("SAVEPOINT haven_ddl"); err != nil {
			return fmt.Errorf("savepoint before DDL: %w", err)
		}
		// As the role that ran it on the primary: DDL gets no more rights on
		// DR than it had there, and what it creates has the same owner.
		if err := exec("SET LOCAL ROLE " + pgx.Identifier{role}.Sanitize()); err != nil {
			_ = exec("ROLLBACK TO SAVEPOINT haven_ddl")
			a.metrics.ddlFailures.Inc()
			fix := "create the role on DR (e.g. from pg_dumpall --roles-only)"
			if pgErr := (*pgconn.PgError)(nil); errors.As(err, &pgErr) && pgErr.Code == "42501" {
				fix = fmt.Sprintf("the standby's DR role may not act as it: make it a member (GRANT %s TO %s), or run the standby as a superuser",
					pgx.Identifier{role}.Sanitize(), pgx.Identifier{a.conn.Config().User}.Sanitize())
			}
			return blocked(seq, "ddl failed", "replay DDL as role %q: %w; %s, apply resumes by itself", role, err, fix)
		}
		before, err := a.rowsChangedInTransaction(ctx)
		if err != nil {
			return err
		}
		runErr := exec(st)
		if runErr == nil {
			after, err := a.rowsChangedInTransaction(ctx)
			if err != nil {
				return err
			}
			if changed := rowsChangedBetween(before, after); changed > 0 {
				_ = exec("ROLLBACK TO SAVEPOINT haven_ddl")
				a.metrics.ddlFailures.Inc()
				return blocked(seq, "ddl changes rows", "replaying DDL %q on DR also changed %d rows; those rows arrive through the stream, so replaying it would change them twice: "+
					"make its schema change on DR by hand, without the data changes; replay then finds it in effect and goes on", st, changed)
			}
		}
		switch {
		case runErr == nil:
			a.metrics.ddlApplied.Inc()
			a.log.Info().Uint64("seq", seq).Str("ddl", st).Msg("replayed DDL")
		case alreadyApplied(runErr, st):
			if err := exec("ROLLBACK TO SAVEPOINT haven_ddl"); err != nil {
				return fmt.Errorf("roll back DDL: %w", err)
			}
			a.log.Warn().Uint64("seq", seq).Str("ddl", st).AnErr("error", runErr).Msg("DDL already in effect on DR; continuing")
		default:
			_ = exec("ROLLBACK TO SAVEPOINT haven_ddl")
			a.metrics.ddlFailures.Inc()
			return blocked(seq, "ddl failed", "replay DDL %q (search_path %q) on DR: %w; make DR able to take it (or make the change there by hand), apply resumes by itself", st, searchPath, runErr)
		}
		if err := exec("RESET ROLE"); err != nil {
			return fmt.Errorf("reset role after DDL: %w", err)
		}
		if err := exec("RELEASE SAVEPOINT haven_ddl"); err != nil {
			return fmt.Errorf("release savepoint after DDL: %w", err)
		}
	}
	if _, err := a.conn.Exec(ctx, `SELECT set_config('search_path', $1, true)`, restore); err != nil {
		return fmt.Errorf("restore search_path: %w", err)
	}
	if _, err := a.setLocal(ctx, restoreSettings, replaySettings); err != nil {
		return fmt.Errorf("restore settings after DDL: %w", err)
	}
	if len(missing) > 0 {
		if err := a.setMissingValues(ctx, seq, hadMissing, missing); err != nil {
			return err
		}
	}
	if digests != nil {
		differ, err := a.rewrittenDifferently(ctx, digests)
		if err != nil {
			return err
		}
		if len(differ) > 0 {
			return notReplayable("DR's replay left " + strings.Join(differ, ", ") + " with other values than the primary's")
		}
		a.log.Info().Uint64("seq", seq).Int("tables", len(digests.Tables)).Msg("a rewrite that computed values came out on DR as on the primary")
	}
	// The tables it changed have new shapes, and sequences may have been
	// created: look at them again.
	clear(a.checked)
	clear(a.sequences)
	a.replayedDDL = true
	return nil
}

// statementOfEvent picks from a query string's replayable statements the
// one the source's ordinal-th DDL event (the first is 1) ran, and says
// whether its leading keyword matches the event's command tag. When it
// does not, it returns the statements from that place on, to be replayed
// together. A text of one statement (a DO block, a function's body) is
// replayed at its first event, and nothing at the others.
func statementOfEvent(statements []string, ordinal int, tag string) ([]string, bool) {
	var ddl []string
	for _, st := range statements {
		if _, ok := searchPathStatement(st); !ok {
			ddl = append(ddl, st)
		}
	}
	switch {
	case len(ddl) <= 1 && ordinal == 1:
		return statements, true
	case len(ddl) <= 1:
		return nil, true
	case ordinal <= len(ddl) && leadingKeyword(ddl[ordinal-1]) == strings.SplitN(tag, " ", 2)[0]:
		// The search_path recorded with it is the one it ran under.
		return ddl[ordinal-1 : ordinal], true
	}
	return ddl[min(ordinal-1, len(ddl)):], false
}

// setLocal sets those of names that settings has until the end of the DR
// transaction, and returns what they were.
func (a *applier) setLocal(ctx context.Context, settings map[string]string, names []string) (map[string]string, error) {
	was := map[string]string{}
	for _, name := range names {
		value, ok := settings[name]
		if !ok {
			continue
		}
		var old string
		if err := a.conn.QueryRow(ctx, `SELECT current_setting($1)`, name).Scan(&old); err != nil {
			return nil, fmt.Errorf("read %s: %w", name, err)
		}
		was[name] = old
		if _, err := a.conn.Exec(ctx, `SELECT set_config($1, $2, true)`, name, value); err != nil {
			return nil, fmt.Errorf("set %s to %q: %w", name, value, err)
		}
	}
	return was, nil
}

// rewrittenDifferently compares DR's rows of the tables a replayed DDL
// rewrote with what the primary's came to, and names those that differ.
func (a *applier) rewrittenDifferently(ctx context.Context, digests *rewriteDigests) ([]string, error) {
	settings := maps.Clone(canonicalSettings)
	settings["search_path"] = "pg_catalog, pg_temp"
	restore, err := a.setLocal(ctx, settings, slices.Collect(maps.Keys(settings)))
	if err != nil {
		return nil, err
	}
	var differ []string
	for _, t := range digests.Tables {
		name := pgx.Identifier{t.Schema, t.Table}.Sanitize()
		var query string
		err := a.conn.QueryRow(ctx, `SELECT format($1::text, (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attname) FROM pg_attribute a
			WHERE a.attrelid = k.oid AND a.attnum > 0 AND NOT a.attisdropped), n.nspname, k.relname)
			FROM pg_class k JOIN pg_namespace n ON n.oid = k.relnamespace WHERE n.nspname = $2 AND k.relname = $3`,
			wire.RowsDigest, t.Schema, t.Table).Scan(&query)
		if errors.Is(err, pgx.ErrNoRows) {
			differ = append(differ, name+" (missing)")
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read the columns of %s on DR: %w", name, err)
		}
		var rows int64
		var digest string
		if err := a.conn.QueryRow(ctx, query).Scan(&rows, &digest); err != nil {
			return nil, fmt.Errorf("sum the rows of %s on DR: %w", name, err)
		}
		if rows != t.Rows || digest != t.Digest {
			differ = append(differ, fmt.Sprintf("%s (%d rows)", name, rows))
		}
	}
	if _, err := a.setLocal(ctx, restore, slices.Collect(maps.Keys(restore))); err != nil {
		return nil, err
	}
	return differ, nil
}

// missingValues calls each with the DR columns whose rows read a value
// stored when the column was added (printed as the primary prints it, see
// missingValue), and returns them by table OID and column number.
func (a *applier) missingValues(ctx context.Context, each func(attrelid, attnum int64, schema, table, column, typ, value string)) (map[[2]int64]bool, error) {
	restore, err := a.setLocal(ctx, canonicalSettings, slices.Collect(maps.Keys(canonicalSettings)))
	if err != nil {
		return nil, err
	}
	rows, err := a.conn.Query(ctx, `SELECT a.attrelid::bigint, a.attnum::bigint, n.nspname::text, k.relname::text, a.attname::text,
		format_type(a.atttypid, a.atttypmod), a.attmissingval::text
		FROM pg_attribute a JOIN pg_class k ON k.oid = a.attrelid JOIN pg_namespace n ON n.oid = k.relnamespace
		WHERE a.atthasmissing AND a.attnum > 0 AND NOT a.attisdropped`)
	if err != nil {
		return nil, fmt.Errorf("read the stored values of added columns on DR: %w", err)
	}
	found := map[[2]int64]bool{}
	var attrelid, attnum int64
	var schema, table, column, typ, value string
	_, err = pgx.ForEachRow(rows, []any{&attrelid, &attnum, &schema, &table, &column, &typ, &value}, func() error {
		found[[2]int64{attrelid, attnum}] = true
		each(attrelid, attnum, schema, table, column, typ, value)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read the stored values of added columns on DR: %w", err)
	}
	if _, err := a.setLocal(ctx, restore, slices.Collect(maps.Keys(restore))); err != nil {
		return nil, err
	}
	return found, nil
}

// setMissingValues gives the rows of every column the replayed DDL added
// (one DR did not have before, hadMissing) the value they read on the
// primary, where DR's replay stored another.
func (a *applier) setMissingValues(ctx context.Context, seq uint64, hadMissing map[[2]int64]bool, missing []missingValue) error {
	type fix struct{ table, column, typ, value string }
	var fixes []fix
	_, err := a.missingValues(ctx, func(attrelid, attnum int64, schema, table, column, typ, value string) {
		if hadMissing[[2]int64{attrelid, attnum}] {
			return
		}
		for _, m := range missing {
			if m.Schema == schema && m.Table == table && m.Column == column && m.Value != value {
				fixes = append(fixes, fix{pgx.Identifier{schema, table}.Sanitize(), pgx.Identifier{column}.Sanitize(), typ, m.Value})
			}
		}
	})
	if err != nil {
		return err
	}
	for _, f := range fixes {
		// The rows there are exactly those the column was added to: what
		// the primary changed after comes later in the stream.
		tag, err := a.conn.Exec(ctx, fmt.Sprintf(`UPDATE ONLY %s SET %s = (($1::text::text[])[1])::%s`, f.table, f.column, f.typ), f.value)
		if err != nil {
			a.metrics.ddlFailures.Inc()
			return blocked(seq, "ddl failed", "give the rows of %s the value %s their new column %s has on the primary: %w", f.table, f.value, f.column, err)
		}
		a.log.Info().Uint64("seq", seq).Str("table", f.table).Str("column", f.column).Str("value", f.value).Int64("rows", tag.RowsAffected()).
			Msg("the new column's default gave another value on DR: its rows now hold the primary's")
	}
	return nil
}

// rowsChangedInTransaction counts, per table, the rows this transaction
// inserted, updated or deleted so far (materialized views, which a replayed
// REFRESH fills, are not replicated and do not count).
func (a *applier) rowsChangedInTransaction(ctx context.Context) (map[uint32]int64, error) {
	rows, err := a.conn.Query(ctx, `SELECT s.relid, s.n_tup_ins + s.n_tup_upd + s.n_tup_del
		FROM pg_stat_xact_user_tables s JOIN pg_class c ON c.oid = s.relid WHERE c.relkind IN ('r', 'p')`)
	if err != nil {
		return nil, fmt.Errorf("count rows changed in the transaction: %w", err)
	}
	counts := map[uint32]int64{}
	var relid uint32
	var n int64
	_, err = pgx.ForEachRow(rows, []any{&relid, &n}, func() error {
		counts[relid] = n
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("count rows changed in the transaction: %w", err)
	}
	return counts, nil
}

// rowsChangedBetween sums what grew between two counts; a table that the
// statement dropped simply disappears from the second.
func rowsChangedBetween(before, after map[uint32]int64) int64 {
	var changed int64
	for relid, n := range after {
		if n > before[relid] {
			changed += n - before[relid]
		}
	}
	return changed
}
