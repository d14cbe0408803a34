package agent

import (
	"bytes"
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
