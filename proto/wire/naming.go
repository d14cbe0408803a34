package wire

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

var groupPattern = regexp.MustCompile(`^[a-z][a-z0-9_]{0,39}$`)

// ValidateGroup checks a group name: it becomes part of a slot name, a
// publication name, a stream name, a consumer name and a subject, so it is
// kept to lower-case letters, digits and underscores.
func ValidateGroup(group string) error {
	if !groupPattern.MatchString(group) {
		return fmt.Errorf("group %q: use 1-40 lower-case letters, digits or underscores, starting with a letter", group)
	}
	return nil
}

// ConsumerName is a standby's durable consumer on a group's stream; standby
// identifies the DR database (several may follow one stream).
func ConsumerName(group, standby string) string { return "standby_" + group + "_" + standby }

// StreamName is the JetStream stream that carries a group's chunks.
func StreamName(group string) string { return "HAVEN_" + strings.ToUpper(group) }

// SubjectPrefix is the prefix of every subject of a group's stream; the
// stream binds SubjectPrefix(group)+">".
func SubjectPrefix(group string) string { return "haven." + group + "." }

// Subjects of a group's stream. All share one stream, so stream order is the
// order the agent published in, across subjects.
func SnapshotSubject(group string) string    { return SubjectPrefix(group) + "snapshot" }
func TransactionSubject(group string) string { return SubjectPrefix(group) + "txn" }

// TopologySubject is where a promoted standby announces a group's new
// primary: outside the group's stream, whose readers take every message
// there for a chunk.
func TopologySubject(group string) string { return "haven_topology." + group }

// TransactionMsgID is the Nats-Msg-Id of the chunk of a source transaction
// that starts at change firstChange. It depends only on the source, so a
// restarted agent republishing the same chunk produces the same id and
// JetStream drops the copy.
func TransactionMsgID(systemID uint64, slot string, commitLSN uint64, firstChange uint32) string {
	return fmt.Sprintf("%d/%s/%X/%d", systemID, slot, commitLSN, firstChange)
}

// SnapshotMsgID is the Nats-Msg-Id of a chunk of a table's snapshot copy;
// table is the source relation OID.
func SnapshotMsgID(systemID uint64, slot string, snapshotLSN uint64, table uint32, chunk uint32) string {
	return fmt.Sprintf("%d/%s/snapshot/%X/%d/%d", systemID, slot, snapshotLSN, table, chunk)
}

// SnapshotMarkerMsgID is the Nats-Msg-Id of a snapshot's begin or end marker.
func SnapshotMarkerMsgID(systemID uint64, slot string, snapshotLSN uint64, marker string) string {
	return fmt.Sprintf("%d/%s/snapshot/%X/%s", systemID, slot, snapshotLSN, marker)
}

// DrillSubject is where the controllers publish a group's drill reports.
func DrillSubject(group string) string { return "haven.drills." + group }

// PublicationName is the publication of a group on its primary.
func PublicationName(group string) string { return "haven_" + group }

// SlotName is the logical replication slot of a group on its primary.
func SlotName(group string) string { return "haven_" + group }

// TextFormatSettings are the session settings under which both sides
// produce and parse values' text forms: the agent's connections and the
// standby's apply connection run with them, so that a value means the same
// on both sides whatever the servers' defaults (a "01/02/2024" under
// DateStyle SQL, DMY is not the same date under MDY).
var TextFormatSettings = map[string]string{
	"client_encoding":    "UTF8",
	"lc_monetary":        "C",
	"DateStyle":          "ISO, YMD",
	"IntervalStyle":      "postgres",
	"extra_float_digits": "3",
	"bytea_output":       "hex",
	"TimeZone":           "UTC",
}

// SessionSettings are settings of haven's own sessions on both sides,
// whatever the database or the role sets for everyone else (pg_dump sets
// the same). A snapshot's COPY, a target transaction waiting for its next
// chunk, a lock apply waits for, run as long as they need. A row-level
// security policy that would hide rows from a read, or keep a write from
// rows, is an error rather than a silent filter.
var SessionSettings = map[string]string{
	"statement_timeout":                   "0",
	"lock_timeout":                        "0",
	"idle_in_transaction_session_timeout": "0",
	"row_security":                        "off",
}

// TypeNameSearchPath is the search_path under which both sides name column
// types (format_type): with only pg_catalog on it, every other type prints
// schema-qualified on both sides alike. The standby's apply connection keeps
// the database's own search_path, because triggers that fire on DR (ENABLE
// ALWAYS) run in it.
const TypeNameSearchPath = "pg_catalog"

// StateBucket is the JetStream key-value bucket where an agent records the
// state of its group's initial snapshot. Unlike the stream's messages, the
// record does not age out: an agent can always tell a finished snapshot
// from an interrupted one, and a standby can always find the latest.
const StateBucket = "HAVEN_STATE"

// SnapshotKey is a group's key in StateBucket.
func SnapshotKey(group string) string { return "snapshot." + group }

// SnapshotState is the value under SnapshotKey, JSON-encoded.
type SnapshotState struct {
	SystemID uint64 `json:"system_id"`
	// Database is the source database's name: with SystemID, a standby
	// recognises a target that is the source itself.
	Database    string `json:"database,omitempty"`
	Slot        string `json:"slot"`
	SnapshotLSN uint64 `json:"snapshot_lsn,omitempty"`
	// BeginSeq is the stream sequence of the snapshot's SNAPSHOT_BEGIN.
	BeginSeq uint64 `json:"begin_seq,omitempty"`
	// Done is set once SNAPSHOT_END is in the stream.
	Done bool `json:"done"`
	// StreamCreated identifies the stream the snapshot went into (its
	// creation time): a recreated stream does not hold it.
	StreamCreated time.Time `json:"stream_created"`
}

// SameStream reports whether the state was recorded for the stream created
// at created (compared at microseconds, as PostgreSQL stores it).
func (st SnapshotState) SameStream(created time.Time) bool {
	return st.StreamCreated.Truncate(time.Microsecond).Equal(created.Truncate(time.Microsecond))
}

// LookupStream finds a group's stream. When nothing answers, the error says
// that the NATS server runs without JetStream, rather than only "no
// responders".
func LookupStream(ctx context.Context, js jetstream.JetStream, group string) (jetstream.Stream, error) {
	stream, err := js.Stream(ctx, StreamName(group))
	switch {
	case errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount):
		return nil, fmt.Errorf("look up stream %s: the NATS server does not answer for JetStream (%w): run nats-server with JetStream enabled "+
			"(-js, or a jetstream {} block in its configuration) and, with accounts, give haven's account JetStream", StreamName(group), err)
	case err != nil:
		return nil, fmt.Errorf("look up stream %s: %w", StreamName(group), err)
	}
	return stream, nil
}
