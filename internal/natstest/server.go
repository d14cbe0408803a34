package natstest

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// readyTimeout bounds how long a server may take to accept connections.
const readyTimeout = 10 * time.Second

// Options configures a Server.
type Options struct {
	// StoreDir holds JetStream's files. Required.
	StoreDir string
	// Port is the client port on 127.0.0.1; 0 picks a free one.
	Port int
	// Logf receives the server's log lines; nil discards them.
	Logf func(format string, args ...any)
}

// Server is an embedded NATS server with JetStream. Its methods are safe for
// concurrent use.
type Server struct {
	opts Options // Port fixed to the bound port after the first start

	mu     sync.Mutex
	server *server.Server // nil after Shutdown
}

// Start starts a server and waits until it accepts connections.
func Start(opts Options) (*Server, error) {
	if opts.StoreDir == "" {
		return nil, errors.New("natstest: Options.StoreDir is required")
	}
	s := &Server{opts: opts}
	ns, err := s.start()
	if err != nil {
		return nil, err
	}
	s.server = ns
	s.opts.Port = ns.Addr().(*net.TCPAddr).Port
	return s, nil
}

// New starts a server for the test t with its store in t.TempDir(), fails the
// test if it cannot start, and shuts it down when the test ends.
func New(t testing.TB) *Server {
	t.Helper()
	s, err := Start(Options{StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Shutdown)
	return s
}

// URL is the client URL, nats://127.0.0.1:PORT. It stays the same across
// Restart.
func (s *Server) URL() string {
	return "nats://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(s.opts.Port))
}

// StoreDir is the directory of JetStream's files.
func (s *Server) StoreDir() string { return s.opts.StoreDir }

// Shutdown stops the server and returns once it is down. Shutting down a
// stopped server does nothing.
func (s *Server) Shutdown() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.shutdown()
}

// Restart shuts the server down if it runs and starts a new one on the same
// port and store directory.
func (s *Server) Restart() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.shutdown()
	ns, err := s.start()
	if err != nil {
		return fmt.Errorf("natstest: restart on port %d: %w", s.opts.Port, err)
	}
	s.server = ns
	return nil
}

func (s *Server) shutdown() {
	if s.server == nil {
		return
	}
	s.server.Shutdown()
	s.server.WaitForShutdown()
	s.server = nil
}

// start runs a server with the configured options and waits until it is
// ready, JetStream included.
func (s *Server) start() (*server.Server, error) {
	port := s.opts.Port
	if port == 0 {
		port = server.RANDOM_PORT
	}
	ns, err := server.NewServer(&server.Options{
		Host:      "127.0.0.1",
		Port:      port,
		JetStream: true,
		StoreDir:  s.opts.StoreDir,
		NoSigs:    true,
	})
	if err != nil {
		return nil, fmt.Errorf("natstest: configure server: %w", err)
	}
	// The server reports why it failed to start (port taken, store locked)
	// only through its logger, so always install one and keep the errors.
	log := &logger{logf: s.opts.Logf}
	ns.SetLogger(log, false, false)
	ns.Start()
	// Poll rather than wait the full timeout: a fatal start error (port
	// taken, store unusable) never makes the server ready.
	deadline := time.Now().Add(readyTimeout)
	for !ns.ReadyForConnections(50 * time.Millisecond) {
		if fatal := log.fatal(); fatal != "" || time.Now().After(deadline) {
			ns.Shutdown()
			ns.WaitForShutdown()
			if fatal == "" {
				fatal = "not ready after " + readyTimeout.String() + log.lastError()
			}
			return nil, fmt.Errorf("natstest: server on 127.0.0.1:%d with store %s: %s", port, s.opts.StoreDir, fatal)
		}
	}
	if !ns.JetStreamEnabled() {
		ns.Shutdown()
		ns.WaitForShutdown()
		return nil, fmt.Errorf("natstest: JetStream did not start with store %s%s", s.opts.StoreDir, log.lastError())
	}
	return ns, nil
}

// logger adapts the server's logging to a Logf function and remembers the
// last error, so that a failed start can say why.
type logger struct {
	logf func(format string, args ...any)

	mu        sync.Mutex
	lastErr   string
	lastFatal string
}

func (l *logger) Noticef(format string, v ...any) { l.log("INF", format, v) }
func (l *logger) Warnf(format string, v ...any)   { l.log("WRN", format, v) }
func (l *logger) Errorf(format string, v ...any)  { l.log("ERR", format, v) }
func (l *logger) Fatalf(format string, v ...any)  { l.log("FTL", format, v) }
func (l *logger) Debugf(format string, v ...any)  { l.log("DBG", format, v) }
func (l *logger) Tracef(format string, v ...any)  { l.log("TRC", format, v) }

func (l *logger) log(level, format string, v []any) {
	line := fmt.Sprintf(format, v...)
	if level == "ERR" || level == "FTL" {
		l.mu.Lock()
		l.lastErr = line
		if level == "FTL" {
			l.lastFatal = line
		}
		l.mu.Unlock()
	}
	if l.logf != nil {
		l.logf("nats [%s] %s", level, line)
	}
}

// fatal is the last fatal error logged, or "".
func (l *logger) fatal() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lastFatal
}

// lastError formats the last logged error for appending to a message.
func (l *logger) lastError() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lastErr == "" {
		return ""
	}
	return ": " + l.lastErr
}

// JetStream connects a client to the server for the test t (closed when the
// test ends) and returns its JetStream context.
func (s *Server) JetStream(t testing.TB) jetstream.JetStream {
	t.Helper()
	return JetStreamAt(t, s.URL())
}

// JetStreamAt is JetStream for any NATS server, one a test runs otherwise
// (without JetStream, say).
func JetStreamAt(t testing.TB, url string) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}
