package wire

import (
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/haven-dr/haven/proto/havenpb"
)

// FuzzDecode feeds arbitrary payloads to Decode under every encoding. Decode
// must never panic, and whatever it accepts must be a valid chunk that
// survives another round trip unchanged.
func FuzzDecode(f *testing.F) {
	minimal := &havenpb.Chunk{FormatVersion: FormatVersion, Kind: havenpb.Kind_KIND_SNAPSHOT_END, SystemId: 1, Group: "g"}
	rows := &havenpb.Chunk{FormatVersion: FormatVersion, Kind: havenpb.Kind_KIND_SNAPSHOT_ROWS, SystemId: 1, Group: "g",
		Relations: []*havenpb.Relation{{Id: 1, Name: "t", Columns: []*havenpb.Column{{Name: "c", Type: "text"}}}},
		Changes: []*havenpb.Change{
			{Op: havenpb.Op_OP_INSERT, RelationId: 1, New: row(textDatum("a\tb\\c"))},
			{Op: havenpb.Op_OP_INSERT, RelationId: 1, New: row(nullDatum())},
		}}
	copied := binaryCopyChunk(2, binaryRow(nil, []byte("x"), nil, []byte{1}), binaryRow([]byte{0}, nil, []byte{}, nil))
	for _, c := range []*havenpb.Chunk{sampleChunk(), minimal, rows, copied} {
		for codec := range codecs {
			payload, _, err := Encode(c, codec)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(payload)
		}
	}
	f.Add([]byte{})
	f.Add([]byte{0x08, 0x02})                   // format_version 2
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0x0f}) // bad varint
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd})       // zstd magic, nothing else
	f.Add([]byte("not a haven message"))
	f.Add([]byte("\b\x01\x10\x03\x180\"\x010\xb5\xb5\xb5\xb5\xb500000")) // a field number protowire refuses

	// A Decoder that has seen every seed's descriptions.
	var warm Decoder
	for _, c := range []*havenpb.Chunk{sampleChunk(), copied} {
		payload, encoding, err := Encode(c, Plain)
		if err == nil {
			_, err = warm.Decode(encoding, FormatHeader(), payload)
		}
		if err != nil {
			f.Fatal(err)
		}
	}

	f.Fuzz(func(t *testing.T, payload []byte) {
		for _, encoding := range codecs {
			for _, format := range []string{"", FormatHeader()} {
				c, err := Decode(encoding, format, payload)
				// A Decoder, new or warm, decodes the same.
				var fresh Decoder
				for _, d := range []*Decoder{&fresh, &warm} {
					dc, derr := d.Decode(encoding, format, payload)
					if (err == nil) != (derr == nil) || (err == nil && !proto.Equal(dc, c)) {
						t.Fatalf("Decoder.Decode(%q) = %v, %v; Decode = %v, %v", encoding, dc, derr, c, err)
					}
				}
				if err != nil {
					if c != nil {
						t.Fatalf("Decode(%q) returned a chunk with error %v", encoding, err)
					}
					continue
				}
				if err := Validate(c); err != nil {
					t.Fatalf("Decode(%q) accepted a chunk Validate rejects: %v", encoding, err)
				}
				for codec := range codecs {
					again, againEncoding, err := Encode(c, codec)
					if err != nil {
						t.Fatalf("Encode of a decoded chunk: %v", err)
					}
					back, err := Decode(againEncoding, FormatHeader(), again)
					if err != nil {
						t.Fatalf("Decode of a re-encoded chunk (%s): %v", againEncoding, err)
					}
					if !proto.Equal(back, c) {
						t.Fatalf("re-encoded chunk (%s) differs:\n got %v\nwant %v", againEncoding, back, c)
					}
				}
			}
		}
	})
}
