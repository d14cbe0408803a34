// Package pgtest starts throwaway PostgreSQL clusters for tests, demos and
// benchmarks: a real server from the machine's initdb and pg_ctl, never a mock.
//
// Each cluster lives in its own temporary directory, listens only on a free
// loopback port and on a Unix socket inside that directory, trusts every local
// connection (replication included) and runs with wal_level=logical, so haven's
// capture side can create slots and stream from it straight away. Durability is
// traded for speed (fsync=off, full_page_writes=off): a Kill simulates a crash
// of the server processes, not a power loss.
//
// Start, Stop, Kill, Restart and Destroy may be called in any order and more
// than once; Destroy leaves no process and no file behind. New and NewWith wrap
// Start for tests: they log through t.Logf, fail the test on error and destroy
// the cluster in t.Cleanup. A process that dies without cleaning up (a test
// binary killed by go test -timeout runs no cleanups) leaves its clusters
// running; the next Start on the machine finds them by their owner's pid and
// destroys them.
//
// When the process runs as root (as in CI containers), every initdb, pg_ctl and
// postgres process runs as the "postgres" OS user, because PostgreSQL refuses to
// run as root; the cluster directory is then created under /tmp and owned by
// that user, since t.TempDir() is private to root.
package pgtest
