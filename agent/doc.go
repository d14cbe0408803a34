// Package agent captures every committed change of a PostgreSQL database and
// publishes it to the group's JetStream stream. It runs next to the primary.
//
// # What it guarantees
//
// On first start the agent creates a publication and a permanent pgoutput
// slot with an exported snapshot, copies every table under that snapshot in
// parallel (COPY, on connections other than the replication one, which must
// stay idle for the snapshot to live), and publishes the rows as snapshot
// chunks framed by SNAPSHOT_BEGIN and SNAPSHOT_END. Streaming starts at the
// slot's consistent point, so snapshot and stream meet exactly.
//
// Each source transaction becomes one or more chunks of bounded size, in
// commit order; a transaction of any size is never held whole in memory.
// A chunk is identified by its transaction's commit LSN and the ordinal of
// its first change (also its Nats-Msg-Id), not by where chunk boundaries
// fell, so a restarted agent may cut a transaction differently. Every publish
// is chained to the stream's previous message (Nats-Expected-Last-Msg-Id), so
// JetStream refuses whatever follows a message it lost or rejected and the
// stream never holds a transaction ahead of an earlier one; a new session
// reads the stream's last message and continues exactly after it. The first
// chunk of each transaction also names the transaction before it
// (prev_commit_lsn), so that a reader sees when the stream lost messages it
// had not read; a session that finds the stream ending before what JetStream
// had acknowledged to this process logs the loss and names that one.
//
// The state of the initial snapshot is recorded in the HAVEN_STATE
// key-value bucket before the slot is created and when its end marker is
// stored, so an interrupted snapshot is never taken for a finished one.
//
// With a superuser (the agent, or one running DDLCaptureSQL for it), DDL is
// captured by event triggers into the replicated haven.ddl_log (see
// ddl.go), and new tables of an all-tables group join the publication in
// the transaction that creates them. A table that joins with rows in it is
// backfilled by key-ordered chunks while the stream goes on, each published
// at its watermark's place in the stream (see backfill.go); one the agent
// may not read waits for a grant, alone.
//
// Three positions are kept apart: received (decoded from the walsender),
// published (handed to JetStream) and confirmed (every chunk of every
// transaction up to it acknowledged by JetStream). Only the confirmed one is
// reported to PostgreSQL as flushed, so a crash of the agent, of NATS or of
// the network can never make PostgreSQL discard WAL whose changes are not in
// the stream. Standby status updates keep flowing while publishing is
// back-pressured, so the walsender does not time the connection out.
//
// Heartbeats go through the slot itself (pg_logical_emit_message), so an
// idle database still advances the slot and end-to-end lag can be measured;
// they carry the sequences' positions to the DR site in WAL order.
//
// With --controllers, the agent checks in with the controller quorum: it
// captures only while its site is primary and holds the lease, fences its
// database when the lease runs out or another site is promoted (see
// lease.go), drains it for a switchover, and, when its site rejoins after a
// failover, writes the transactions the new primary lacks to a report
// (report.go) before dropping its slot.
//
// Connection failures (PostgreSQL or NATS) are retried with backoff and
// logged; configuration problems that an operator must fix (wal_level,
// privileges, tables without a usable replica identity, an invalidated slot)
// stop the agent with an error that says what to do.
package agent
