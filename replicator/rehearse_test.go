package replicator

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCloneRemovalTouchesOnlyClones: a promote drill deletes only a
// directory it marked as its clone, and stops only a server whose socket
// is in it.
func TestCloneRemovalTouchesOnlyClones(t *testing.T) {
	dir := t.TempDir()
	keep := filepath.Join(dir, "keep")
	if err := os.WriteFile(keep, []byte("someone's"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := removeClone("/nonexistent", dir, nil); err == nil || !strings.Contains(err.Error(), "not a promote drill's clone") {
		t.Fatalf("unmarked directory: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, cloneMarker), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o700); err != nil {
		t.Fatal(err)
	}
	pid := "4242\n/var/lib/postgresql/15/main\n1700000000\n5432\n/var/run/postgresql\n*\n"
	if err := os.WriteFile(filepath.Join(dir, "data", "postmaster.pid"), []byte(pid), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := removeClone("/nonexistent", dir, nil); err == nil || !strings.Contains(err.Error(), "not the clone's") {
		t.Fatalf("a pid file of another server: %v", err)
	}
	if _, err := os.Stat(keep); err != nil {
		t.Fatalf("refusals removed files: %v", err)
	}
	if err := os.Remove(filepath.Join(dir, "data", "postmaster.pid")); err != nil {
		t.Fatal(err)
	}
	if err := removeClone("/nonexistent", dir, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("the marked clone is still there: %v", err)
	}
}

// TestDrillDirIsChecked: --drill-dir must exist and must neither hold the
// DR data directory nor lie in it.
func TestDrillDirIsChecked(t *testing.T) {
	data := t.TempDir()
	for _, tt := range []struct {
		dir, want string
	}{
		{filepath.Join(data, "missing"), "not a directory"},
		{data, "hold one another"},
		{filepath.Dir(data), "hold one another"},
	} {
		if err := checkDrillDir(tt.dir, data, 0, nil); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("--drill-dir %s: %v, want %q", tt.dir, err, tt.want)
		}
	}
	if err := checkDrillDir(t.TempDir(), data, 0, nil); err != nil && !strings.Contains(err.Error(), "tmpfs") {
		t.Errorf("a directory of its own: %v", err)
	}
}
