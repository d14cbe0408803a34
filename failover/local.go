package failover

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"sync"

	"github.com/rs/zerolog"
)

// StartLocal runs a quorum of n nodes in this process, on loopback ports,
// with their state under dir (make demo, make bench). It returns their API
// URLs and a function that stops them.
func StartLocal(ctx context.Context, n int, dir string, log zerolog.Logger) ([]string, func(), error) {
	free := func() (string, error) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", err
		}
		defer ln.Close()
		return ln.Addr().String(), nil
	}
	var raftAddrs, apiAddrs []string
	peers := map[string]string{}
	for i := range n {
		r, err := free()
		if err != nil {
			return nil, nil, err
		}
		a, err := free()
		if err != nil {
			return nil, nil, err
		}
		raftAddrs, apiAddrs = append(raftAddrs, r), append(apiAddrs, a)
		peers[fmt.Sprintf("c%d", i+1)] = r
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	stop := func() { cancel(); wg.Wait() }
	var urls []string
	for i := range n {
		cfg := DefaultConfig()
		cfg.ID, cfg.RaftAddr, cfg.APIAddr = fmt.Sprintf("c%d", i+1), raftAddrs[i], apiAddrs[i]
		cfg.DataDir, cfg.Peers = filepath.Join(dir, cfg.ID), peers
		c, err := Start(cfg, log)
		if err != nil {
			stop()
			return nil, nil, err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = c.Run(ctx)
		}()
		urls = append(urls, "http://"+apiAddrs[i])
	}
	return urls, stop, nil
}
