// Package opshttp serves what every haven process exposes to operators and
// their tooling: /healthz (200 while the process does its job, 503 with the
// reason otherwise), Prometheus /metrics, and Go's profiles under
// /debug/pprof/ (CPU, heap, goroutines) for a performance question.
package opshttp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Serve listens on addr until ctx ends. healthy reports nil when the process
// is well. It returns once the listener is up, with the address it bound
// (useful with port 0) and a channel that yields the server's final error.
func Serve(ctx context.Context, addr string, gatherer prometheus.Gatherer, healthy func() error) (string, <-chan error, error) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		if err := healthy(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", nil, fmt.Errorf("listen on %s for /healthz and /metrics: %w", addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan error, 1)
	go func() {
		err := srv.Serve(ln)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		done <- err
	}()
	go func() {
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdownCtx)
	}()
	return ln.Addr().String(), done, nil
}

// Health is what a process reports on /healthz: nothing while it does its
// job, else the problem that keeps it from it. Safe for concurrent use.
type Health struct{ problem atomic.Pointer[string] }

// Set records the problem; an empty one means healthy.
func (h *Health) Set(problem string) {
	if problem == "" {
		h.problem.Store(nil)
		return
	}
	h.problem.Store(&problem)
}

// Err returns the problem, or nil.
func (h *Health) Err() error {
	if p := h.problem.Load(); p != nil {
		return errors.New(*p)
	}
	return nil
}
