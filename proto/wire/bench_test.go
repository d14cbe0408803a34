package wire

import (
	"testing"

	"github.com/haven-dr/haven/proto/havenpb"
)

// benchChunk is a chunk like the CRM workload's: 200 changes of a
// 7-column table.
func benchChunk() *havenpb.Chunk {
	rel := &havenpb.Relation{Id: 1, Schema: "public", Name: "contacts", ReplicaIdentity: "d"}
	for _, name := range []string{"id", "account_id", "first_name", "last_name", "email", "phone", "notes"} {
		rel.Columns = append(rel.Columns, &havenpb.Column{Name: name, Type: "text", Key: name == "id"})
	}
	c := &havenpb.Chunk{FormatVersion: FormatVersion, Kind: havenpb.Kind_KIND_TRANSACTION, SystemId: 1, Group: "crm", Slot: "haven_crm",
		Epoch: 1, CommitLsn: 1 << 24, LastChunk: true, Relations: []*havenpb.Relation{rel}}
	for i := range 200 {
		row := &havenpb.Row{}
		for range rel.Columns {
			row.Values = append(row.Values, &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT, Text: []byte("value of a CRM column " + string(rune('a'+i%26)))})
		}
		c.Changes = append(c.Changes, &havenpb.Change{Op: havenpb.Op_OP_INSERT, RelationId: 1, New: row})
	}
	return c
}

func BenchmarkEncode(b *testing.B) {
	for codec, name := range codecs {
		b.Run(name, func(b *testing.B) {
			c := benchChunk()
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := Encode(c, codec); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(c.Changes)*b.N)/b.Elapsed().Seconds(), "changes/s")
		})
	}
}

func BenchmarkDecode(b *testing.B) {
	for codec, name := range codecs {
		b.Run(name, func(b *testing.B) {
			c := benchChunk()
			payload, encoding, err := Encode(c, codec)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Decode(encoding, FormatHeader(), payload); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(c.Changes)*b.N)/b.Elapsed().Seconds(), "changes/s")
		})
	}
}

// BenchmarkDecoder is the standby's decoding: a Decoder that knows the
// chunk's table.
func BenchmarkDecoder(b *testing.B) {
	c := benchChunk()
	payload, encoding, err := Encode(c, Plain)
	if err != nil {
		b.Fatal(err)
	}
	var d Decoder
	b.ReportAllocs()
	for b.Loop() {
		if _, err := d.Decode(encoding, FormatHeader(), payload); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(len(c.Changes)*b.N)/b.Elapsed().Seconds(), "changes/s")
}
