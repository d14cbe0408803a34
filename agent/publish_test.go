package agent

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/haven-dr/haven/internal/natstest"
	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// TestAChunkTooLargeForAMessage: a chunk over max_payload is stored as an
// object that its message names; publishing it again stores nothing new;
// and a restarted agent reads the stream's tail through the object, so it
// knows the transaction is in the stream.
func TestAChunkTooLargeForAMessage(t *testing.T) {
	ctx := t.Context()
	js := natstest.New(t).JetStream(t)
	cfg := DefaultConfig()
	cfg.Group = "big"
	stream, err := ensureStream(ctx, js, cfg)
	if err != nil {
		t.Fatal(err)
	}
	p := &publisher{js: js, stream: wire.StreamName(cfg.Group), maxPayload: 64 << 10, objects: objectStoreConfig(cfg.Group, stream.CachedInfo().Config)}
	s := &session{cfg: cfg, info: sourceInfo{systemID: 42}, publisher: p, stream: stream}
	chunk := &havenpb.Chunk{FormatVersion: wire.FormatVersion, Kind: havenpb.Kind_KIND_TRANSACTION, Group: cfg.Group, SystemId: 42, Slot: wire.SlotName(cfg.Group),
		CommitLsn: 0x5000, LastChunk: true, SchemaSql: strings.Repeat("a large value ", 10000)}
	msgID := wire.TransactionMsgID(42, wire.SlotName(cfg.Group), 0x5000, 0)
	publish := func() []*jetstream.ObjectInfo {
		t.Helper()
		f, _, err := p.publish(ctx, wire.TransactionSubject(cfg.Group), msgID, "", chunk)
		if err != nil {
			t.Fatal(err)
		}
		if err := waitAck(ctx, f); err != nil {
			t.Fatal(err)
		}
		store, err := js.ObjectStore(ctx, wire.ObjectBucket(cfg.Group))
		if err != nil {
			t.Fatal(err)
		}
		objects, err := store.List(ctx)
		if err != nil || len(objects) != 1 {
			t.Fatalf("%d objects (%v), want the chunk's one", len(objects), err)
		}
		return objects
	}
	objects := publish()
	if again := publish(); again[0].NUID != objects[0].NUID {
		t.Errorf("publishing the chunk again wrote its object again")
	}
	msg, err := stream.GetLastMsgForSubject(ctx, wire.TransactionSubject(cfg.Group))
	if err != nil {
		t.Fatal(err)
	}
	if len(msg.Data) != 0 || msg.Header.Get(wire.HeaderObject) != objects[0].Name {
		t.Errorf("the message holds %d bytes and names %q, want none and the object %q", len(msg.Data), msg.Header.Get(wire.HeaderObject), objects[0].Name)
	}
	tail, err := s.readTail(ctx)
	if err != nil || tail.commitLSN != 0x5000 || !tail.last || tail.msgID != msgID {
		t.Errorf("tail %+v (%v), want the transaction at 0/5000, complete, with its message id", tail, err)
	}
}

// TestARefusedPublishSaysWhatToDo: a publish JetStream refuses for want of
// room says where room is made; other failures are only wrapped.
func TestARefusedPublishSaysWhatToDo(t *testing.T) {
	full := notAcknowledged("crm-1", fmt.Errorf("publish: %w", &jetstream.APIError{Code: 503, ErrorCode: 10023, Description: "insufficient resources"}))
	if !strings.Contains(full.Error(), "max_file_store") {
		t.Errorf("%v does not say what to do", full)
	}
	var apiErr *jetstream.APIError
	if !errors.As(full, &apiErr) {
		t.Errorf("%v does not wrap JetStream's error", full)
	}
	if other := notAcknowledged("crm-1", errors.New("timeout")); strings.Contains(other.Error(), "max_file_store") {
		t.Errorf("%v blames the server's room", other)
	}
}
