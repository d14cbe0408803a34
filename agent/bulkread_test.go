package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/haven-dr/haven/internal/pgtest"
)

// A bulk COPY reads what a plain connection reads, byte for byte, over TCP
// and over TLS; the connection then answers small queries (replies under
// the low water mark) and a context still cancels what it runs.
func TestBulkReadsOverTCPAndTLS(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	pg := pgtest.New(t)
	enableTLS(ctx, t, pg)
	const copyQuery = `COPY (SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 200000) g) TO STDOUT`
	copyHash := func(conn *pgx.Conn) ([32]byte, int64) {
		t.Helper()
		h := sha256.New()
		tag, err := conn.PgConn().CopyTo(ctx, h, copyQuery)
		if err != nil {
			t.Fatalf("COPY: %v", err)
		}
		var sum [32]byte
		copy(sum[:], h.Sum(nil))
		return sum, tag.RowsAffected()
	}
	plain, err := pgx.Connect(ctx, pg.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close(ctx)
	want, wantRows := copyHash(plain)

	for _, mode := range []string{"disable", "require"} {
		t.Run("sslmode="+mode, func(t *testing.T) {
			config, err := pgx.ParseConfig(strings.Replace(pg.URL("postgres"), "sslmode=disable", "sslmode="+mode, 1))
			if err != nil {
				t.Fatal(err)
			}
			bulkDial(config)
			conn, err := pgx.ConnectConfig(ctx, config)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			c := bulkOf(conn)
			if c == nil {
				t.Fatalf("connection over %T: no bulkConn under it", conn.PgConn().Conn())
			}
			if err := startBulkReads(conn); err != nil {
				t.Fatal(err)
			}
			if c.buffered.Load() == nil {
				t.Fatal("startBulkReads left the connection's reads as they were")
			}
			got, rows := copyHash(conn)
			if got != want || rows != wantRows {
				t.Fatalf("bulk COPY read %d rows (hash %x), a plain connection %d rows (hash %x)", rows, got, wantRows, want)
			}
			var n int
			if err := conn.QueryRow(ctx, "SELECT 41 + 1").Scan(&n); err != nil || n != 42 {
				t.Fatalf("a small query after the bulk COPY: %d, %v", n, err)
			}

			// A cancelled context ends a query that sends nothing.
			var pid uint32
			if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
				t.Fatal(err)
			}
			qctx, qcancel := context.WithCancel(ctx)
			done := make(chan error, 1)
			go func() { _, err := conn.Exec(qctx, "SELECT pg_sleep(60)"); done <- err }()
			waitFor(t, time.Minute, "the query to start", func() bool {
				var sleeping bool
				if err := plain.QueryRow(ctx, `SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1 AND query LIKE 'SELECT pg_sleep%' AND state = 'active')`,
					pid).Scan(&sleeping); err != nil {
					t.Fatal(err)
				}
				return sleeping
			})
			qcancel()
			if err := <-done; !errors.Is(err, context.Canceled) {
				t.Fatalf("cancelled query on a bulk connection: %v, want context.Canceled", err)
			}
		})
	}
}

// A bulk read takes what is there once its patience is up, however little;
// a deadline set by the connection's user still ends a read, whether set
// before or during it.
func TestBulkReadsTakeATailAndKeepDeadlines(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- conn
	}()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server := <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	defer server.Close()
	c := &bulkConn{TCPConn: client.(*net.TCPConn)}
	if err := c.startBulk(); err != nil {
		t.Fatal(err)
	}

	// The tail arrives while the read waits for it. The guard turns a
	// tail never read into a failure, not a hang.
	if err := c.SetReadDeadline(time.Now().Add(30 * time.Second)); err != nil {
		t.Fatal(err)
	}
	tail := []byte("CopyDone, CommandComplete, ReadyForQuery: far under the low water mark")
	got := make([]byte, len(tail))
	read := make(chan error, 1)
	go func() { _, err := io.ReadFull(c, got); read <- err }()
	waitFor(t, time.Minute, "the read to wait for data", func() bool {
		stacks := make([]byte, 1<<20)
		for _, g := range strings.Split(string(stacks[:runtime.Stack(stacks, true)]), "\n\n") {
			if strings.Contains(g, "[IO wait") && strings.Contains(g, "patientReader") {
				return true
			}
		}
		return false
	})
	if _, err := server.Write(tail); err != nil {
		t.Fatal(err)
	}
	if err := <-read; err != nil || string(got) != string(tail) {
		t.Fatalf("read %q, %v; want %q", got, err, tail)
	}

	if err := c.SetReadDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Read(got); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read with nothing sent and a deadline: %d bytes, %v; want the deadline's error", n, err)
	}

	if err := c.SetDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := c.Read(got); done <- err }()
	if err := c.SetDeadline(time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read interrupted by a deadline: %v", err)
	}
}

// enableTLS gives pg a self-signed certificate and turns ssl on.
func enableTLS(ctx context.Context, t *testing.T, pg *pgtest.Cluster) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.Stat(pg.Dir())
	if err != nil {
		t.Fatal(err)
	}
	owner := dir.Sys().(*syscall.Stat_t)
	for name, block := range map[string]*pem.Block{"server.crt": {Type: "CERTIFICATE", Bytes: der}, "server.key": {Type: "EC PRIVATE KEY", Bytes: keyDER}} {
		path := filepath.Join(pg.Dir(), name)
		if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(path, int(owner.Uid), int(owner.Gid)); err != nil {
			t.Fatal(err)
		}
	}
	if err := pg.Exec(ctx, "postgres", "ALTER SYSTEM SET ssl = on"); err != nil {
		t.Fatal(err)
	}
	if err := pg.Exec(ctx, "postgres", "SELECT pg_reload_conf()"); err != nil {
		t.Fatal(err)
	}
	// The postmaster rereads its configuration in its own time.
	url := strings.Replace(pg.URL("postgres"), "sslmode=disable", "sslmode=require", 1)
	waitFor(t, time.Minute, "ssl to come on", func() bool {
		conn, err := pgx.Connect(ctx, url)
		if err == nil {
			_ = conn.Close(ctx)
		}
		return err == nil
	})
}
