package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// ensureStream creates the group's stream when it is missing and checks that
// an existing one binds the group's subjects.
func ensureStream(ctx context.Context, js jetstream.JetStream, cfg Config) (jetstream.Stream, error) {
	name := wire.StreamName(cfg.Group)
	stream, err := wire.LookupStream(ctx, js, cfg.Group)
	if err == nil {
		info := stream.CachedInfo()
		want := wire.SubjectPrefix(cfg.Group) + ">"
		for _, s := range info.Config.Subjects {
			if s == want {
				return stream, nil
			}
		}
		return nil, needsOperator("stream %s exists but does not bind subject %s (it binds %v): delete it or give this group another name", name, want, info.Config.Subjects)
	}
	if !errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, err
	}
	discard := jetstream.DiscardOld
	if cfg.StreamMaxBytes > 0 {
		// A full stream must refuse new changes (the slot then keeps them on
		// the primary), not drop old ones a standby may still need.
		discard = jetstream.DiscardNew
	}
	duplicates := cfg.DuplicateWindow
	if cfg.StreamMaxAge > 0 && duplicates > cfg.StreamMaxAge {
		// JetStream requires it; exactly-once does not depend on it.
		duplicates = cfg.StreamMaxAge
	}
	stream, err = js.CreateStream(ctx, jetstream.StreamConfig{
		Name:        name,
		Description: "haven changes of group " + cfg.Group,
		Subjects:    []string{wire.SubjectPrefix(cfg.Group) + ">"},
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.StreamReplicas,
		Retention:   jetstream.LimitsPolicy,
		MaxAge:      cfg.StreamMaxAge,
		MaxBytes:    orUnlimited(cfg.StreamMaxBytes),
		Discard:     discard,
		Duplicates:  duplicates,
	})
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		// JetStream refused the configuration: retrying does not help.
		return nil, needsOperator("create stream %s: %v: check the --stream-* flags and the JetStream server's limits", name, err)
	}
	if err != nil {
		return nil, fmt.Errorf("create stream %s: %w", name, err)
	}
	return stream, nil
}

func orUnlimited(n int64) int64 {
	if n <= 0 {
		return -1
	}
	return n
}

// publisher frames chunks and publishes them asynchronously; the caller owns
// the returned futures and decides what is confirmed.
type publisher struct {
	js         jetstream.JetStream
	stream     string
	compress   bool
	maxPayload int64
	// objects is the bucket for payloads too large for a message (see
	// wire.ObjectEncoding), opened (or made) when the first one comes.
	objects   jetstream.ObjectStoreConfig
	objectsMu sync.Mutex
	store     jetstream.ObjectStore
}

// messageRoom is what a message's subject and headers may take of
// max_payload besides its payload.
const messageRoom = 4 << 10

// objectStoreConfig is the bucket of a group's payloads too large for a
// message, made like the group's stream as it exists (whatever the flags of
// this run): replicated and placed alike, bounded by the same size, and
// kept a minute longer than its messages (an object is stored just before
// the message that names it).
func objectStoreConfig(group string, stream jetstream.StreamConfig) jetstream.ObjectStoreConfig {
	ttl := stream.MaxAge
	if ttl > 0 {
		ttl += time.Minute
	}
	return jetstream.ObjectStoreConfig{Bucket: wire.ObjectBucket(group), Description: "haven: payloads of group " + group + " too large for a message",
		TTL: ttl, MaxBytes: stream.MaxBytes, Storage: stream.Storage, Replicas: stream.Replicas, Placement: stream.Placement}
}

// publish sends one chunk. With expectLast set, JetStream stores it only if
// the stream's last message is that one. The error is immediate (encoding,
// size, a closed connection); the acknowledgement arrives on the future.
func (p *publisher) publish(ctx context.Context, subject, msgID, expectLast string, c *havenpb.Chunk) (jetstream.PubAckFuture, int, error) {
	codec := wire.Plain
	switch {
	case p.compress:
		codec = wire.Zstd
	case c.Kind == havenpb.Kind_KIND_SNAPSHOT_COPY || c.Kind == havenpb.Kind_KIND_SNAPSHOT_COPY_BINARY:
		// Snapshot rows: s2 costs the agent less than the broker saves
		// by writing and sending fewer bytes (see wire.S2).
		codec = wire.S2
	}
	payload, encoding, err := wire.Encode(c, codec)
	if errors.Is(err, wire.ErrTooLarge) {
		return nil, 0, needsOperator("chunk %s: %v: a single row is larger than haven carries; keep rows under 64 MiB", msgID, err)
	}
	if err != nil {
		return nil, 0, err
	}
	msg := &nats.Msg{Subject: subject, Data: payload, Header: nats.Header{}}
	if int64(len(payload)) > p.maxPayload-messageRoom {
		// A row larger than a message may be: its chunk goes to the
		// group's object store first, and the message names it.
		name := wire.ObjectName(msgID, payload)
		if err := p.putObject(ctx, name, payload); err != nil {
			return nil, 0, err
		}
		msg.Data = nil
		msg.Header.Set(wire.HeaderObject, name)
		encoding = wire.ObjectEncoding(encoding)
	}
	msg.Header.Set(wire.HeaderEncoding, encoding)
	msg.Header.Set(wire.HeaderFormat, wire.FormatHeader())
	opts := []jetstream.PublishOpt{jetstream.WithMsgID(msgID), jetstream.WithExpectStream(p.stream)}
	if expectLast != "" {
		opts = append(opts, jetstream.WithExpectLastMsgID(expectLast))
	}
	future, err := p.js.PublishMsgAsync(msg, opts...)
	if err != nil {
		return nil, 0, fmt.Errorf("publish %s: %w", msgID, err)
	}
	return future, len(payload), nil
}

// putObject stores a chunk's payload as the object name, unless it is
// there already (the chunk published before the agent restarted): a
// name means one content (wire.ObjectName), and a reader may be reading
// it. Failures are retried with the session: a JetStream cluster short of
// a server for a moment is no reason to stop.
func (p *publisher) putObject(ctx context.Context, name string, payload []byte) error {
	store, err := p.objectStore(ctx)
	if err != nil {
		return err
	}
	_, err = store.GetInfo(ctx, name)
	if err == nil {
		return nil
	}
	if !errors.Is(err, jetstream.ErrObjectNotFound) {
		return fmt.Errorf("look up object %s in %s: %w", name, p.objects.Bucket, err)
	}
	if _, err := store.PutBytes(ctx, name, payload); err != nil {
		return fmt.Errorf("store chunk %s (%d bytes, larger than a message) in object store %s: %w", name, len(payload), p.objects.Bucket, err)
	}
	return nil
}

// objectStore opens the group's bucket, or makes it.
func (p *publisher) objectStore(ctx context.Context) (jetstream.ObjectStore, error) {
	p.objectsMu.Lock()
	defer p.objectsMu.Unlock()
	if p.store != nil {
		return p.store, nil
	}
	store, err := p.js.ObjectStore(ctx, p.objects.Bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		store, err = p.js.CreateObjectStore(ctx, p.objects)
		if errors.Is(err, jetstream.ErrBucketExists) {
			store, err = p.js.ObjectStore(ctx, p.objects.Bucket)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("open object store %s for rows larger than a message: %w", p.objects.Bucket, err)
	}
	p.store = store
	return store, nil
}

// waitAck waits for one publish to be acknowledged.
func waitAck(ctx context.Context, f jetstream.PubAckFuture) error {
	select {
	case <-f.Ok():
		return nil
	case err := <-f.Err():
		return notAcknowledged(f.Msg().Header.Get(jetstream.MsgIDHeader), err)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// notAcknowledged is the error of a publish JetStream refused, saying what
// to do when it has no room for it.
func notAcknowledged(what string, err error) error {
	var apiErr *jetstream.APIError
	// The server's codes for insufficient resources, the account's limits,
	// memory and storage exceeded.
	if errors.As(err, &apiErr) && slices.Contains([]jetstream.ErrorCode{10023, 10002, 10028, 10047}, apiErr.ErrorCode) {
		return fmt.Errorf("JetStream did not acknowledge %s: it has no room for it: raise the server's max_file_store (or the account's "+
			"JetStream limits) or free space where it stores; changes wait in the slot on the primary meanwhile "+
			"(haven_agent_slot_retained_wal_bytes), and capture resumes by itself: %w", what, err)
	}
	return fmt.Errorf("JetStream did not acknowledge %s: %w", what, err)
}
