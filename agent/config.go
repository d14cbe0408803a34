package agent

import (
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/haven-dr/haven/proto/wire"
)

// Config is what the agent needs to run; cmd/haven fills it from flags.
type Config struct {
	// SourceURL is a libpq-style URL of the primary database. The agent adds
	// replication=database itself for its replication connection.
	SourceURL string
	// NATSURL is one or more comma-separated NATS server URLs.
	NATSURL string
	// Group names the replication group; it names the slot, the publication
	// and the stream.
	Group string
	// Tables restricts capture to these tables ("schema.table" or "table"
	// for public). Empty: every table of the non-system schemas.
	Tables []string
	// PublishViaRoot publishes partitioned tables as their root (the changes
	// of every partition arrive as the root's; DR routes them to its own
	// partitions) instead of each partition as a table of its own.
	PublishViaRoot bool
	// SetReplicaIdentityFull gives tables without a primary key or usable
	// replica identity REPLICA IDENTITY FULL instead of refusing them.
	SetReplicaIdentityFull bool
	// Epoch is the fencing token stamped on every message; with
	// Controllers, the quorum's epoch for the group replaces it.
	Epoch uint64
	// Controllers are the control API URLs of the controller quorum; empty:
	// no failover coordination (the agent never fences).
	Controllers []string
	// Site names this agent's site to the controllers.
	Site string
	// ProbeURL is the URL the controllers probe the primary with (default
	// SourceURL).
	ProbeURL string
	// ReportDir is where a deposed primary's agent writes the report of
	// transactions the new primary lacks, when it rejoins.
	ReportDir string
	// Synchronous names the agent's replication connection in the
	// primary's synchronous_standby_names: a commit returns to its client
	// only once JetStream has it (RPO 0), at the cost of that round trip.
	Synchronous bool
	// StreamReplicas is the JetStream replica count for a stream the agent
	// creates (1 or 3 or 5).
	StreamReplicas int
	// StreamMaxAge bounds how long the stream keeps messages; 0 keeps them
	// until StreamMaxBytes (if set).
	StreamMaxAge time.Duration
	// StreamMaxBytes bounds the stream's size; 0 means no bound.
	StreamMaxBytes int64
	// DuplicateWindow is the JetStream dedupe window for a created stream.
	DuplicateWindow time.Duration
	// ChunkBytes bounds the encoded size of one chunk.
	ChunkBytes int
	// SnapshotChunkBytes is the size of the initial snapshot's chunks (at
	// most the NATS server's max_payload, less room for the envelope).
	SnapshotChunkBytes int
	// Compress compresses every chunk with zstd; without it, only snapshot
	// rows are compressed, with s2.
	Compress bool
	// SnapshotBinary copies tables whose columns are all of built-in types
	// in COPY's binary format (see copyFormat); the others go as text.
	SnapshotBinary bool
	// SnapshotWorkers copy tables in parallel during the initial snapshot.
	SnapshotWorkers int
	// HeartbeatInterval is how often a heartbeat goes through the slot.
	HeartbeatInterval time.Duration
	// StatusInterval is how often a standby status update is sent to the
	// walsender; keep it well under the server's wal_sender_timeout.
	StatusInterval time.Duration
	// MaxInFlight bounds chunks published but not yet acknowledged.
	MaxInFlight int
	// RetainedWALWarning is the WAL the slot may hold on the primary before
	// the agent warns (0: never).
	RetainedWALWarning int64
	// PgDump is the pg_dump used to ship the source schema with the initial
	// snapshot: empty finds one, "off" ships none (the standby then creates
	// bare tables: columns, NOT NULL and the key).
	PgDump string
	// BackfillChunkRows is how many rows a backfill reads per chunk (one
	// short REPEATABLE READ transaction each; the rows are held in memory
	// until JetStream has them).
	BackfillChunkRows int
	// PublishTimeout is how long a published chunk may wait for its
	// acknowledgement before the session restarts (and republishes from the
	// last confirmed position).
	PublishTimeout time.Duration
}

// DefaultConfig returns the defaults the command line starts from.
func DefaultConfig() Config {
	return Config{
		Epoch:              1,
		StreamReplicas:     1,
		DuplicateWindow:    2 * time.Minute,
		ChunkBytes:         256 << 10,
		SnapshotChunkBytes: 1 << 20,
		SnapshotWorkers:    4,
		SnapshotBinary:     true,
		HeartbeatInterval:  5 * time.Second,
		StatusInterval:     time.Second,
		MaxInFlight:        256,
		PublishTimeout:     30 * time.Second,
		BackfillChunkRows:  1000,
		ReportDir:          ".",
		RetainedWALWarning: 8 << 30,
	}
}

// Validate reports the first problem with c.
func (c Config) Validate() error {
	switch {
	case c.SourceURL == "":
		return errors.New("no source database: set --source-url (or HAVEN_SOURCE_URL)")
	case c.NATSURL == "":
		return errors.New("no NATS server: set --nats-url (or HAVEN_NATS_URL)")
	case c.Group == "":
		return errors.New("no group: set --group (or HAVEN_GROUP)")
	case c.StreamReplicas != 1 && c.StreamReplicas != 3 && c.StreamReplicas != 5:
		return fmt.Errorf("stream replicas %d: use 1, 3 or 5", c.StreamReplicas)
	case c.ChunkBytes < 4<<10 || c.SnapshotChunkBytes < 4<<10:
		return fmt.Errorf("chunk size %d bytes, snapshot chunk size %d bytes: use at least 4096", c.ChunkBytes, c.SnapshotChunkBytes)
	case c.SnapshotWorkers < 1:
		return fmt.Errorf("snapshot workers %d: use at least 1", c.SnapshotWorkers)
	case c.HeartbeatInterval <= 0 || c.StatusInterval <= 0 || c.PublishTimeout <= 0:
		return errors.New("heartbeat and status intervals and the publish timeout must be positive")
	case c.MaxInFlight < 1:
		return fmt.Errorf("max in-flight %d: use at least 1", c.MaxInFlight)
	case c.BackfillChunkRows < 1:
		return fmt.Errorf("backfill chunk rows %d: use at least 1", c.BackfillChunkRows)
	case len(c.Controllers) > 0 && c.Site == "":
		return errors.New("--controllers needs --site: the name of this agent's site (e.g. the data centre)")
	case c.Epoch == 0:
		return errors.New("epoch 0: epochs start at 1")
	}
	if _, err := pgconn.ParseConfig(c.SourceURL); err != nil {
		return fmt.Errorf("--source-url: %w", err)
	}
	return wire.ValidateGroup(c.Group)
}
