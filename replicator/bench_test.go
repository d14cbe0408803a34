package replicator

import (
	"testing"

	"github.com/haven-dr/haven/proto/havenpb"
)

func BenchmarkBuildStatement(b *testing.B) {
	rel := &havenpb.Relation{Id: 1, Schema: "public", Name: "contacts", ReplicaIdentity: "d", Columns: []*havenpb.Column{
		{Name: "id", Type: "bigint", Key: true}, {Name: "phone", Type: "text"}, {Name: "notes", Type: "text"}, {Name: "updated_at", Type: "timestamp with time zone"}}}
	text := func(s string) *havenpb.Datum {
		return &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT, Text: []byte(s)}
	}
	update := &havenpb.Change{Op: havenpb.Op_OP_UPDATE, RelationId: 1, New: &havenpb.Row{Values: []*havenpb.Datum{
		text("42"), text("+1-555-0000042"), {Kind: havenpb.DatumKind_DATUM_UNCHANGED_TOAST}, text("2026-11-29 12:00:00+00")}}}
	key := relationKey(rel)
	build := newBuilder()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := build.build(rel, key, false, update); err != nil {
			b.Fatal(err)
		}
	}
}
