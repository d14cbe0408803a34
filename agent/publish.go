package agent

import (
	"context"
	"errors"
	"fmt"

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
	if int64(len(payload)) > p.maxPayload {
		return nil, 0, needsOperator("chunk %s is %d bytes, more than the NATS server's max_payload (%d): a single row is larger than a message may be; raise max_payload on the NATS servers (up to 64MB) or enable --compress",
			msgID, len(payload), p.maxPayload)
	}
	msg := &nats.Msg{Subject: subject, Data: payload, Header: nats.Header{}}
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
