package agent

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/haven-dr/haven/internal/pgtest"
	"github.com/haven-dr/haven/internal/testlog"
)

// A switchover stops the primary's writes only once a mark written to its
// WAL reaches the stream (confirmed) within switchoverCaptureLag; a mark
// that arrives later says capture was behind, and the next look writes a
// new one; after captureCatchUpFor writes stop regardless.
func TestSwitchoverFenceWaitsForCapture(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pg := pgtest.NewWith(t, pgtest.Options{Name: "lease", Settings: map[string]string{"wal_level": "logical"}})
	var confirmed atomic.Uint64
	k := newLeaseKeeper(Config{Group: "g", SourceURL: pg.URL("postgres")}, zerolog.New(testlog.New(t)), &confirmed)
	k.validUntil = time.Now().Add(time.Hour)
	conn, err := pgx.Connect(ctx, pg.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)

	if k.captureCaughtUp(ctx, conn) {
		t.Fatal("caught up with nothing confirmed")
	}
	first := k.leadMark
	if first == 0 {
		t.Fatal("no mark written to the WAL")
	}

	// The mark confirmed late: behind; the next look writes a new mark.
	confirmed.Store(uint64(first))
	k.leadMarkAt = time.Now().Add(-time.Second)
	if k.captureCaughtUp(ctx, conn) {
		t.Fatal("caught up with a mark confirmed a second after it was written")
	}
	if k.captureCaughtUp(ctx, conn) {
		t.Fatal("caught up with the new mark not confirmed")
	}
	if k.leadMark <= first {
		t.Fatalf("mark %s after a late one at %s: want a new, later one", k.leadMark, first)
	}

	// A mark confirmed as soon as it is written: writes may stop.
	k.leadMark = 0
	confirmed.Store(1 << 62)
	if !k.captureCaughtUp(ctx, conn) {
		t.Fatal("not caught up with its mark confirmed at once")
	}

	// Capture that never catches up holds the fence back only so long.
	k.leadMark, k.fenceAsked = 0, time.Now().Add(-captureCatchUpFor-time.Second)
	confirmed.Store(0)
	if !k.captureCaughtUp(ctx, conn) {
		t.Fatalf("still waiting for capture after %s", captureCatchUpFor)
	}
}
