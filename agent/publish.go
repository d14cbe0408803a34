package agent

import (
	"context"
	"errors"
	"fmt"
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
	// wire.ObjectEncoding), made when the first one comes.
	objects   jetstream.ObjectStoreConfig
	objectsMu sync.Mutex
	store     jetstream.ObjectStore
}

// messageRoom is what a message's subject and headers may take of
// max_payload besides its payload.
const messageRoom = 4 << 10

// objectStoreConfig is the bucket of a group's payloads too large for a
// message: bounded and aged like the stream, whose messages name them (an
// object, stored just before its message, is kept a minute longer).
func objectStoreConfig(cfg Config) jetstream.ObjectStoreConfig {
	ttl := cfg.StreamMaxAge
	if ttl > 0 {
		ttl += time.Minute
	}
	return jetstream.ObjectStoreConfig{Bucket: wire.ObjectBucket(cfg.Group), Description: "haven: payloads of group " + cfg.Group + " too large for a message",
		TTL: ttl, MaxBytes: orUnlimited(cfg.StreamMaxBytes), Storage: jetstream.FileStorage, Replicas: cfg.StreamReplicas}
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
		if err := p.putObject(ctx, msgID, payload); err != nil {
			return nil, 0, err
		}
		msg.Data = nil
		msg.Header.Set(wire.HeaderObject, msgID)
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

// putObject stores a chunk's payload as the object named msgID. The same
// chunk published again (the agent restarted) replaces it with the same
// bytes.
func (p *publisher) putObject(ctx context.Context, msgID string, payload []byte) error {
	p.objectsMu.Lock()
	if p.store == nil {
		store, err := p.js.CreateOrUpdateObjectStore(ctx, p.objects)
		if err != nil {
			p.objectsMu.Unlock()
			var apiErr *jetstream.APIError
			if errors.As(err, &apiErr) {
				return needsOperator("create object store %s for rows larger than a message: %v: check the JetStream server's limits", p.objects.Bucket, err)
			}
			return fmt.Errorf("create object store %s: %w", p.objects.Bucket, err)
		}
		p.store = store
	}
	store := p.store
	p.objectsMu.Unlock()
	if _, err := store.PutBytes(ctx, msgID, payload); err != nil {
		return fmt.Errorf("store chunk %s (%d bytes, larger than a message) in object store %s: %w", msgID, len(payload), p.objects.Bucket, err)
	}
	return nil
}

// waitAck waits for one publish to be acknowledged.
func waitAck(ctx context.Context, f jetstream.PubAckFuture) error {
	select {
	case <-f.Ok():
		return nil
	case err := <-f.Err():
		return fmt.Errorf("JetStream did not acknowledge %s: %w", f.Msg().Header.Get(jetstream.MsgIDHeader), err)
	case <-ctx.Done():
		return ctx.Err()
	}
}
