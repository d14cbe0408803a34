package natstest

import (
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func TestStreamSurvivesRestart(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := New(t)
	url := s.URL()

	reconnected := make(chan struct{}, 1)
	nc, err := nats.Connect(url,
		nats.MaxReconnects(-1),
		nats.ReconnectWait(20*time.Millisecond),
		nats.ReconnectHandler(func(*nats.Conn) {
			select {
			case reconnected <- struct{}{}:
			default:
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	stream, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name:     "CHANGES",
		Subjects: []string{"changes.>"},
		Storage:  jetstream.FileStorage,
	})
	if err != nil {
		t.Fatal(err)
	}
	ack, err := js.Publish(ctx, "changes.crm.contacts", []byte("insert 1"))
	if err != nil {
		t.Fatal(err)
	}

	if err := s.Restart(); err != nil {
		t.Fatal(err)
	}
	if s.URL() != url {
		t.Fatalf("URL changed across Restart: %s, then %s", url, s.URL())
	}
	select {
	case <-reconnected:
	case <-time.After(10 * time.Second):
		t.Fatal("client did not reconnect after Restart")
	}

	msg, err := stream.GetMsg(ctx, ack.Sequence)
	if err != nil {
		t.Fatalf("message %d after Restart: %v", ack.Sequence, err)
	}
	if string(msg.Data) != "insert 1" || msg.Subject != "changes.crm.contacts" {
		t.Fatalf("after Restart got %q on %s, want %q on changes.crm.contacts", msg.Data, msg.Subject, "insert 1")
	}
	ack2, err := js.Publish(ctx, "changes.crm.contacts", []byte("insert 2"))
	if err != nil {
		t.Fatalf("publish after Restart: %v", err)
	}
	if ack2.Sequence != ack.Sequence+1 {
		t.Fatalf("sequence after Restart = %d, want %d", ack2.Sequence, ack.Sequence+1)
	}
}

func TestShutdownAndRestartInAnyOrder(t *testing.T) {
	t.Parallel()
	s := New(t)
	s.Shutdown()
	s.Shutdown()
	if _, err := nats.Connect(s.URL(), nats.NoReconnect()); err == nil {
		t.Fatal("connected to a shut down server")
	}
	if err := s.Restart(); err != nil {
		t.Fatalf("Restart after Shutdown: %v", err)
	}
	nc, err := nats.Connect(s.URL())
	if err != nil {
		t.Fatalf("connect after Restart: %v", err)
	}
	nc.Close()
}

func TestStartReportsWhyItFailed(t *testing.T) {
	t.Parallel()
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	var mu sync.Mutex
	var logged []string
	_, err = Start(Options{
		StoreDir: t.TempDir(),
		Port:     taken.Addr().(*net.TCPAddr).Port,
		Logf: func(format string, args ...any) {
			mu.Lock()
			defer mu.Unlock()
			logged = append(logged, fmt.Sprintf(format, args...))
		},
	})
	if err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("Start on a taken port: err = %v, want one saying the address is in use", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.ContainsFunc(logged, func(line string) bool { return strings.Contains(line, "Starting nats-server") }) {
		t.Fatalf("server log not routed to Logf; got %q", logged)
	}
}

func TestStartNeedsStoreDir(t *testing.T) {
	if _, err := Start(Options{}); err == nil || !strings.Contains(err.Error(), "StoreDir") {
		t.Fatalf("Start without StoreDir: err = %v", err)
	}
}
