// Package testlog gives tests a log destination for components that log
// with zerolog from several goroutines: every line goes to the test's log
// and is kept, so the test can assert on what the component said.
package testlog

import (
	"bytes"
	"strings"
	"sync"
	"testing"
)

// Buffer is an io.Writer safe for concurrent use.
type Buffer struct {
	t   testing.TB
	mu  sync.Mutex
	buf bytes.Buffer
}

// New returns a Buffer that also writes every line to t's log.
func New(t testing.TB) *Buffer { return &Buffer{t: t} }

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.t.Log(strings.TrimSpace(string(p)))
	return b.buf.Write(p)
}

// String returns everything written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Count reports how many times s was written.
func (b *Buffer) Count(s string) int { return strings.Count(b.String(), s) }
