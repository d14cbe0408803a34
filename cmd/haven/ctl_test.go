package main

import (
	"context"
	"errors"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/havenpb/havenpbconnect"
)

// electing answers "no leader" until it has been asked leaderAfter times.
type electing struct {
	havenpbconnect.UnimplementedControlHandler
	asked, leaderAfter atomic.Int32
}

func (e *electing) Status(context.Context, *connect.Request[havenpb.StatusRequest]) (*connect.Response[havenpb.StatusResponse], error) {
	if e.asked.Add(1) <= e.leaderAfter.Load() {
		return nil, connect.NewError(connect.CodeUnavailable, errors.New("no leader: the quorum has no majority"))
	}
	return connect.NewResponse(&havenpb.StatusResponse{}), nil
}

// haven ctl asks again while the quorum elects a leader, until --timeout;
// a node that is down is not waited for.
func TestCtlWaitsForAnElection(t *testing.T) {
	e := &electing{}
	e.leaderAfter.Store(3)
	_, handler := havenpbconnect.NewControlHandler(e)
	srv := httptest.NewServer(handler)
	defer srv.Close()
	status := func(c *ctl) error {
		_, err := call(t.Context(), c, func(ctx context.Context, cl havenpbconnect.ControlClient) (*havenpb.StatusResponse, error) {
			r, err := cl.Status(ctx, connect.NewRequest(&havenpb.StatusRequest{}))
			if err != nil {
				return nil, err
			}
			return r.Msg, nil
		})
		return err
	}
	down := "http://127.0.0.1:1"
	if err := status(&ctl{apis: []string{down, srv.URL}, timeout: 10 * time.Second}); err != nil {
		t.Fatalf("status during an election: %v", err)
	}
	if n := e.asked.Load(); n != 4 {
		t.Errorf("asked %d times, want 4 (three elections, one answer)", n)
	}

	e.asked.Store(0)
	e.leaderAfter.Store(1 << 30)
	started := time.Now()
	err := status(&ctl{apis: []string{srv.URL}, timeout: time.Second})
	if err == nil || !strings.Contains(err.Error(), "no leader") {
		t.Errorf("status with no leader for good: %v, want the nodes' answers", err)
	}
	if took := time.Since(started); took < time.Second {
		t.Errorf("gave up after %s, before --timeout (1s)", took)
	}

	started = time.Now()
	if err := status(&ctl{apis: []string{down}, timeout: 10 * time.Second}); err == nil || time.Since(started) > 5*time.Second {
		t.Errorf("a node that is down: %v, after %s: it is not waited for", err, time.Since(started))
	}
}
