// Package controlclient is how agents and standbys reach the controller
// quorum. A check-in goes to the node that answered last; when it does not
// answer quickly, to every node at once, the first answer winning, so that
// a node that hangs (stopped, cut off) costs no more than one that is down.
package controlclient

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/havenpb/havenpbconnect"
)

// hedge is how long the preferred node has before the others are asked.
const hedge = 250 * time.Millisecond

// Clients are the control API clients of a quorum's nodes.
type Clients struct {
	nodes     []havenpbconnect.ControlClient
	preferred atomic.Int32 // the node that answered last
}

// New makes clients for the given API URLs.
func New(urls []string) *Clients {
	c := &Clients{}
	for _, url := range urls {
		c.nodes = append(c.nodes, havenpbconnect.NewControlClient(&http.Client{Timeout: 10 * time.Second}, strings.TrimRight(url, "/")))
	}
	return c
}

// CheckIn sends req to the preferred node, then, after a moment without an
// answer, to every other node, and returns the first answer; when none
// answers within timeout, it returns every node's error.
func (c *Clients) CheckIn(ctx context.Context, req *havenpb.CheckInRequest, timeout time.Duration) (*havenpb.CheckInResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	type answer struct {
		node int
		resp *havenpb.CheckInResponse
		err  error
	}
	answers := make(chan answer, len(c.nodes))
	ask := func(i int) {
		r, err := c.nodes[i].CheckIn(ctx, connect.NewRequest(req))
		if err != nil {
			answers <- answer{node: i, err: err}
			return
		}
		answers <- answer{node: i, resp: r.Msg}
	}
	first := int(c.preferred.Load()) % len(c.nodes)
	go ask(first)
	asked, pending := false, 1
	askRest := func() {
		if asked {
			return
		}
		asked = true
		for i := range c.nodes {
			if i != first {
				pending++
				go ask(i)
			}
		}
	}
	timer := time.NewTimer(hedge)
	defer timer.Stop()
	var errs []error
	for pending > 0 {
		select {
		case a := <-answers:
			pending--
			if a.err == nil {
				c.preferred.Store(int32(a.node))
				return a.resp, nil
			}
			errs = append(errs, a.err)
			askRest()
		case <-timer.C:
			askRest()
		}
	}
	return nil, errors.Join(errs...)
}
