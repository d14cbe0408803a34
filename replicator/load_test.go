package replicator

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/haven-dr/haven/internal/natstest"
	"github.com/haven-dr/haven/internal/pgtest"
	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// TestASnapshotLoadsInLanesInStreamOrder: a snapshot of several groups
// loads on one lane, or on two connections at once. Every row arrives once
// and the stream goes on after it; a chunk DR refuses stops apply at
// exactly that chunk, with the groups before it committed, the position at
// their end, and nothing of the groups after it (loaded on the other lane,
// or behind it on the same) committed. Groups end by size, or, with
// loadGroupAge 0, by age: a chunk each.
func TestASnapshotLoadsInLanesInStreamOrder(t *testing.T) {
	restoreLoadGroup(t)
	const chunks, rowsPerChunk = 12, 50
	pg := pgtest.New(t)
	ns := natstest.New(t)
	for _, tc := range []struct {
		lanes, bad int
		byAge      bool
	}{{1, -1, false}, {1, 7, false}, {2, -1, false}, {2, 7, false}, {1, 7, true}} {
		bad := tc.bad // the chunk DR refuses (-1: none)
		group := fmt.Sprintf("lanes%d_%d", tc.lanes, bad+1)
		chunksPerGroup := 3
		if tc.byAge {
			group, chunksPerGroup = group+"_age", 1
		}
		// A subtest each: its standby stops before the next one changes
		// loadGroupBytes.
		t.Run(group, func(t *testing.T) {
			if err := pg.CreateDatabase(t.Context(), group); err != nil {
				t.Fatal(err)
			}
			f := newFeed(t, ns, group)
			f.beginSnapshot()
			var seqs []uint64
			var size int
			for i := range chunks {
				var text strings.Builder
				if i == bad {
					text.WriteString("not a number\trefused\n")
				}
				for r := range rowsPerChunk {
					fmt.Fprintf(&text, "%d\tsnapshot row\n", i*rowsPerChunk+r+1)
				}
				c := chunk(group, havenpb.Kind_KIND_SNAPSHOT_COPY, 0x1000)
				c.Relations = []*havenpb.Relation{itemsRelation}
				c.CopyText = []byte(text.String())
				c.CopyRows = uint64(strings.Count(text.String(), "\n"))
				size = max(size, text.Len())
				seqs = append(seqs, f.publish(c))
			}
			loadGroupBytes, loadGroupAge = 3*size-size/2, time.Hour // a group ends at its third chunk
			if tc.byAge {
				loadGroupBytes, loadGroupAge = 1<<30, 0
			}
			f.publish(chunk(group, havenpb.Kind_KIND_SNAPSHOT_END, 0x1000))
			f.publish(f.txn(0x2000, insert("100000", "after the snapshot")))

			// Never by a pause in the stream.
			s, _, reg := startStandby(t, pg.URL(group), ns.URL(), group, func(c *Config) { c.GroupDelay, c.SnapshotLanes = time.Hour, tc.lanes })
			if bad < 0 {
				waitFor(t, 30*time.Second, "the snapshot and the transaction after it", func() bool {
					return len(notes(t, pg.URL(group))) == chunks*rowsPerChunk+1
				})
				got := notes(t, pg.URL(group))
				for i, note := range got[:chunks*rowsPerChunk] {
					if want := strconv.Itoa(i+1) + ":snapshot row"; note != want {
						t.Fatalf("row %d is %q, want %q", i, note, want)
					}
				}
				return
			}
			waitBlockedAt(t, s, reg, seqs[bad])
			committed := bad / chunksPerGroup * chunksPerGroup // chunks of the groups before the refused one
			if got := len(notes(t, pg.URL(group))); got != committed*rowsPerChunk {
				t.Errorf("DR holds %d rows, want the %d of the %d chunks before the refused one's group", got, committed*rowsPerChunk, committed)
			}
			var at uint64
			if err := pgxQueryRow(t, pg.URL(group), `SELECT stream_seq FROM haven.apply_position WHERE group_name = $1`, group).Scan(&at); err != nil {
				t.Fatal(err)
			}
			if want := seqs[committed-1]; at != want {
				t.Errorf("position at stream message %d, want %d: the last chunk committed", at, want)
			}
		})
	}
}

// TestLanesThatWaitOnEachOtherGiveWay: rows that clash in a DR unique index
// the source lacks, one late in a large group and one in the small group
// after it, make the lanes wait on each other (the earlier group's COPY on
// the later group's row lock, the later group's commit on the earlier
// group), which PostgreSQL cannot see. The later group gives way; apply
// stops at exactly the chunk that clashes, with the group before it
// committed.
func TestLanesThatWaitOnEachOtherGiveWay(t *testing.T) {
	restoreLoadGroup(t)
	loadGroupBytes = 1 // a group per chunk
	pg := pgtest.New(t)
	ns := natstest.New(t)
	const group = "clash"
	if err := pg.CreateDatabase(t.Context(), group); err != nil {
		t.Fatal(err)
	}
	if err := pg.Exec(t.Context(), group, `CREATE TABLE items (id bigint PRIMARY KEY, note text); CREATE UNIQUE INDEX ON items (note)`); err != nil {
		t.Fatal(err)
	}
	f := newFeed(t, ns, group)
	f.beginSnapshot()
	copyChunk := func(text string) uint64 {
		c := chunk(group, havenpb.Kind_KIND_SNAPSHOT_COPY, 0x1000)
		c.Relations = []*havenpb.Relation{itemsRelation}
		c.CopyText, c.CopyRows = []byte(text), uint64(strings.Count(text, "\n"))
		return f.publish(c)
	}
	var large strings.Builder
	for r := range 50000 {
		fmt.Fprintf(&large, "%d\tnote %d\n", r+1, r+1)
	}
	large.WriteString("999999\tsame note\n")
	copyChunk(large.String())
	clash := copyChunk("1000000\tsame note\n")
	f.publish(chunk(group, havenpb.Kind_KIND_SNAPSHOT_END, 0x1000))

	s, _, reg := startStandby(t, pg.URL(group), ns.URL(), group, func(c *Config) { c.GroupDelay, c.SnapshotLanes = time.Hour, 2 })
	waitBlockedAt(t, s, reg, clash)
	if err := s.Healthy(); err == nil || !strings.Contains(err.Error(), "duplicate key") {
		t.Errorf("health %v does not name the duplicate key", err)
	}
	if got := len(notes(t, pg.URL(group))); got != 50001 {
		t.Errorf("DR holds %d rows, want the 50001 of the group before the clashing chunk", got)
	}
}

// TestBinarySnapshotChunksLoad: rows in COPY's binary format load as they
// were sent; a chunk from a source of a newer major version than DR, and
// one of which a DR trigger drops rows, stop apply at exactly that chunk.
func TestBinarySnapshotChunksLoad(t *testing.T) {
	pg := pgtest.New(t)
	ns := natstest.New(t)
	row := func(id int64, note string) []byte {
		return wire.AppendCopyBinaryRow(nil, binary.BigEndian.AppendUint64(nil, uint64(id)), []byte(note))
	}
	for _, tc := range []struct {
		name    string
		setup   string // on DR, before the standby starts
		version uint32 // of the source, on the second chunk
		want    string // in the stop's reason; "": all rows load
		// first: in the first stop's reason, when the two chunks loaded in
		// one COPY (%d: their messages)
		first string
	}{
		{name: "loads", version: 150000},
		{name: "newer", version: 990000, want: "upgrade DR to 99 or later"},
		{name: "dropped", setup: `CREATE TABLE items (id bigint PRIMARY KEY, note text);
			CREATE FUNCTION drop_odd() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.id % 2 = 1 THEN RETURN NULL; END IF; RETURN NEW; END $$;
			CREATE TRIGGER drop_odd BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION drop_odd();
			ALTER TABLE items ENABLE ALWAYS TRIGGER drop_odd`, version: 150000, want: "DR loaded 1 rows into public.items from message 3, which hold 2",
			first: "DR loaded 3 rows into public.items from messages %d to %d, which hold 4"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			group := "binary_" + tc.name
			if err := pg.CreateDatabase(t.Context(), group); err != nil {
				t.Fatal(err)
			}
			if tc.setup != "" {
				if err := pg.Exec(t.Context(), group, tc.setup); err != nil {
					t.Fatal(err)
				}
			}
			f := newFeed(t, ns, group)
			f.beginSnapshot()
			var seqs []uint64
			for i, rows := range [][][]byte{{row(2, "two"), row(4, "")}, {row(5, "five\n\ttab \\ é"), row(6, "six")}} {
				c := chunk(group, havenpb.Kind_KIND_SNAPSHOT_COPY_BINARY, 0x1000)
				c.Relations = []*havenpb.Relation{itemsRelation}
				c.CopyBinary, c.CopyRows, c.SourceVersion = bytes.Join(rows, nil), uint64(len(rows)), 150000
				if i == 1 {
					c.SourceVersion = tc.version
				}
				seqs = append(seqs, f.publish(c))
			}
			f.publish(chunk(group, havenpb.Kind_KIND_SNAPSHOT_END, 0x1000))
			s, logs, reg := startStandby(t, pg.URL(group), ns.URL(), group)
			if tc.want == "" {
				want := []string{"2:two", "4:", "5:five\n\ttab \\ é", "6:six"}
				waitFor(t, 30*time.Second, "the binary rows", func() bool { return len(notes(t, pg.URL(group))) == len(want) })
				if got := notes(t, pg.URL(group)); !slices.Equal(got, want) {
					t.Errorf("DR holds %q, want %q", got, want)
				}
				return
			}
			waitBlockedAt(t, s, reg, seqs[1])
			if err := s.Healthy(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("health %v does not say %q", err, tc.want)
			}
			if first := fmt.Sprintf(tc.first, seqs[0], seqs[1]); tc.first != "" && logs.Count(first) == 0 {
				t.Errorf("the log does not say %q: the two chunks did not load in one COPY first", first)
			}
		})
	}
}

func TestOlderThanSource(t *testing.T) {
	for _, tc := range []struct {
		dr     string
		source uint32
		ok     bool
	}{
		{"15.18 (Debian 15.18-0+deb12u1)", 150018, true},
		{"16.4", 150018, true},
		{"17beta1", 170000, true},
		{"15.2", 160001, false},
		{"", 150000, false},
	} {
		if err := olderThanSource(tc.dr, tc.source); (err == nil) != tc.ok {
			t.Errorf("DR %q, source %d: %v", tc.dr, tc.source, err)
		}
	}
}

// restoreLoadGroup sets loadGroupBytes and loadGroupAge back when the test is over,
// after the standbys it started have stopped (cleanups run last first),
// not while one still reads it.
func restoreLoadGroup(t *testing.T) {
	n, age := loadGroupBytes, loadGroupAge
	t.Cleanup(func() { loadGroupBytes, loadGroupAge = n, age })
}
