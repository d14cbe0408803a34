// Package replicator applies a group's stream to the DR database: it runs
// next to the standby.
//
// # What it guarantees
//
// Messages are applied in stream order, exactly once. The stream sequence,
// commit LSN and commit time of the last applied source transaction are
// written to haven.apply_position in the same target transaction as the
// changes, so a crash at any moment either keeps a transaction and its
// position or neither; on restart the durable consumer is recreated at the
// sequence after the stored one, once the message stored there is checked
// to be the one applied. Duplicates that JetStream's dedupe window let
// through are skipped by commit LSN, and a transaction sent again in other
// chunks is applied from the first change not yet applied.
//
// Several small source transactions are grouped into one target transaction,
// never split; a transaction that spans several chunks is applied as it
// arrives, inside one open target transaction, so its size is not bounded by
// memory. Statements are prepared once per shape and pipelined; changes use
// session_replication_role = replica, so triggers and foreign keys on DR do
// not fire twice. A haven.ddl_log row replays its DDL at that point of the
// stream, as the role that ran it on the primary (see ddl.go).
//
// A message it cannot apply safely (undecodable, from another group or
// system, an unknown format version, a gap in the stream, a chunk out of
// order, an older epoch, a transaction whose predecessor in the agent's
// chain is not the last one applied) stops apply at that message: nothing after it is applied, it is not
// acknowledged, and the log and the haven_standby_blocked metric say which
// message and why. DR failing for a reason of its own (a full disk, a
// deadlock) is retried instead: the message is not at fault.
//
// The initial snapshot arrives between SNAPSHOT_BEGIN and SNAPSHOT_END: the
// standby creates missing target tables from the snapshot's descriptors (or
// checks that existing ones match), empties them, and loads the rows with
// COPY, one position-stamped target transaction per chunk, so a crash
// mid-snapshot resumes where it stopped.
//
// A table that joins the group with rows is backfilled between BEGIN and END
// changes: its rows arrive as upserts, and an update or delete of a row not
// yet there is expected until END (see backfill.go).
//
// With --controllers, the standby checks in with the controller quorum: it
// applies only while its site is the DR site, promotes its database when
// ordered (promote.go), and, when its site rejoins after a failover, replaces
// the database's content with the new primary's snapshot. A message of an
// older epoch than it follows stops apply.
package replicator
