package wire

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/haven-dr/haven/internal/natstest"
)

// TestLookupStreamSaysWhatIsMissing: a NATS server without JetStream is
// named as such; on one with JetStream, a missing stream stays
// jetstream.ErrStreamNotFound for the caller to explain.
func TestLookupStreamSaysWhatIsMissing(t *testing.T) {
	plain, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	go plain.Start()
	t.Cleanup(plain.Shutdown)
	if !plain.ReadyForConnections(10 * time.Second) {
		t.Fatal("NATS server without JetStream did not start")
	}
	_, err = LookupStream(t.Context(), natstest.JetStreamAt(t, plain.ClientURL()), "crm")
	if err == nil || !strings.Contains(err.Error(), "run nats-server with JetStream enabled") {
		t.Errorf("without JetStream: %v, want advice to enable it", err)
	}

	_, err = LookupStream(t.Context(), natstest.New(t).JetStream(t), "crm")
	if !errors.Is(err, jetstream.ErrStreamNotFound) || !strings.Contains(err.Error(), "HAVEN_CRM") {
		t.Errorf("missing stream: %v, want jetstream.ErrStreamNotFound naming HAVEN_CRM", err)
	}
}
