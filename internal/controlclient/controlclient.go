// Package controlclient is how agents and standbys reach the controller
// quorum: every node at once, the first answer wins, so that a node that
// hangs (stopped, cut off) costs no more than one that is down.
package controlclient

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/havenpb/havenpbconnect"
)

// Clients are the control API clients of a quorum's nodes.
type Clients []havenpbconnect.ControlClient

// New makes clients for the given API URLs.
func New(urls []string) Clients {
	var c Clients
	for _, url := range urls {
		c = append(c, havenpbconnect.NewControlClient(&http.Client{Timeout: 10 * time.Second}, strings.TrimRight(url, "/")))
	}
	return c
}

// CheckIn sends req to every node at once and returns the first answer;
// when none answers within timeout, it returns every node's error.
func (c Clients) CheckIn(ctx context.Context, req *havenpb.CheckInRequest, timeout time.Duration) (*havenpb.CheckInResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	type answer struct {
		resp *havenpb.CheckInResponse
		err  error
	}
	answers := make(chan answer, len(c))
	for _, cl := range c {
		go func() {
			r, err := cl.CheckIn(ctx, connect.NewRequest(req))
			if err != nil {
				answers <- answer{err: err}
				return
			}
			answers <- answer{resp: r.Msg}
		}()
	}
	var errs []error
	for range c {
		a := <-answers
		if a.err == nil {
			return a.resp, nil
		}
		errs = append(errs, a.err)
	}
	return nil, errors.Join(errs...)
}
