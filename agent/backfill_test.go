package agent

import (
	"testing"

	"github.com/haven-dr/haven/proto/havenpb"
)

func TestSnapshotVisibility(t *testing.T) {
	snap, err := parseSnapshot("100:110:102,105")
	if err != nil {
		t.Fatal(err)
	}
	for xid, want := range map[uint32]bool{99: true, 100: true, 101: true, 102: false, 105: false, 109: true, 110: false, 111: false} {
		if got := snap.sees(xid); got != want {
			t.Errorf("xid %d: sees %v, want %v", xid, got, want)
		}
	}
	// Across wraparound: 64-bit ids past 2^32, compared modulo 2^32.
	wrapped, err := parseSnapshot("4294967290:4294967300:4294967298")
	if err != nil {
		t.Fatal(err)
	}
	for xid, want := range map[uint32]bool{4294967280: true, 1: true, 2: false, 3: true, 4: false} {
		if got := wrapped.sees(xid); got != want {
			t.Errorf("wrapped xid %d: sees %v, want %v", xid, got, want)
		}
	}
	for _, bad := range []string{"", "1:2", "a:2:", "1:2:x"} {
		if _, err := parseSnapshot(bad); err == nil {
			t.Errorf("parseSnapshot(%q) accepted it", bad)
		}
	}
}

func TestChunkQueryUsesTheKey(t *testing.T) {
	rel := &havenpb.Relation{Schema: "public", Name: "t", Columns: []*havenpb.Column{
		{Name: "tenant", Type: "text", Key: true}, {Name: "id", Type: "bigint", Key: true}, {Name: "v", Type: "jsonb"}}}
	tbl := table{schema: "public", name: "t"}
	row := &havenpb.Row{Values: []*havenpb.Datum{
		{Kind: havenpb.DatumKind_DATUM_TEXT, Text: []byte("o'brien")}, {Kind: havenpb.DatumKind_DATUM_TEXT, Text: []byte("7")}, {Kind: havenpb.DatumKind_DATUM_NULL}}}
	// The key in its index's order, not the table's.
	bk := backfillKey{Columns: []string{"id", "tenant"}, Types: []string{"bigint", "text"}}
	key, ok := keyText(rel, bk.Columns, row)
	if !ok {
		t.Fatal("keyText: no key")
	}
	for _, c := range []struct {
		name, after, until string
		retry              []string
		want               string
	}{
		{"first", "", "", nil, `COPY (SELECT "tenant", "id", "v" FROM ONLY "public"."t" ORDER BY "id", "tenant" LIMIT 50) TO STDOUT`},
		{"next", key, "", nil, `COPY (SELECT "tenant", "id", "v" FROM ONLY "public"."t" WHERE ("id", "tenant") > ('7'::bigint, 'o''brien'::text) ORDER BY "id", "tenant" LIMIT 50) TO STDOUT`},
		{"bounded", key, "9\x00z\x00", nil, `COPY (SELECT "tenant", "id", "v" FROM ONLY "public"."t" WHERE ("id", "tenant") > ('7'::bigint, 'o''brien'::text) AND ("id", "tenant") <= ('9'::bigint, 'z'::text) ORDER BY "id", "tenant" LIMIT 50) TO STDOUT`},
		{"retry", key, "", []string{key, "1\x00a\x00"}, `COPY (SELECT "tenant", "id", "v" FROM ONLY "public"."t" WHERE ("id", "tenant") IN (('7'::bigint, 'o''brien'::text), ('1'::bigint, 'a'::text))) TO STDOUT`},
	} {
		if got := chunkQuery(rel, bk, tbl, c.after, c.until, c.retry, 50); got != c.want {
			t.Errorf("%s:\n got %s\nwant %s", c.name, got, c.want)
		}
	}
	// An unchanged TOASTed key value gives no key: the whole table counts
	// as touched.
	row.Values[1] = &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_UNCHANGED_TOAST}
	if _, ok := keyText(rel, bk.Columns, row); ok {
		t.Error("keyText made a key without every key value")
	}
}

func TestMovedKeysKeepTheirKeyDefinition(t *testing.T) {
	moved, err := parseMoved([]byte(`{"id integer ":["7\u0000"],"code text ":["x\u0000"]}`))
	if err != nil || len(moved) != 2 || moved["id integer "][0] != "7\x00" || moved["code text "][0] != "x\x00" {
		t.Errorf("parseMoved: %v, %v", moved, err)
	}
	// Written before definitions were recorded: keys of the copy's own.
	moved, err = parseMoved([]byte(`["1\u0000","2\u0000"]`))
	if err != nil || len(moved[""]) != 2 {
		t.Errorf("parseMoved of a list: %v, %v", moved, err)
	}
	if _, err := parseMoved([]byte(`"neither"`)); err == nil {
		t.Error("parseMoved accepted a string")
	}
}
