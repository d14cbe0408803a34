package agent

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sys/unix"
)

// A snapshot table's COPY arrives as a stream of 8 KiB sends (PostgreSQL's
// output buffer), and read as it arrives, each send woke the agent: 1 GB
// cost it 2.5 to 2.9 CPU-seconds, most of them the Go runtime parking and
// waking its threads around each read, CPU the source's and DR's backends
// needed on a busy machine. Read in bulk, the kernel wakes the agent once
// bulkLowWater bytes are there (SO_RCVLOWAT), and each read takes up to
// bulkReadBuffer: 0.5 to 0.8 CPU-seconds for the same gigabyte, and no
// slower.
const (
	bulkLowWater   = 256 << 10
	bulkReadBuffer = 256 << 10
	// bulkPatience bounds how long fewer than bulkLowWater bytes wait to
	// be read: the last of a COPY, or a source that sends slowly.
	bulkPatience = 2 * time.Millisecond
)

// bulkDial makes a connection's TCP socket one that startBulkReads can
// switch to bulk reads.
func bulkDial(config *pgx.ConnConfig) {
	dial := config.DialFunc
	config.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := dial(ctx, network, addr)
		if tcp, ok := conn.(*net.TCPConn); ok && err == nil {
			return &bulkConn{TCPConn: tcp}, nil
		}
		return conn, err // a Unix socket: reads stay as they are
	}
}

// startBulkReads switches conn (connected with bulkDial) to bulk reads, for
// the rest of its life: what it reads next is a bulk transfer. A
// connection over a Unix socket, where SO_RCVLOWAT does not delay a
// reader's wakeup, stays as it is.
func startBulkReads(conn *pgx.Conn) error {
	if c := bulkOf(conn); c != nil {
		return c.startBulk()
	}
	return nil
}

// bulkOf is conn's bulkConn, under TLS or not; nil without one.
func bulkOf(conn *pgx.Conn) *bulkConn {
	switch nc := conn.PgConn().Conn().(type) {
	case *bulkConn:
		return nc
	case *tls.Conn:
		c, _ := nc.NetConn().(*bulkConn)
		return c
	}
	return nil
}

// bulkConn is a TCP connection whose reads can be made bulk reads. pgconn
// sets its deadlines to interrupt a read when a context ends; a bulk read
// sets its own, shorter one, and keeps to theirs.
type bulkConn struct {
	*net.TCPConn
	// buffered is set by startBulkReads; pgconn may have a read in
	// flight in its background reader then.
	buffered atomic.Pointer[bufio.Reader]

	mu     sync.Mutex
	theirs time.Time // read deadline set by the connection's user
}

func (c *bulkConn) Read(p []byte) (int, error) {
	if b := c.buffered.Load(); b != nil {
		return b.Read(p)
	}
	return c.TCPConn.Read(p)
}

func (c *bulkConn) SetDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.theirs = t
	return c.TCPConn.SetDeadline(t)
}

func (c *bulkConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.theirs = t
	return c.TCPConn.SetReadDeadline(t)
}

func (c *bulkConn) startBulk() error {
	raw, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("bulk reads: %w", err)
	}
	if ctlErr := raw.Control(func(fd uintptr) {
		err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVLOWAT, bulkLowWater)
	}); ctlErr != nil {
		err = ctlErr
	}
	if err != nil {
		return fmt.Errorf("bulk reads: set SO_RCVLOWAT: %w", err)
	}
	c.buffered.Store(bufio.NewReaderSize(patientReader{c}, bulkReadBuffer))
	return nil
}

// patientReader reads a bulkConn's socket, waiting at most bulkPatience
// for bulkLowWater bytes before it takes what is there.
type patientReader struct{ c *bulkConn }

func (r patientReader) Read(p []byte) (int, error) {
	c := r.c
	for {
		c.mu.Lock()
		deadline := time.Now().Add(bulkPatience)
		if !c.theirs.IsZero() && c.theirs.Before(deadline) {
			deadline = c.theirs
		}
		err := c.TCPConn.SetReadDeadline(deadline)
		c.mu.Unlock()
		if err != nil {
			return 0, err
		}
		n, err := c.TCPConn.Read(p)
		if n > 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			return n, err
		}
		c.mu.Lock()
		theirs := c.theirs
		c.mu.Unlock()
		if !theirs.IsZero() && !time.Now().Before(theirs) {
			return n, err // their deadline, not the patience's
		}
		// Patience is up: the next read takes whatever has arrived, and
		// waits again if nothing has.
	}
}
