package pgtest

import "testing"

// New starts a cluster with default options for the test t; see NewWith.
func New(t testing.TB) *Cluster {
	t.Helper()
	return NewWith(t, Options{})
}

// NewWith starts a cluster for the test t, named after it and logging through
// t.Logf unless o says otherwise. It fails the test if the cluster cannot
// start and destroys the cluster when the test ends.
func NewWith(t testing.TB, o Options) *Cluster {
	t.Helper()
	if o.Name == "" {
		o.Name = t.Name()
	}
	if o.Logf == nil {
		o.Logf = t.Logf
	}
	c, err := Start(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Destroy(); err != nil {
			t.Error(err)
		}
	})
	return c
}
