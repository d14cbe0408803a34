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

// BenchmarkParamEncoding: the standby's cost of sending a multi-row update
// of the CRM workload's contacts (128 rows; id, account_id and two
// timestamps of nine columns in binary) instead of leaving DR to parse
// their text.
func BenchmarkParamEncoding(b *testing.B) {
	row := [][]byte{[]byte("1234"), []byte("First1234"), []byte("Last1234"), []byte("c1234@example.com"), []byte("+1-555-0001234"),
		[]byte("seeded contact 81dc9bdb52d04dc20036dbd8313ed055"), []byte("2026-11-29 12:00:00.123456+00"), []byte("2026-11-30 21:30:52.5+00"), []byte("42")}
	oids := []uint32{int8OID, 25, 25, 25, 25, 25, timestamptzOID, timestamptzOID, int8OID}
	var params [][]byte
	var types []uint32
	for range 128 {
		params = append(params, row...)
		types = append(types, oids...)
	}
	binary := binaryParams(types)
	var e paramEncoding
	b.ReportAllocs()
	for b.Loop() {
		e.encode(params, binary)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(binary)), "ns/param")
}
