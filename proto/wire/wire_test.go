package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/haven-dr/haven/proto/havenpb"
)

func textDatum(s string) *havenpb.Datum {
	return &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT, Text: []byte(s)}
}

func nullDatum() *havenpb.Datum { return &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_NULL} }

func toastDatum() *havenpb.Datum {
	return &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_UNCHANGED_TOAST}
}

func row(values ...*havenpb.Datum) *havenpb.Row { return &havenpb.Row{Values: values} }

// sampleChunk is a transaction chunk that uses every part of the format:
// two relations, every operation, and NULL, unchanged-TOAST, empty, non-UTF-8
// and ordinary text values.
func sampleChunk() *havenpb.Chunk {
	customers := &havenpb.Relation{
		Id: 16390, Schema: "public", Name: "customers", ReplicaIdentity: "d",
		Columns: []*havenpb.Column{
			{Name: "id", Type: "bigint", TypeOid: 20, TypeModifier: -1, Key: true, NotNull: true},
			{Name: "name", Type: "text", TypeOid: 25, TypeModifier: -1},
			{Name: "notes", Type: "text", TypeOid: 25, TypeModifier: -1},
			{Name: "balance", Type: "numeric(12,2)", TypeOid: 1700, TypeModifier: 786438},
		},
	}
	events := &havenpb.Relation{
		Id: 4294967295, Schema: `Odd "Schema"`, Name: "Event Log", ReplicaIdentity: "f",
		Columns: []*havenpb.Column{
			{Name: "at", Type: "timestamp with time zone", TypeOid: 1184, TypeModifier: -1, Key: true},
			{Name: "payload", Type: "bytea", TypeOid: 17, TypeModifier: -1, Key: true},
		},
	}
	return &havenpb.Chunk{
		FormatVersion: FormatVersion,
		Kind:          havenpb.Kind_KIND_TRANSACTION,
		SystemId:      7312345678901234567,
		Group:         "crm",
		Slot:          "haven_crm",
		Epoch:         3,
		Xid:           4294967290,
		CommitLsn:     0x16B3748,
		CommitTimeUs:  1735689600123456,
		ChunkIndex:    2,
		LastChunk:     true,
		Relations:     []*havenpb.Relation{customers, events},
		Changes: []*havenpb.Change{
			{Op: havenpb.Op_OP_INSERT, RelationId: customers.Id,
				New: row(textDatum("1"), textDatum("Zoë"), nullDatum(), textDatum("12.50"))},
			{Op: havenpb.Op_OP_INSERT, RelationId: customers.Id,
				New: row(textDatum("2"), textDatum(""), &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT, Text: []byte{0xff, 0xfe, 0x00, 0x80}}, nullDatum())},
			// Key unchanged: no old row; the TOASTed notes were not sent.
			{Op: havenpb.Op_OP_UPDATE, RelationId: customers.Id,
				New: row(textDatum("1"), textDatum("Zoe"), toastDatum(), textDatum("13.00"))},
			// Key changed: the old row carries the key, other columns NULL.
			{Op: havenpb.Op_OP_UPDATE, RelationId: customers.Id,
				Old: row(textDatum("2"), nullDatum(), nullDatum(), nullDatum()),
				New: row(textDatum("3"), textDatum("x"), toastDatum(), nullDatum())},
			{Op: havenpb.Op_OP_DELETE, RelationId: events.Id,
				Old: row(textDatum("2025-01-01 00:00:00+00"), textDatum(`\x00ff`))},
			{Op: havenpb.Op_OP_TRUNCATE, TruncateRelationIds: []uint32{customers.Id, events.Id},
				TruncateCascade: true, TruncateRestartIdentity: true},
		},
		Heartbeat: &havenpb.Heartbeat{EmittedAtUs: 1735689600000000, WalLsn: 0x16B3700},
	}
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	big := sampleChunk()
	for i := range 500 {
		big.Changes = append(big.Changes, &havenpb.Change{Op: havenpb.Op_OP_INSERT, RelationId: 16390,
			New: row(textDatum(strings.Repeat("9", i%19+1)), textDatum(strings.Repeat("name ", i%50)), nullDatum(), textDatum("0.00"))})
	}
	tests := []struct {
		name  string
		chunk *havenpb.Chunk
	}{
		{"transaction", sampleChunk()},
		{"large transaction", big},
		{"snapshot begin", &havenpb.Chunk{FormatVersion: FormatVersion, Kind: havenpb.Kind_KIND_SNAPSHOT_BEGIN,
			SystemId: 1, Group: "crm", SnapshotLsn: 42, CommitLsn: 42, Relations: sampleChunk().Relations}},
		{"binary COPY rows", binaryCopyChunk(2, binaryRow([]byte{0, 0, 0, 0, 0, 0, 0, 1}, []byte("a"), nil, []byte{0, 0, 0, 0, 0, 0, 0, 0}),
			binaryRow([]byte{0, 0, 0, 0, 0, 0, 0, 2}, []byte{}, []byte("\x00\xff"), []byte{0, 0, 0, 0, 0, 0, 0, 0}))},
		{"snapshot end without changes", &havenpb.Chunk{FormatVersion: FormatVersion, Kind: havenpb.Kind_KIND_SNAPSHOT_END,
			SystemId: 1, Group: "crm", SnapshotLsn: 42, CommitLsn: 42}},
	}
	for _, tt := range tests {
		for codec, want := range codecs {
			t.Run(tt.name+"/"+want, func(t *testing.T) {
				payload, encoding, err := Encode(tt.chunk, codec)
				if err != nil {
					t.Fatalf("Encode: %v", err)
				}
				if encoding != want {
					t.Fatalf("encoding = %q, want %q", encoding, want)
				}
				for _, format := range []string{FormatHeader(), ""} {
					got, err := Decode(encoding, format, payload)
					if err != nil {
						t.Fatalf("Decode(format %q): %v", format, err)
					}
					if !proto.Equal(got, tt.chunk) {
						t.Fatalf("Decode(format %q) = %v, want %v", format, got, tt.chunk)
					}
				}
			})
		}
	}
}

// proto.Equal does not tell an empty text from a missing one; the apply side
// must, so check the datum kinds survive explicitly.
func TestDecodeKeepsValueKinds(t *testing.T) {
	for codec := range codecs {
		payload, encoding, err := Encode(sampleChunk(), codec)
		if err != nil {
			t.Fatal(err)
		}
		got, err := Decode(encoding, FormatHeader(), payload)
		if err != nil {
			t.Fatal(err)
		}
		second := got.Changes[1].New.Values
		if k := second[1].Kind; k != havenpb.DatumKind_DATUM_TEXT || len(second[1].Text) != 0 {
			t.Errorf("empty text decoded as %v %q", k, second[1].Text)
		}
		if !bytes.Equal(second[2].Text, []byte{0xff, 0xfe, 0x00, 0x80}) {
			t.Errorf("non-UTF-8 text decoded as %q", second[2].Text)
		}
		if k := second[3].Kind; k != havenpb.DatumKind_DATUM_NULL {
			t.Errorf("NULL decoded as %v", k)
		}
		if k := got.Changes[2].New.Values[2].Kind; k != havenpb.DatumKind_DATUM_UNCHANGED_TOAST {
			t.Errorf("unchanged TOAST decoded as %v", k)
		}
		if got.Changes[2].Old != nil {
			t.Errorf("absent old row decoded as %v", got.Changes[2].Old)
		}
	}
}

// binaryRow is a row in COPY's binary format; a nil field is NULL.
func binaryRow(fields ...[]byte) []byte { return AppendCopyBinaryRow(nil, fields...) }

// binaryCopyChunk is a binary COPY chunk of sampleChunk's first relation
// that says it holds rows rows.
func binaryCopyChunk(rows uint64, data ...[]byte) *havenpb.Chunk {
	return &havenpb.Chunk{FormatVersion: FormatVersion, Kind: havenpb.Kind_KIND_SNAPSHOT_COPY_BINARY, SystemId: 1, Group: "crm",
		SnapshotLsn: 42, CommitLsn: 42, Relations: sampleChunk().Relations[:1], CopyBinary: bytes.Join(data, nil), CopyRows: rows, SourceVersion: 150018}
}

// ScanCopyBinary is fed a stream in pieces by the agent: whatever the cut,
// it reports the whole rows before it, and the trailer once it has it.
func TestScanCopyBinaryStopsAtPartialRows(t *testing.T) {
	rows := [][]byte{binaryRow([]byte("12345678"), nil, []byte("longer text"), []byte{}), binaryRow(nil, nil, nil, nil), binaryRow([]byte("1"), []byte("2"), []byte("3"), []byte("4"))}
	stream := append(bytes.Join(rows, nil), CopyBinaryTrailer...)
	for cut := range len(stream) + 1 {
		n, count, ended, err := ScanCopyBinary(stream[:cut], 4)
		if err != nil {
			t.Fatalf("cut at %d: %v", cut, err)
		}
		wantN, wantRows := 0, 0
		for _, r := range rows {
			if wantN+len(r) > cut {
				break
			}
			wantN += len(r)
			wantRows++
		}
		if n != wantN || count != wantRows || ended != (cut == len(stream)) {
			t.Errorf("cut at %d: %d bytes, %d rows, ended %v; want %d, %d, %v", cut, n, count, ended, wantN, wantRows, cut == len(stream))
		}
	}
}

// A Decoder decodes as Decode does, and hands out the same description of
// a table again; descriptions do not share the payload's memory.
func TestDecoderSharesDescriptions(t *testing.T) {
	var d Decoder
	var first *havenpb.Chunk
	for i := range 3 {
		c := sampleChunk()
		c.Xid += uint32(i)
		payload, encoding, err := Encode(c, Plain)
		if err != nil {
			t.Fatal(err)
		}
		got, err := d.Decode(encoding, FormatHeader(), payload)
		if err != nil {
			t.Fatal(err)
		}
		want, err := Decode(encoding, FormatHeader(), bytes.Clone(payload))
		if err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(got, want) {
			t.Fatalf("Decoder.Decode = %v, want %v", got, want)
		}
		clear(payload)
		if got.Relations[1].Name != "Event Log" || got.Xid != c.Xid {
			t.Fatalf("decoded chunk changed with its payload: relation %q, xid %d", got.Relations[1].Name, got.Xid)
		}
		if first == nil {
			first = got
			continue
		}
		for j, r := range got.Relations {
			if r != first.Relations[j] {
				t.Errorf("chunk %d: description of %s decoded again", i, r.Name)
			}
		}
	}
}

// A chunk a reader would refuse to decode is refused when encoded, under
// every codec: s2 would squeeze it under max_payload.
func TestEncodeRefusesWhatNoReaderDecodes(t *testing.T) {
	c := binaryCopyChunk(1, binaryRow(nil, make([]byte, maxDecodedSize), nil, nil))
	for codec, name := range codecs {
		if _, _, err := Encode(c, codec); !errors.Is(err, ErrTooLarge) {
			t.Errorf("%s: Encode of a %d-byte chunk: %v, want %v", name, c.SizeVT(), err, ErrTooLarge)
		}
	}
}

// codecs and the encodings they name.
var codecs = map[Codec]string{Plain: EncodingProto, Zstd: EncodingProtoZstd, S2: EncodingProtoS2}

func TestHeaders(t *testing.T) {
	if FormatHeader() != "1" {
		t.Errorf("FormatHeader() = %q, want %q", FormatHeader(), "1")
	}
	if HeaderEncoding != "Haven-Encoding" || HeaderFormat != "Haven-Format" {
		t.Errorf("header names changed: %q %q", HeaderEncoding, HeaderFormat)
	}
}

func marshalChunk(t *testing.T, c *havenpb.Chunk) []byte {
	t.Helper()
	raw, err := proto.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func TestDecodeRejects(t *testing.T) {
	valid := marshalChunk(t, sampleChunk())
	compressed, _, err := Encode(sampleChunk(), Zstd)
	if err != nil {
		t.Fatal(err)
	}
	fast, _, err := Encode(sampleChunk(), S2)
	if err != nil {
		t.Fatal(err)
	}
	mutated := func(mutate func(c *havenpb.Chunk)) []byte {
		c := sampleChunk()
		mutate(c)
		return marshalChunk(t, c)
	}
	oneRow := binaryRow(nil, []byte("x"), nil, nil)
	flipped := bytes.Clone(compressed)
	for i := len(flipped) / 3; i < len(flipped)*2/3; i++ {
		flipped[i] ^= 0x5a
	}
	fastFlipped := bytes.Clone(fast)
	for i := len(fastFlipped) / 3; i < len(fastFlipped)*2/3; i++ {
		fastFlipped[i] ^= 0x5a
	}

	tests := []struct {
		name     string
		encoding string
		format   string
		payload  []byte
		want     error  // nil: ErrCorrupt or ErrUnsupported
		hint     string // the message must contain it
	}{
		{name: "unknown encoding", encoding: "proto+lz4", format: "1", payload: valid, want: ErrUnsupported, hint: "proto+lz4"},
		{name: "empty encoding", encoding: "", format: "1", payload: valid, want: ErrCorrupt, hint: HeaderEncoding},
		{name: "format header 2", encoding: EncodingProto, format: "2", payload: valid, want: ErrUnsupported, hint: "upgrade haven"},
		{name: "format header 01", encoding: EncodingProto, format: "01", payload: valid, want: ErrUnsupported, hint: "upgrade haven"},
		{name: "format version 2 in payload", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.FormatVersion = 2 }), want: ErrUnsupported, hint: "upgrade haven"},
		{name: "format version 2 in payload without header", encoding: EncodingProto, format: "",
			payload: mutated(func(c *havenpb.Chunk) { c.FormatVersion = 2 }), want: ErrUnsupported, hint: "upgrade haven"},
		{name: "format version 0 in payload", encoding: EncodingProto, format: "",
			payload: mutated(func(c *havenpb.Chunk) { c.FormatVersion = 0 })},
		{name: "COPY chunk with changes", encoding: EncodingProto, format: "1", want: ErrCorrupt, hint: "one relation and no changes",
			payload: mutated(func(c *havenpb.Chunk) {
				c.Kind, c.Relations, c.CopyText, c.CopyRows = havenpb.Kind_KIND_SNAPSHOT_COPY, c.Relations[:1], []byte("1\tx\n"), 1
			})},
		{name: "COPY chunk cut inside a row", encoding: EncodingProto, format: "1", want: ErrCorrupt, hint: "whole row",
			payload: mutated(func(c *havenpb.Chunk) {
				c.Kind, c.Relations, c.Changes, c.CopyText, c.CopyRows = havenpb.Kind_KIND_SNAPSHOT_COPY, c.Relations[:1], nil, []byte("1\tx\n2\t"), 1
			})},
		{name: "COPY chunk with another row count", encoding: EncodingProto, format: "1", want: ErrCorrupt, hint: "holds 2 rows, says 3",
			payload: mutated(func(c *havenpb.Chunk) {
				c.Kind, c.Relations, c.Changes, c.CopyText, c.CopyRows = havenpb.Kind_KIND_SNAPSHOT_COPY, c.Relations[:1], nil, []byte("1\tx\n2\ty\n"), 3
			})},
		{name: "binary COPY row with another field count", encoding: EncodingProto, format: "1", want: ErrCorrupt, hint: "3 fields, the table has 4",
			payload: marshalChunk(t, binaryCopyChunk(2, oneRow, binaryRow(nil, nil, nil)))},
		{name: "binary COPY chunk cut inside a row", encoding: EncodingProto, format: "1", want: ErrCorrupt, hint: "whole row",
			payload: marshalChunk(t, binaryCopyChunk(2, oneRow, oneRow[:len(oneRow)-1]))},
		{name: "binary COPY chunk with the trailer", encoding: EncodingProto, format: "1", want: ErrCorrupt, hint: "trailer",
			payload: marshalChunk(t, binaryCopyChunk(1, oneRow, CopyBinaryTrailer))},
		{name: "binary COPY field of negative length", encoding: EncodingProto, format: "1", want: ErrCorrupt, hint: "field length -2",
			payload: marshalChunk(t, binaryCopyChunk(1, append(bytes.Clone(oneRow[:2]), 0xff, 0xff, 0xff, 0xfe)))},
		{name: "binary COPY chunk without the source's version", encoding: EncodingProto, format: "1", want: ErrCorrupt, hint: "version",
			payload: marshalChunk(t, func() *havenpb.Chunk {
				c := binaryCopyChunk(1, oneRow)
				c.SourceVersion = 0
				return c
			}())},
		{name: "binary COPY chunk with another row count", encoding: EncodingProto, format: "1", want: ErrCorrupt, hint: "holds 2 rows, says 3",
			payload: marshalChunk(t, binaryCopyChunk(3, oneRow, oneRow))},
		{name: "binary COPY of a type not built in", encoding: EncodingProto, format: "1", want: ErrCorrupt, hint: "may not travel in binary",
			payload: marshalChunk(t, func() *havenpb.Chunk {
				c := binaryCopyChunk(1, oneRow)
				c.Relations[0].Columns[1].Type, c.Relations[0].Columns[1].TypeOid = "mood", 16384
				return c
			}())},
		{name: "binary COPY of an information_schema type", encoding: EncodingProto, format: "1", want: ErrCorrupt, hint: "may not travel in binary",
			payload: marshalChunk(t, func() *havenpb.Chunk {
				c := binaryCopyChunk(1, oneRow)
				c.Relations[0].Columns[1].Type, c.Relations[0].Columns[1].TypeOid = "information_schema.sql_identifier", 13194
				return c
			}())},
		{name: "binary COPY of regclass", encoding: EncodingProto, format: "1", want: ErrCorrupt, hint: "may not travel in binary",
			payload: marshalChunk(t, func() *havenpb.Chunk {
				c := binaryCopyChunk(1, oneRow)
				c.Relations[0].Columns[1].Type, c.Relations[0].Columns[1].TypeOid = "regclass[]", 2210
				return c
			}())},
		{name: "unknown kind", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Kind = 99 }), want: ErrUnsupported},
		{name: "unspecified kind", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Kind = havenpb.Kind_KIND_UNSPECIFIED }), want: ErrUnsupported},
		{name: "garbage", encoding: EncodingProto, format: "1", payload: []byte{0xff, 0xff, 0xff, 0xff, 0x0f}, want: ErrCorrupt},
		{name: "text", encoding: EncodingProto, format: "1", payload: []byte("hello, world"), want: ErrCorrupt},
		// Empty proto decodes as format version 0; either sentinel is fair.
		{name: "empty payload", encoding: EncodingProto, format: "1", payload: nil},
		{name: "truncated", encoding: EncodingProto, format: "1", payload: valid[:len(valid)-3], want: ErrCorrupt},
		{name: "missing group", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Group = "" }), want: ErrCorrupt},
		{name: "missing system id", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.SystemId = 0 }), want: ErrCorrupt},
		{name: "relation without columns", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Relations[1].Columns = nil }), want: ErrCorrupt},
		{name: "relation without name", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Relations[0].Name = "" }), want: ErrCorrupt},
		{name: "column without type", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Relations[0].Columns[2].Type = "" }), want: ErrCorrupt},
		{name: "change of undescribed relation", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Changes[0].RelationId = 1 }), want: ErrCorrupt, hint: "undescribed relation 1"},
		{name: "truncate of undescribed relation", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Changes[5].TruncateRelationIds = []uint32{16390, 5} }), want: ErrCorrupt, hint: "relation 5"},
		{name: "truncate without relations", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Changes[5].TruncateRelationIds = nil }), want: ErrCorrupt},
		{name: "row with too few values", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Changes[0].New.Values = c.Changes[0].New.Values[:3] }), want: ErrCorrupt, hint: "3 values"},
		{name: "row with too many values", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) {
				c.Changes[4].Old.Values = append(c.Changes[4].Old.Values, textDatum("extra"))
			}), want: ErrCorrupt},
		{name: "old row with too few values", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Changes[3].Old.Values = c.Changes[3].Old.Values[:1] }), want: ErrCorrupt},
		{name: "unchanged TOAST in old row", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Changes[3].Old.Values[1] = toastDatum() }), want: ErrCorrupt, hint: "TOAST"},
		{name: "unchanged TOAST in deleted row", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Changes[4].Old.Values[0] = toastDatum() }), want: ErrCorrupt, hint: "TOAST"},
		{name: "unspecified value kind", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Changes[0].New.Values[1] = &havenpb.Datum{Text: []byte("x")} }), want: ErrCorrupt},
		{name: "unspecified value kind in old row", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Changes[4].Old.Values[1].Kind = havenpb.DatumKind_DATUM_UNSPECIFIED }), want: ErrCorrupt},
		{name: "unknown value kind", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Changes[0].New.Values[1].Kind = 17 }), want: ErrCorrupt},
		{name: "insert without new row", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Changes[0].New = nil }), want: ErrCorrupt},
		{name: "update without new row", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Changes[3].New = nil }), want: ErrCorrupt},
		{name: "delete without old row", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Changes[4].Old = nil }), want: ErrCorrupt},
		{name: "unspecified op", encoding: EncodingProto, format: "1",
			payload: mutated(func(c *havenpb.Chunk) { c.Changes[0].Op = havenpb.Op_OP_UNSPECIFIED }), want: ErrCorrupt},
		{name: "corrupt zstd", encoding: EncodingProtoZstd, format: "1", payload: flipped, want: ErrCorrupt, hint: "zstd"},
		{name: "truncated zstd", encoding: EncodingProtoZstd, format: "1", payload: compressed[:len(compressed)-5], want: ErrCorrupt, hint: "zstd"},
		{name: "plain proto as zstd", encoding: EncodingProtoZstd, format: "1", payload: valid, want: ErrCorrupt, hint: "zstd"},
		{name: "zstd as plain proto", encoding: EncodingProto, format: "1", payload: compressed, want: ErrCorrupt},
		{name: "corrupt s2", encoding: EncodingProtoS2, format: "1", payload: fastFlipped, want: ErrCorrupt, hint: "s2"},
		{name: "truncated s2", encoding: EncodingProtoS2, format: "1", payload: fast[:len(fast)-5], want: ErrCorrupt, hint: "s2"},
		{name: "zstd as s2", encoding: EncodingProtoS2, format: "1", payload: compressed, want: ErrCorrupt, hint: "s2"},
		{name: "s2 over the size bound", encoding: EncodingProtoS2, format: "1", payload: binary.AppendUvarint(nil, maxDecodedSize+1), want: ErrCorrupt, hint: "more than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Decode(tt.encoding, tt.format, tt.payload)
			if err == nil {
				t.Fatalf("Decode succeeded: %v", c)
			}
			if c != nil {
				t.Errorf("Decode returned a chunk with error %v", err)
			}
			switch {
			case tt.want == nil:
				if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrUnsupported) {
					t.Errorf("Decode error %q is neither %q nor %q", err, ErrCorrupt, ErrUnsupported)
				}
			case !errors.Is(err, tt.want):
				t.Errorf("Decode error %q is not %q", err, tt.want)
			case errors.Is(err, otherSentinel(tt.want)):
				t.Errorf("Decode error %q is also %q", err, otherSentinel(tt.want))
			}
			if tt.hint != "" && !strings.Contains(err.Error(), tt.hint) {
				t.Errorf("Decode error %q does not mention %q", err, tt.hint)
			}
		})
	}
}

func otherSentinel(err error) error {
	if err == ErrCorrupt {
		return ErrUnsupported
	}
	return ErrCorrupt
}

// A small compressed payload must not make the reader allocate without limit.
func TestDecodeRejectsOversizedZstd(t *testing.T) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	// EncodeAll records the content size in the frame header.
	withSize := enc.EncodeAll(make([]byte, maxDecodedSize+1), nil)

	// A streaming encoder does not know the size up front; many small
	// frames, each within the bound, add up past it.
	var streamed bytes.Buffer
	w, err := zstd.NewWriter(&streamed, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	frames := bytes.Repeat(streamed.Bytes(), maxDecodedSize>>20+1)

	for name, payload := range map[string][]byte{"content size in header": withSize, "concatenated frames": frames} {
		t.Run(name, func(t *testing.T) {
			t.Logf("%d compressed bytes", len(payload))
			c, err := Decode(EncodingProtoZstd, FormatHeader(), payload)
			if err == nil {
				t.Fatalf("Decode of more than %d decompressed bytes succeeded: %v", maxDecodedSize, c)
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("Decode error %q is not %q", err, ErrCorrupt)
			}
		})
	}
}

func TestValidateAcceptsEncodedChunks(t *testing.T) {
	if err := Validate(sampleChunk()); err != nil {
		t.Fatalf("Validate(sample): %v", err)
	}
	// Only an update can leave a TOASTed value out: in an insert's new row
	// the marker would load an empty value.
	c := sampleChunk()
	c.Changes[0].New.Values[2] = toastDatum()
	if c.Changes[0].Op != havenpb.Op_OP_INSERT {
		t.Fatalf("sample change 0 is %s, want an insert", c.Changes[0].Op)
	}
	if err := Validate(c); !errors.Is(err, ErrCorrupt) {
		t.Errorf("Validate(unchanged TOAST in an insert) = %v, want %v", err, ErrCorrupt)
	}
}

func TestValidateGroup(t *testing.T) {
	tests := []struct {
		group string
		ok    bool
	}{
		{"crm", true},
		{"a_1", true},
		{"a", true},
		{"a" + strings.Repeat("b", 39), true},
		{"", false},
		{"Crm", false},
		{"1a", false},
		{"_a", false},
		{"a.b", false},
		{"a b", false},
		{"a-b", false},
		{"a>", false},
		{"a*", false},
		{"crm\n", false},
		{"é", false},
		{"a" + strings.Repeat("b", 40), false},
	}
	for _, tt := range tests {
		err := ValidateGroup(tt.group)
		if tt.ok && err != nil {
			t.Errorf("ValidateGroup(%q) = %v, want nil", tt.group, err)
		}
		if !tt.ok {
			if err == nil {
				t.Errorf("ValidateGroup(%q) = nil, want an error", tt.group)
			} else if !strings.Contains(err.Error(), "lower-case") {
				t.Errorf("ValidateGroup(%q) = %q: does not say what a group may hold", tt.group, err)
			}
		}
	}
}

// The names are part of the deployed state (streams, consumers, message
// ids used for deduplication): changing them breaks upgrades, so they are
// pinned here.
func TestNamesAreStable(t *testing.T) {
	tests := []struct{ got, want string }{
		{StreamName("crm"), "HAVEN_CRM"},
		{StreamName("a_1"), "HAVEN_A_1"},
		{ConsumerName("crm", "1a2b3c4d"), "standby_crm_1a2b3c4d"},
		{SubjectPrefix("crm"), "haven.crm."},
		{SnapshotSubject("crm"), "haven.crm.snapshot"},
		{TransactionSubject("crm"), "haven.crm.txn"},
		{TransactionMsgID(7312345678901234567, "haven_crm", 0x16B3748, 2), "7312345678901234567/haven_crm/16B3748/2"},
		{SnapshotMsgID(7, "haven_crm", 0x16B3748, 16390, 0), "7/haven_crm/snapshot/16B3748/16390/0"},
		{SnapshotMarkerMsgID(7, "haven_crm", 0x16B3748, "begin"), "7/haven_crm/snapshot/16B3748/begin"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
	for _, subject := range []string{SnapshotSubject("crm"), TransactionSubject("crm")} {
		if !strings.HasPrefix(subject, SubjectPrefix("crm")) {
			t.Errorf("subject %q is outside the stream's prefix %q", subject, SubjectPrefix("crm"))
		}
	}
}

func TestNamesAreDistinct(t *testing.T) {
	groups := []string{"crm", "crm_2", "crm2", "c", "cr", "billing", "a_1", "a1"}
	seen := map[string]string{}
	distinct := func(kind, name, from string) {
		t.Helper()
		if prev, ok := seen[kind+" "+name]; ok {
			t.Errorf("%s %q comes from both %s and %s", kind, name, prev, from)
		}
		seen[kind+" "+name] = from
	}
	for _, g := range groups {
		distinct("stream", StreamName(g), g)
		distinct("consumer", ConsumerName(g, "x"), g)
		distinct("prefix", SubjectPrefix(g), g)
		for _, other := range groups {
			if other != g && strings.HasPrefix(SnapshotSubject(g), SubjectPrefix(other)) {
				t.Errorf("subject %q of group %q falls in group %q's stream", SnapshotSubject(g), g, other)
			}
		}
	}

	// Every message id of every kind, over neighbouring inputs, is distinct.
	ids := map[string]string{}
	add := func(id, from string) {
		t.Helper()
		if prev, ok := ids[id]; ok {
			t.Errorf("message id %q comes from both %s and %s", id, prev, from)
		}
		ids[id] = from
	}
	for _, system := range []uint64{1, 11, 7312345678901234567} {
		for _, slot := range []string{"haven_crm", "haven_crm_2", "haven_1"} {
			for _, lsn := range []uint64{0, 1, 0x11, 0x16B3748, 1 << 40} {
				for _, chunk := range []uint32{0, 1, 11} {
					add(TransactionMsgID(system, slot, lsn, chunk), "txn")
					for _, table := range []uint32{1, 16390} {
						add(SnapshotMsgID(system, slot, lsn, table, chunk), "snapshot rows")
					}
				}
				for _, marker := range []string{"begin", "end"} {
					add(SnapshotMarkerMsgID(system, slot, lsn, marker), "snapshot "+marker)
				}
			}
		}
	}
	if SnapshotMarkerMsgID(1, "haven_crm", 5, "begin") == SnapshotMarkerMsgID(1, "haven_crm", 5, "end") {
		t.Error("begin and end markers share a message id")
	}
}

// A Decoder decodes row changes of the plain shape itself; whatever else a
// change holds, it decodes or refuses as the generated code does.
func TestDecoderChangesAsGenerated(t *testing.T) {
	plain, err := sampleChunk().MarshalVT()
	if err != nil {
		t.Fatal(err)
	}
	field := func(num protowire.Number, typ protowire.Type, v []byte) []byte {
		return append(protowire.AppendTag(nil, num, typ), v...)
	}
	bytesField := func(num protowire.Number, v []byte) []byte {
		return field(num, protowire.BytesType, protowire.AppendBytes(nil, v))
	}
	varint := func(num protowire.Number, v uint64) []byte {
		return field(num, protowire.VarintType, protowire.AppendVarint(nil, v))
	}
	text := func(s string) []byte {
		return bytesField(rowValuesField, slices.Concat(varint(datumKindField, 2), bytesField(datumTextField, []byte(s))))
	}
	change := func(fields ...[]byte) []byte { return bytesField(changesField, slices.Concat(fields...)) }
	insert := change(varint(changeOpField, 1), varint(changeRelationField, 16390), bytesField(changeNewField, slices.Concat(text("3"), text("x"))))
	cases := map[string][]byte{
		"plain": plain,
		"an old row twice, which merges": change(varint(changeOpField, 3), varint(changeRelationField, 16390),
			bytesField(changeOldField, text("1")), bytesField(changeOldField, text("2"))),
		"op and kind repeated, the last wins": change(varint(changeOpField, 9), varint(changeOpField, 2), varint(changeRelationField, 16390),
			bytesField(changeNewField, slices.Concat(bytesField(rowValuesField, slices.Concat(varint(datumKindField, 1), varint(datumKindField, 2))), text("")))),
		"a relation id over 32 bits":   change(varint(changeOpField, 1), varint(changeRelationField, 1<<40|16390)),
		"an empty row and empty value": change(varint(changeOpField, 1), bytesField(changeNewField, nil), bytesField(changeOldField, bytesField(rowValuesField, nil))),
		"a truncate":                   change(varint(changeOpField, 4), varint(5, 16390), varint(6, 1)),
		"an unknown change field":      change(varint(changeOpField, 1), varint(99, 7)),
		"an unknown value field":       change(varint(changeOpField, 1), bytesField(changeNewField, bytesField(rowValuesField, varint(3, 1)))),
		"a two-byte tag": change(varint(changeOpField, 1),
			bytesField(changeNewField, append([]byte{byte(rowValuesField<<3|2) | 0x80, 0x00}, protowire.AppendBytes(nil, varint(datumKindField, 1))...))),
		"a wrong wire type":     change(bytesField(changeOpField, []byte{1})),
		"a truncated value":     change(bytesField(changeNewField, []byte{byte(rowValuesField<<3 | 2), 9, 1})),
		"a truncated varint":    change(varint(changeOpField, 1), []byte{byte(changeRelationField << 3), 0x80}),
		"plain after irregular": slices.Concat(change(varint(changeOpField, 4), varint(5, 1)), insert, insert),
	}
	for name, raw := range cases {
		t.Run(name, func(t *testing.T) {
			if name != "plain" {
				raw = slices.Concat(varint(1, FormatVersion), varint(2, uint64(havenpb.Kind_KIND_TRANSACTION)), raw)
			}
			var want havenpb.Chunk
			wantErr := want.UnmarshalVTUnsafe(raw)
			var got havenpb.Chunk
			var d Decoder
			err := d.unmarshal(&got, raw)
			if (err == nil) != (wantErr == nil) || (err == nil && !proto.Equal(&got, &want)) {
				t.Fatalf("Decoder: %v, %v; generated: %v, %v", &got, err, &want, wantErr)
			}
		})
	}
}

// The Decoder's field numbers are the descriptor's.
func TestDecoderFieldNumbers(t *testing.T) {
	for _, f := range []struct {
		m    proto.Message
		name protoreflect.Name
		num  protowire.Number
	}{
		{&havenpb.Chunk{}, "relations", relationsField}, {&havenpb.Chunk{}, "changes", changesField},
		{&havenpb.Change{}, "op", changeOpField}, {&havenpb.Change{}, "relation_id", changeRelationField},
		{&havenpb.Change{}, "old", changeOldField}, {&havenpb.Change{}, "new", changeNewField},
		{&havenpb.Row{}, "values", rowValuesField},
		{&havenpb.Datum{}, "kind", datumKindField}, {&havenpb.Datum{}, "text", datumTextField},
	} {
		if n := f.m.ProtoReflect().Descriptor().Fields().ByName(f.name).Number(); n != f.num {
			t.Errorf("%s.%s is field %d, the Decoder says %d", f.m.ProtoReflect().Descriptor().Name(), f.name, n, f.num)
		}
	}
}
