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
	"sort"
	"strconv"
	"strings"
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
// are left out; so are owners, privileges and tablespaces, which the DR
// site need not share.
func dumpSchema(ctx context.Context, pgDump, sourceURL string, options ...string) (string, error) {
	args := append([]string{"--schema-only", "--no-owner", "--no-privileges",
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
// haven's own triggers.
// Sections start with pg_dump's "-- Name: …; Type: …;" headers.
func filterDump(dump []byte) (string, error) {
	var b strings.Builder
	skip := false
	sc := bufio.NewScanner(bytes.NewReader(dump))
	sc.Buffer(make([]byte, 0, 64<<10), 64<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "-- Name: ") || strings.HasPrefix(line, "-- Data for Name: ") {
			// Event triggers and haven's triggers (truncate capture on
			// partitions, the write guard) call functions of haven's
			// schema, which the DR site has not.
			skip = strings.Contains(line, "; Type: EVENT TRIGGER;") ||
				strings.Contains(line, " haven_capture_truncate; Type: TRIGGER;") ||
				strings.Contains(line, " haven_guard; Type: TRIGGER;")
		}
		if skip {
			continue
		}
		if strings.HasPrefix(line, `\`) {
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
