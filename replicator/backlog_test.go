package replicator

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/haven-dr/haven/internal/natstest"
	"github.com/haven-dr/haven/internal/pgtest"
)

// A standby far behind reads its backlog without the NATS client dropping
// anything: the pull requests must never ask for more than the client
// buffers (the server ends a batch requested with a byte limit with a
// status message of its own).
func TestReadsABacklogWithoutDroppingMessages(t *testing.T) {
	pg := pgtest.New(t)
	ns := natstest.New(t)
	const group = "backlog"
	if err := pg.CreateDatabase(t.Context(), group); err != nil {
		t.Fatal(err)
	}
	f := newFeed(t, ns, group)
	f.snapshotAndTxn()
	const txns = 3000
	for i := range txns {
		f.publish(f.txn(0x3000+uint64(i)*0x10, insert(strconv.Itoa(3+i), "backlog")))
	}
	_, logs, _ := startStandby(t, pg.URL(group), ns.URL(), group)
	waitFor(t, 60*time.Second, "the backlog on DR", func() bool { return len(notes(t, pg.URL(group))) == txns+2 })
	if n := logs.Count("slow consumer"); n > 0 {
		t.Errorf("the NATS client dropped messages %d times while the standby read its backlog", n)
	}
	if n := logs.Count("apply session ended"); n > 0 {
		t.Errorf("apply sessions ended %d times while reading the backlog", n)
	}
}

// A deposed primary rejoining as a standby does not act on the order to
// promote it was given before: once caught up it would make its database
// a primary again, at an epoch already superseded.
func TestARejoinForgetsAnEarlierPromotionOrder(t *testing.T) {
	pg := pgtest.New(t)
	const group = "rejoin"
	if err := pg.CreateDatabase(t.Context(), group); err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(t.Context(), pg.URL(group))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, _, err := loadPosition(t.Context(), conn, group); err != nil {
		t.Fatal(err)
	}
	s := &Standby{cfg: Config{Group: group}}
	s.control.promoteTo.Store(2) // promoted at epoch 2, deposed since
	s.control.promoted.Store(2)
	s.control.reseed.Store(true)
	if err := s.loadPromotion(t.Context(), conn); err != nil {
		t.Fatal(err)
	}
	if to, done := s.control.promoteTo.Load(), s.control.promoted.Load(); to > done {
		t.Errorf("after the rejoin the standby still means to promote to epoch %d (promoted: %d)", to, done)
	}
}
