package agent

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// TestCopyChunkerCutsWholeRows: COPY's output, written in pieces that end
// anywhere, comes out as chunks of whole rows near the limit (a row longer
// than the limit), their rows counted, then an empty end chunk; each
// chunk is a valid wire message.
func TestCopyChunkerCutsWholeRows(t *testing.T) {
	var rows []string
	for i := range 300 {
		rows = append(rows, strings.Repeat("x", i%40)+"\\t"+strings.Repeat("é", i%7)+"\\n")
	}
	rows[150] = strings.Repeat("long", 2000) + "\n"
	for i, r := range rows {
		if !strings.HasSuffix(r, "\n") {
			rows[i] = r + "\n"
		}
	}
	input := []byte(strings.Join(rows, ""))

	var got []byte
	var counted, ends int
	rel := &havenpb.Relation{Id: 1, Schema: "public", Name: "t", Columns: []*havenpb.Column{{Name: "a", Type: "text"}}}
	w := &copyChunker{limit: 4096, flush: func(text []byte, n int) error {
		c := &havenpb.Chunk{FormatVersion: wire.FormatVersion, Kind: havenpb.Kind_KIND_SNAPSHOT_COPY, SystemId: 1, Group: "g",
			Relations: []*havenpb.Relation{rel}, CopyText: text, CopyRows: uint64(n)}
		if err := wire.Validate(c); err != nil {
			t.Errorf("chunk of %d bytes: %v", len(text), err)
		}
		if text == nil {
			ends++
			return nil
		}
		// At most the limit (or a longer row) and one write past it.
		longest := 0
		for _, row := range bytes.SplitAfter(text, []byte{'\n'}) {
			longest = max(longest, len(row))
		}
		if len(text) > max(4096, longest)+997 {
			t.Errorf("chunk of %d bytes holds %d rows: it should have been cut", len(text), n)
		}
		got = append(got, text...)
		counted += n
		return nil
	}}
	writeInPieces(t, w, input)
	if !bytes.Equal(got, input) || counted != len(rows) || ends != 1 {
		t.Errorf("chunks hold %d bytes and %d rows with %d ends, want %d bytes, %d rows, 1 end", len(got), counted, ends, len(input), len(rows))
	}

	w = &copyChunker{limit: 4096, flush: func([]byte, int) error { return nil }}
	if _, err := w.Write([]byte("a\nb")); err != nil {
		t.Fatal(err)
	}
	if err := w.finish(); err == nil {
		t.Error("output ending inside a row was accepted")
	}
}

// TestCopyBinaryChunkerCutsWholeRows: COPY's binary output, written in
// pieces that end anywhere (in the header too), comes out as valid chunks
// of whole rows near the limit, without header or trailer, then an empty
// end chunk.
func TestCopyBinaryChunkerCutsWholeRows(t *testing.T) {
	var rows []byte
	for i := range 300 {
		value := []byte(strings.Repeat("é", i%40))
		if i == 150 {
			value = []byte(strings.Repeat("long", 2000))
		}
		if i%9 == 0 {
			value = nil
		}
		rows = wire.AppendCopyBinaryRow(rows, binary.BigEndian.AppendUint64(nil, uint64(i)), value)
	}
	// A header with an extension area, which is skipped.
	header := append(bytes.Clone(wire.CopyBinaryHeader[:15]), 0, 0, 0, 3, 'e', 'x', 't')
	input := append(append(header, rows...), wire.CopyBinaryTrailer...)

	rel := &havenpb.Relation{Id: 1, Schema: "public", Name: "t", Columns: []*havenpb.Column{{Name: "id", Type: "bigint", TypeOid: 20}, {Name: "a", Type: "text", TypeOid: 25}}}
	var got []byte
	var counted, ends int
	w := &copyBinaryChunker{limit: 4096, columns: 2, flush: func(data []byte, n int) error {
		c := &havenpb.Chunk{FormatVersion: wire.FormatVersion, Kind: havenpb.Kind_KIND_SNAPSHOT_COPY_BINARY, SystemId: 1, Group: "g",
			Relations: []*havenpb.Relation{rel}, CopyBinary: data, CopyRows: uint64(n), SourceVersion: 150018}
		if err := wire.Validate(c); err != nil {
			t.Errorf("chunk of %d bytes: %v", len(data), err)
		}
		if data == nil {
			ends++
			return nil
		}
		if len(data) > 4096+8020+997 { // the limit, the long row, one write
			t.Errorf("chunk of %d bytes holds %d rows: it should have been cut", len(data), n)
		}
		got = append(got, data...)
		counted += n
		return nil
	}}
	writeInPieces(t, w, input)
	if !bytes.Equal(got, rows) || counted != 300 || ends != 1 {
		t.Errorf("chunks hold %d bytes and %d rows with %d ends, want %d bytes, 300 rows, 1 end", len(got), counted, ends, len(rows))
	}

	flags := bytes.Clone(input)
	flags[12] = 1 // bit 16: rows carry OIDs
	ignored := bytes.Clone(input)
	ignored[14] = 1 // bit 0: may be ignored
	w = &copyBinaryChunker{limit: 4096, columns: 2, flush: func([]byte, int) error { return nil }}
	if _, err := w.Write(ignored); err != nil {
		t.Errorf("flag bit 0 was not ignored: %v", err)
	}
	for name, tc := range map[string]struct {
		input []byte
		want  string
	}{
		"another signature":   {append([]byte("PGCOPY\n\xff\r\n\x01"), input[11:]...), "signature"},
		"text output":         {[]byte("1\tx\n"), "signature"},
		"OIDs":                {flags, "flags"},
		"no trailer":          {input[:len(input)-2], "trailer"},
		"cut inside a row":    {append(bytes.Clone(input[:len(input)-5]), wire.CopyBinaryTrailer...), "trailer"},
		"rows after trailer":  {append(bytes.Clone(input), rows[:20]...), "after its trailer"},
		"another field count": {append(append(bytes.Clone(header), 0, 3), wire.CopyBinaryTrailer...), "3 fields"},
	} {
		w := &copyBinaryChunker{limit: 4096, columns: 2, flush: func([]byte, int) error { return nil }}
		var err error
		for rest := tc.input; len(rest) > 0 && err == nil; {
			n := min(len(rest), 100)
			_, err = w.Write(rest[:n])
			rest = rest[n:]
		}
		if err == nil {
			err = w.finish()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one mentioning %q", name, err, tc.want)
		}
	}
}

// writeInPieces writes COPY output to w in pieces of up to 997 bytes that
// end anywhere, then finishes it.
func writeInPieces(t *testing.T, w copyWriter, input []byte) {
	t.Helper()
	for rest := input; len(rest) > 0; {
		n := min(len(rest), 1+len(rest)%997)
		if _, err := w.Write(rest[:n]); err != nil {
			t.Fatal(err)
		}
		rest = rest[n:]
	}
	if err := w.finish(); err != nil {
		t.Fatal(err)
	}
}
