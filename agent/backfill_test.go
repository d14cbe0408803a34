package agent

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/haven-dr/haven/internal/pgtest"
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

// TestWaitsUntilATransactionIsVisible: a backfill waits for the transaction
// that began it to be visible to new snapshots, not only decoded; 32-bit
// ids are placed in the epoch of the snapshot's xmax.
func TestWaitsUntilATransactionIsVisible(t *testing.T) {
	pg := pgtest.New(t)
	conn, err := pgx.Connect(t.Context(), pg.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	writer, err := pgx.Connect(t.Context(), pg.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Close(context.Background())
	tx, err := writer.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var xid int64
	if err := tx.QueryRow(t.Context(), `SELECT txid_current()`).Scan(&xid); err != nil {
		t.Fatal(err)
	}
	// A wait cut short closes its connection.
	waiter, err := pgx.Connect(t.Context(), pg.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer waiter.Close(context.Background())
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	if err := waitVisible(ctx, waiter, uint32(xid)); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("waitVisible of a running transaction: %v, want it to wait", err)
	}
	if err := tx.Commit(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := waitVisible(t.Context(), conn, uint32(xid)); err != nil {
		t.Errorf("waitVisible of a committed transaction: %v", err)
	}
	// Past 2^32: 1, 2 and 4 are of epoch 1 (2 still running), 4294967290
	// and 10 (past xmax's 5) of epoch 0.
	for xid, want := range map[int64]bool{4294967290: true, 10: true, 1: true, 2: false, 4: true} {
		var visible bool
		if err := conn.QueryRow(t.Context(), visibleSQL, xid, "4294967297:4294967301:4294967298").Scan(&visible); err != nil {
			t.Fatal(err)
		}
		if visible != want {
			t.Errorf("xid %d in snapshot 4294967297:4294967301:4294967298: visible %v, want %v", xid, visible, want)
		}
	}
}
