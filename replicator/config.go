package replicator

import (
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/haven-dr/haven/proto/wire"
)

// Config is what the standby needs to run; cmd/haven fills it from flags.
type Config struct {
	// TargetURL is a libpq-style URL of the DR database.
	TargetURL string
	// NATSURL is one or more comma-separated NATS server URLs.
	NATSURL string
	// Group names the replication group (and so the stream).
	Group string
	// GroupChanges ends a target transaction once it holds this many row
	// changes (at a source-transaction boundary).
	GroupChanges int
	// GroupDelay ends a target transaction once it has been open this long.
	GroupDelay time.Duration
	// PipelineStatements bounds the row changes in one batch sent to DR
	// (up to three are in flight at a time).
	PipelineStatements int
	// SnapshotLanes is how many DR connections of its own a snapshot loads
	// on: 1 or 2 (load.go). Two load at once, which pays only on a DR
	// with CPUs to spare: on 2 CPUs, two COPYs into PostgreSQL 15 at once
	// took 1.5 times the CPU of one for the same rows, and no less time.
	SnapshotLanes int
	// BlockedRetry is how often apply retries after it stopped at a message
	// it cannot apply.
	BlockedRetry time.Duration
	// Controllers are the control API URLs of the controller quorum; empty:
	// no failover (the standby is never promoted by haven).
	Controllers []string
	// Site names the DR site to the controllers.
	Site string
	// PromoteHook is a shell command run after a promotion, with
	// HAVEN_GROUP, HAVEN_SITE and HAVEN_EPOCH in its environment.
	PromoteHook string
	// SequenceGap is how many increments past the primary's last known
	// value a promotion moves every sequence.
	SequenceGap int64
	// DrillDir is where a promote drill clones the DR cluster, in a
	// directory of its own (rehearse.go); empty: no promote drills.
	DrillDir string
	// DrillCloneRate caps how fast a promote drill reads the DR cluster
	// (pg_basebackup --max-rate: 32k to 1024M); empty: no cap.
	DrillCloneRate string
}

var cloneRate = regexp.MustCompile(`^[0-9]+[kM]?$`)

// DefaultConfig returns the defaults the command line starts from.
func DefaultConfig() Config {
	return Config{
		GroupChanges:       5000,
		GroupDelay:         100 * time.Millisecond,
		PipelineStatements: 512,
		SnapshotLanes:      1,
		BlockedRetry:       30 * time.Second,
		SequenceGap:        1000,
	}
}

// Validate reports the first problem with c.
func (c Config) Validate() error {
	switch {
	case c.TargetURL == "":
		return errors.New("no target database: set --target-url (or HAVEN_TARGET_URL)")
	case c.NATSURL == "":
		return errors.New("no NATS server: set --nats-url (or HAVEN_NATS_URL)")
	case c.Group == "":
		return errors.New("no group: set --group (or HAVEN_GROUP)")
	case c.GroupChanges < 1 || c.PipelineStatements < 1:
		return errors.New("group size and pipeline depth must be at least 1")
	case c.SnapshotLanes < 1 || c.SnapshotLanes > 2:
		// A third lane could wait on a row lock of a later group's lane
		// while that lane waits for the second's commit, a cycle that
		// waitForPrevious does not look for.
		return fmt.Errorf("--snapshot-lanes is %d: it must be 1 or 2", c.SnapshotLanes)
	case c.GroupDelay <= 0 || c.BlockedRetry <= 0:
		return errors.New("group delay and blocked retry must be positive")
	case len(c.Controllers) > 0 && c.Site == "":
		return errors.New("--controllers needs --site: the name of the DR site (e.g. the data centre)")
	case c.SequenceGap < 0:
		return errors.New("--promote-sequence-gap must not be negative")
	case c.DrillDir != "" && (!filepath.IsAbs(c.DrillDir) || filepath.Clean(c.DrillDir) == "/"):
		return fmt.Errorf("--drill-dir %q must be an absolute path, not /", c.DrillDir)
	case c.DrillCloneRate != "" && !cloneRate.MatchString(c.DrillCloneRate):
		return fmt.Errorf("--drill-clone-rate %q: a rate in kB/s, with k or M, e.g. 64M", c.DrillCloneRate)
	}
	if _, err := pgconn.ParseConfig(c.TargetURL); err != nil {
		return fmt.Errorf("--target-url: %w", err)
	}
	return wire.ValidateGroup(c.Group)
}
