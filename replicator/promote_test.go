package replicator

import (
	"fmt"
	"testing"
)

// TestIncompleteSaysWhatDRLacks: what the standby reports to the quorum
// about its copy, from its committed position and open backfills.
func TestIncompleteSaysWhatDRLacks(t *testing.T) {
	many := map[uint32]string{}
	for i := range 12 {
		many[uint32(100+i)] = fmt.Sprintf("public.t%02d", i)
	}
	for _, c := range []struct {
		name        string
		pos         position
		backfilling map[uint32]string
		want        string
	}{
		{"fresh DR", position{}, nil, "no initial snapshot is loaded"},
		{"snapshot loading", position{snapshotLSN: 0x16B3748}, nil, "the initial snapshot at 0/16B3748 is only partly loaded"},
		{"complete", position{snapshotLSN: 0x16B3748, snapshotDone: true}, map[uint32]string{}, ""},
		{"one backfill", position{snapshotLSN: 1, snapshotDone: true}, map[uint32]string{7: "public.deals"},
			"1 table(s) joined with rows that are not all copied yet (backfill under way): public.deals"},
		{"many backfills", position{snapshotLSN: 1, snapshotDone: true}, many,
			"12 table(s) joined with rows that are not all copied yet (backfill under way): public.t00, public.t01, public.t02, public.t03, public.t04, public.t05, public.t06, public.t07, public.t08, public.t09 and 2 more"},
	} {
		a := &applier{pos: c.pos, backfilling: c.backfilling, control: &controlState{}}
		a.reportCompleteness()
		if got := *a.control.incomplete.Load(); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}
