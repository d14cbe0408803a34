package wire

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/haven-dr/haven/internal/natstest"
)

// TestPayloadReadsObjects: a message's own payload passes through; one
// that names an object is read from the group's bucket; a missing bucket
// or object, or a message that names one and carries data, is corrupt; and
// a reader that does not look objects up refuses the message instead of
// taking its empty data for a chunk.
func TestPayloadReadsObjects(t *testing.T) {
	ctx := t.Context()
	js := natstest.New(t).JetStream(t)
	own := nats.Header{}
	own.Set(HeaderEncoding, EncodingProtoS2)
	if enc, data, err := Payload(ctx, js, "crm", own, []byte("rows")); err != nil || enc != EncodingProtoS2 || string(data) != "rows" {
		t.Errorf("a message's own payload: %q, %q, %v", enc, data, err)
	}

	named := nats.Header{}
	named.Set(HeaderEncoding, ObjectEncoding(EncodingProtoZstd))
	named.Set(HeaderObject, "7/haven_crm/1A/0")
	corrupt := func(what string, data []byte, says string) {
		t.Helper()
		_, _, err := Payload(ctx, js, "crm", named, data)
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), says) {
			t.Errorf("%s: %v, want a corrupt message saying %q", what, err, says)
		}
	}
	corrupt("no bucket", nil, "does not exist")
	store, err := js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: ObjectBucket("crm")})
	if err != nil {
		t.Fatal(err)
	}
	corrupt("no object", nil, "is gone")
	payload := bytes.Repeat([]byte{0xA5}, 3<<20)
	if _, err := store.PutBytes(ctx, "7/haven_crm/1A/0", payload); err != nil {
		t.Fatal(err)
	}
	enc, data, err := Payload(ctx, js, "crm", named, nil)
	if err != nil || enc != EncodingProtoZstd || !bytes.Equal(data, payload) {
		t.Errorf("a stored payload: encoding %q, %d bytes, %v; want %q and the %d bytes stored", enc, len(data), err, EncodingProtoZstd, len(payload))
	}
	corrupt("an object and data", []byte("x"), "does not name its object alone")

	if _, err := Decode(named.Get(HeaderEncoding), FormatHeader(), nil); !errors.Is(err, ErrUnsupported) {
		t.Errorf("decoding a message that names an object without reading it: %v, want %v", err, ErrUnsupported)
	}
}
