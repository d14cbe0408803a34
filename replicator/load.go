package replicator

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/haven-dr/haven/proto/havenpb"
)

// Snapshot load in lanes: a snapshot's COPY chunks load on DR connections
// of their own (Config.SnapshotLanes: one, or two at once). Each lane
// loads whole groups of chunks in a target transaction of its own; groups
// go to the lanes in turn and commit strictly in stream order (a lane
// commits a group only after the group before it, on the other lane,
// committed), each with the position of its last chunk. What is committed
// is therefore always a prefix of the stream, and a restart loads exactly
// what was not. A lane of its own, even alone, lets the applier read and
// decode the next chunks while DR loads and commits.

// loadGroupBytes and loadGroupAge end a group. Each group is a COPY of its
// own per table, and each COPY takes a fresh 16 MiB ring of DR's shared
// buffers: with groups of 16 MiB, a load walked through all of them, and
// DR's backend spent 1.25 to 1.6 times the CPU of a single COPY (page faults
// on memory it had not touched yet, dirty buffers left behind). With
// groups of 256 MiB the ring is reused; the age bound keeps a slow DR's
// group far inside the consumer's AckWait, and caps what a restart loads
// again. A group also ends when no chunk came for a moment (GroupDelay).
// (Variables for tests.)
var (
	loadGroupBytes = 256 << 20
	loadGroupAge   = 30 * time.Second
)

const (
	// laneQueue is how many chunks (of up to 1 MiB) wait for a lane, so
	// that a lane still has work while it commits a group or, with two,
	// while the other's group is handed out.
	laneQueue = 8
)

// loadGroup is chunks loaded in one target transaction.
type loadGroup struct {
	lane  *lane
	pos   position      // after its last chunk
	toAck jetstream.Msg // its last chunk
	done  chan struct{} // closed once err is final
	err   error
}

func (g *loadGroup) finish(err error) {
	g.err = err
	close(g.done)
}

// loadStep is a chunk for a lane to load, or the end of its group.
type loadStep struct {
	group  *loadGroup
	seq    uint64
	rel    *havenpb.Relation
	data   []byte // COPY rows, in text or binary format
	binary bool
	rows   uint64
	// end: commit the group, after prev (the group ended before it).
	end  bool
	prev *loadGroup
}

type lane struct {
	conn   *pgx.Conn
	pid    uint32 // of its DR backend
	steps  chan loadStep
	quit   <-chan struct{} // closed when what is left is to be dropped
	exited chan struct{}
}

// parallelLoad is the state of a snapshot load in lanes.
type parallelLoad struct {
	lanes        []*lane
	quit         chan struct{}
	current      int        // lane of the open group
	group        *loadGroup // open group (nil: none)
	groupBytes   int
	groupStarted time.Time
	last         *loadGroup   // the group ended last: the next commits after it
	pending      []*loadGroup // ended, not yet confirmed (oldest first)
}

// errBehindFailed: a group not committed because one before it failed.
var errBehindFailed = errors.New("a group before it failed")

// loadChunk hands a COPY chunk to the lane of the open group.
func (a *applier) loadChunk(ctx context.Context, seq uint64, msg jetstream.Msg, c *havenpb.Chunk) error {
	if err := a.confirmLoaded(false); err != nil {
		return err
	}
	if a.load == nil {
		if err := a.startLoad(ctx); err != nil {
			return err
		}
	}
	p := a.load
	data, binary := c.CopyText, c.Kind == havenpb.Kind_KIND_SNAPSHOT_COPY_BINARY
	if binary {
		data = c.CopyBinary
		if err := olderThanSource(a.pg.ParameterStatus("server_version"), c.SourceVersion); err != nil {
			return blocked(seq, "apply failed", "%w", err)
		}
	}
	if p.group == nil {
		p.group, p.groupStarted = &loadGroup{lane: p.lanes[p.current], done: make(chan struct{})}, time.Now()
	}
	select {
	case p.lanes[p.current].steps <- loadStep{group: p.group, seq: seq, rel: c.Relations[0], data: data, binary: binary, rows: c.CopyRows}:
	case <-ctx.Done():
		return ctx.Err()
	}
	a.next.streamSeq = seq
	p.group.toAck = msg
	p.groupBytes += len(data)
	if p.groupBytes >= loadGroupBytes || time.Since(p.groupStarted) >= loadGroupAge {
		return a.endLoadGroup(ctx)
	}
	return nil
}

// startLoad opens the lanes' connections, as the applier's own is set up.
func (a *applier) startLoad(ctx context.Context) error {
	p := &parallelLoad{quit: make(chan struct{}), lanes: make([]*lane, a.cfg.SnapshotLanes)}
	for i := range p.lanes {
		conn, err := pgx.ConnectConfig(ctx, a.conn.Config())
		if err == nil {
			// A group's commit need not wait for its WAL to reach disk:
			// lost in a crash, it goes with the position it wrote, and
			// the restart loads it again from the stream.
			_, err = conn.Exec(ctx, "SET session_replication_role = replica; SET synchronous_commit = off")
		}
		if err != nil {
			if conn != nil {
				_ = conn.Close(context.Background())
			}
			a.stopLanes(p)
			return fmt.Errorf("connect a snapshot load lane to the DR database: %w", err)
		}
		l := &lane{conn: conn, pid: conn.PgConn().PID(), steps: make(chan loadStep, laneQueue), quit: p.quit, exited: make(chan struct{})}
		p.lanes[i] = l
		go a.runLane(ctx, l)
	}
	a.load = p
	return nil
}

// endLoadGroup sends the open group's end to its lane; the next group goes
// to the next lane.
func (a *applier) endLoadGroup(ctx context.Context) error {
	p := a.load
	g := p.group
	if g == nil {
		return nil
	}
	g.pos = a.next
	select {
	case p.lanes[p.current].steps <- loadStep{group: g, end: true, prev: p.last}:
	case <-ctx.Done():
		return ctx.Err()
	}
	p.last = g
	p.pending = append(p.pending, g)
	p.group, p.groupBytes = nil, 0
	p.current = (p.current + 1) % len(p.lanes)
	return nil
}

// confirmLoaded records the groups committed so far, in order, and
// acknowledges their messages; with wait, it waits for every ended group.
// It returns the first failure.
func (a *applier) confirmLoaded(wait bool) error {
	p := a.load
	for p != nil && len(p.pending) > 0 {
		g := p.pending[0]
		if !wait {
			select {
			case <-g.done:
			default:
				return nil
			}
		}
		<-g.done
		p.pending = p.pending[1:]
		if g.err != nil {
			a.stopLanes(p)
			a.load = nil
			a.next = a.pos // what the lanes held is not committed
			return g.err
		}
		a.pos, a.found = g.pos, true
		a.metrics.groups.Inc()
		if err := g.toAck.Ack(); err != nil {
			a.log.Debug().Err(err).Msg("ack failed; the messages will be redelivered and skipped")
		}
	}
	return nil
}

// finishLoad commits what the lanes hold and closes them: before any
// message that is not a COPY chunk, which the applier's own connection
// handles.
func (a *applier) finishLoad(ctx context.Context) error {
	if a.load == nil {
		return nil
	}
	if err := a.endLoadGroup(ctx); err != nil {
		a.abandonLoad()
		return err
	}
	if err := a.confirmLoaded(true); err != nil {
		return err
	}
	a.stopLanes(a.load)
	a.load = nil
	return nil
}

// abandonLoad rolls back what the lanes hold and closes them; a restart
// loads it again.
func (a *applier) abandonLoad() {
	if a.load != nil {
		a.stopLanes(a.load)
		a.load = nil
	}
}

// stopLanes closes the lanes: each drops what waits for it and rolls back
// what it has not committed.
func (a *applier) stopLanes(p *parallelLoad) {
	close(p.quit)
	for _, l := range p.lanes {
		if l == nil {
			continue
		}
		close(l.steps)
		<-l.exited
		_ = l.conn.Close(context.Background())
	}
}

// errLanesWait: the lanes wait on each other, which PostgreSQL cannot see.
var errLanesWait = errors.New("the two snapshot load lanes wait on each other: a row of this group holds a DR unique index entry " +
	"that the group before it also writes (a DR unique index the source lacks?); loading again from the last group committed")

// waitForPrevious waits until the group before this lane's has committed.
// That group's lane may itself wait on a row lock this lane's transaction
// holds (rows that clash in a DR unique index): then this lane gives up
// its group, and the load goes on from what committed.
func waitForPrevious(ctx context.Context, conn *pgconn.PgConn, l *lane, prev *loadGroup) error {
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-prev.done:
			if prev.err != nil {
				return errBehindFailed
			}
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
			res := conn.ExecParams(ctx, `SELECT $1::int = ANY (pg_blocking_pids($2::int))`,
				[][]byte{[]byte(strconv.FormatUint(uint64(l.pid), 10)), []byte(strconv.FormatUint(uint64(prev.lane.pid), 10))}, nil, nil, nil).Read()
			if res.Err != nil {
				return fmt.Errorf("check the snapshot load lanes for a wait on each other: %w", res.Err)
			}
			if len(res.Rows) == 1 && string(res.Rows[0][0]) == "t" {
				return errLanesWait
			}
		}
	}
}

// runLane loads the steps handed to a lane, until they are closed.
func (a *applier) runLane(ctx context.Context, l *lane) {
	defer close(l.exited)
	conn := l.conn.PgConn()
	open, ok := false, false
	var failed *loadGroup // its steps are skipped
	abort := func(g *loadGroup, err error) {
		if open {
			_ = conn.Exec(context.Background(), "ROLLBACK").Close()
			open = false
		}
		failed = g
		g.finish(err)
	}
	var held *loadStep // read by the last COPY, not part of it: the next step
	for {
		var st loadStep
		if held != nil {
			st, held = *held, nil
		} else if st, ok = <-l.steps; !ok {
			break
		}
		g := st.group
		if g == failed {
			continue
		}
		select {
		case <-l.quit:
			abort(g, errBehindFailed)
			continue
		default:
		}
		if !open {
			if err := conn.Exec(ctx, "BEGIN").Close(); err != nil {
				abort(g, fmt.Errorf("begin a snapshot load transaction: %w", err))
				continue
			}
			open = true
		}
		if !st.end {
			if len(st.data) == 0 {
				continue
			}
			feed := &copyFeed{ctx: ctx, lane: l, first: st, data: st.data, key: relationKey(st.rel), rows: st.rows, last: st.seq,
				isolateThrough: a.isolateThrough}
			err := a.copyFrom(ctx, conn, st.seq, feed.chunks, st.rel, feed, st.binary, func() uint64 { return feed.rows })
			held = feed.held
			if err != nil {
				abort(g, err)
				continue
			}
			a.metrics.snapshotRows.Add(float64(feed.rows))
			continue
		}
		if st.prev != nil {
			if err := waitForPrevious(ctx, conn, l, st.prev); err != nil {
				abort(g, err)
				continue
			}
		}
		if _, err := conn.ExecParams(ctx, savePositionSQL, g.pos.params(a.cfg.Group), nil, nil, nil).Close(); err != nil {
			abort(g, fmt.Errorf("save position: %w", err))
			continue
		}
		err := conn.Exec(ctx, "COMMIT").Close()
		open = false
		if err != nil {
			err = fmt.Errorf("commit snapshot rows: %w", err)
		}
		g.finish(err)
	}
	if open {
		_ = conn.Exec(context.Background(), "ROLLBACK").Close()
	}
}

// copyFeed reads the chunks a lane has in a row for one table of one
// group, in one format, as one COPY: each COPY statement costs DR about
// what loading a thousand rows does (a slot per buffered row, a fresh
// bulk-write ring of shared buffers), and chunks hold a few thousand.
// The first step of anything else is held for the lane. Chunks up to
// isolateThrough load one COPY each, so that a failure names exactly the
// chunk that failed (applier.isolateThrough).
type copyFeed struct {
	ctx            context.Context
	lane           *lane
	first          loadStep
	key            string // relationKey of first.rel
	isolateThrough uint64
	data           []byte // of the chunk being read
	rows           uint64 // of the chunks read
	last           uint64 // the last chunk's message
	held           *loadStep
}

func (f *copyFeed) Read(p []byte) (int, error) {
	for len(f.data) == 0 {
		if f.held != nil {
			return 0, io.EOF
		}
		var st loadStep
		var ok bool
		select {
		case st, ok = <-f.lane.steps:
		case <-f.lane.quit:
			return 0, errBehindFailed
		case <-f.ctx.Done():
			return 0, f.ctx.Err()
		}
		if !ok {
			return 0, io.EOF
		}
		if st.end || st.group != f.first.group || st.binary != f.first.binary || relationKey(st.rel) != f.key ||
			f.first.seq <= f.isolateThrough || st.seq <= f.isolateThrough {
			f.held = &st
			return 0, io.EOF
		}
		f.data, f.rows, f.last = st.data, f.rows+st.rows, st.seq
	}
	n := copy(p, f.data)
	f.data = f.data[n:]
	return n, nil
}

// chunks names the messages read.
func (f *copyFeed) chunks() string {
	if f.last == f.first.seq {
		return fmt.Sprintf("message %d", f.first.seq)
	}
	return fmt.Sprintf("messages %d to %d", f.first.seq, f.last)
}

// olderThanSource refuses binary COPY rows from a source of a newer major
// version than DR (server_version as DR reports it; the source's
// server_version_num): its binary forms may read otherwise on DR, where
// text input would have refused what DR cannot hold.
func olderThanSource(drVersion string, source uint32) error {
	digits := drVersion[:len(drVersion)-len(strings.TrimLeft(drVersion, "0123456789"))]
	dr, err := strconv.Atoi(digits)
	if err != nil {
		return fmt.Errorf("binary COPY rows from PostgreSQL %d, and DR's version %q does not say its own: re-seed with the agent's --snapshot-binary=false", source/10000, drVersion)
	}
	if uint32(dr) < source/10000 {
		return fmt.Errorf("binary COPY rows from PostgreSQL %d, and DR runs PostgreSQL %d, which may read them otherwise: "+
			"upgrade DR to %d or later, or re-seed with the agent's --snapshot-binary=false", source/10000, dr, source/10000)
	}
	return nil
}
