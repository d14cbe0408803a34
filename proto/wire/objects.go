package wire

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// A chunk whose payload is too large for a message (one row over the NATS
// server's max_payload) travels as an object in the group's object store
// bucket, and its message names it: the message's encoding is
// ObjectEncoding of the payload's own, and HeaderObject holds the object's
// name (the chunk's message id and a digest of the payload, so that a name
// always means the same bytes). The message keeps its place in the stream,
// so order, positions and deduplication work as for any message. A reader
// that predates this sees an encoding it does not know and stops there
// (ErrUnsupported).
const (
	HeaderObject = "Haven-Object"
	objectPrefix = "object:"
)

// ObjectEncoding is the encoding header of a message whose payload, encoded
// as encoding, is stored as an object.
func ObjectEncoding(encoding string) string { return objectPrefix + encoding }

// ObjectBucket is the object store bucket that holds a group's payloads
// too large for a message.
func ObjectBucket(group string) string { return StreamName(group) + "_LARGE" }

// ObjectName is the name of the object that holds the payload of the chunk
// msgID.
func ObjectName(msgID string, payload []byte) string {
	sum := sha256.Sum256(payload)
	return msgID + "/" + hex.EncodeToString(sum[:16])
}

// objectLookups is how often a reader looks for an object before it calls
// it gone: a JetStream server other than the leader may answer, and be a
// moment behind.
const objectLookups = 5

// Payload returns a message's encoding and payload: the message's own, or,
// for a payload stored as an object, the object's, read from the group's
// bucket. A message that names no object, or one that is gone, is
// ErrCorrupt; one larger than a reader decodes is ErrTooLarge; any other
// error is the store's (reading again may succeed).
func Payload(ctx context.Context, js jetstream.JetStream, group string, h nats.Header, data []byte) (string, []byte, error) {
	encoding := h.Get(HeaderEncoding)
	inner, stored := strings.CutPrefix(encoding, objectPrefix)
	if !stored {
		return encoding, data, nil
	}
	name := h.Get(HeaderObject)
	if name == "" || len(data) != 0 {
		return "", nil, fmt.Errorf("%w: encoding %q, but the message does not name its object alone (%s %q, %d bytes of data)", ErrCorrupt, encoding, HeaderObject, name, len(data))
	}
	bucket := ObjectBucket(group)
	store, err := js.ObjectStore(ctx, bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return "", nil, fmt.Errorf("%w: its payload is object %q of bucket %s, which does not exist (deleted?)", ErrCorrupt, name, bucket)
	}
	if err != nil {
		return "", nil, fmt.Errorf("open object store %s: %w", bucket, err)
	}
	info, err := store.GetInfo(ctx, name)
	for lookup := 1; errors.Is(err, jetstream.ErrObjectNotFound) && lookup < objectLookups; lookup++ {
		select {
		case <-time.After(200 * time.Millisecond):
		case <-ctx.Done():
			return "", nil, ctx.Err()
		}
		info, err = store.GetInfo(ctx, name)
	}
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return "", nil, fmt.Errorf("%w: its payload is object %q of bucket %s, which is gone (deleted, or aged out before the message)", ErrCorrupt, name, bucket)
	}
	if err != nil {
		return "", nil, fmt.Errorf("read object %q of bucket %s: %w", name, bucket, err)
	}
	// Encoded, a payload may be a little larger than decoded; Decode bounds
	// the decoded size.
	if info.Size > 2*maxDecodedSize {
		return "", nil, fmt.Errorf("%w: object %q of bucket %s holds %d bytes", ErrTooLarge, name, bucket, info.Size)
	}
	// Without a deadline of its own, a read gets JetStream's default of 5 s
	// for the whole object.
	readCtx, cancel := context.WithTimeout(ctx, 30*time.Second+time.Duration(info.Size>>20)*time.Second)
	defer cancel()
	payload, err := store.GetBytes(readCtx, name)
	if errors.Is(err, jetstream.ErrDigestMismatch) {
		return "", nil, fmt.Errorf("%w: object %q of bucket %s: %v", ErrCorrupt, name, bucket, err)
	}
	if err != nil {
		return "", nil, fmt.Errorf("read object %q of bucket %s: %w", name, bucket, err)
	}
	return inner, payload, nil
}
