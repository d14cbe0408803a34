package agent

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/haven-dr/haven/proto/havenpb"
)

func TestUnescapeCopy(t *testing.T) {
	tests := []struct {
		field string
		want  string
	}{
		{``, ``},
		{`plain`, `plain`},
		{`\b`, "\b"},
		{`\f`, "\f"},
		{`\n`, "\n"},
		{`\r`, "\r"},
		{`\t`, "\t"},
		{`\v`, "\v"},
		{`\\`, `\`},
		{`\\N`, `\N`},
		{`a\\\\b`, `a\\b`},
		{`\101`, "A"},
		{`\0`, "\x00"},
		{`\07`, "\x07"},
		{`\1234`, "S4"},    // at most three octal digits
		{`\18`, "\x018"},   // 8 is not octal
		{`\777`, "\xff"},   // PostgreSQL keeps the low 8 bits
		{`\x41`, "A"},      // hex
		{`\x4a`, "J"},      // lower-case hex
		{`\x4A`, "J"},      // upper-case hex
		{`\x4`, "\x04"},    // one hex digit
		{`\x414`, "A4"},    // at most two hex digits
		{`\x4g`, "\x04g"},  // g is not hex
		{`\xg`, "xg"},      // no hex digit: x itself
		{`\x`, "x"},        // no hex digit at the end
		{`\q`, "q"},        // unknown escape keeps the char
		{`\.`, "."},        // unknown escape keeps the char
		{`\N`, "N"},        // only a whole field \N is NULL
		{"\\\xff", "\xff"}, // escaped non-UTF-8 byte
		{"caf\xc3\xa9", "café"},
		{`a\tb\nc`, "a\tb\nc"},
	}
	for _, tt := range tests {
		got, err := unescapeCopy([]byte(tt.field))
		if err != nil {
			t.Errorf("unescapeCopy(%q): %v", tt.field, err)
			continue
		}
		if string(got) != tt.want {
			t.Errorf("unescapeCopy(%q) = %q, want %q", tt.field, got, tt.want)
		}
	}
}

func TestUnescapeCopyLoneBackslash(t *testing.T) {
	for _, field := range []string{`\`, `abc\`, `\\\`} {
		if got, err := unescapeCopy([]byte(field)); err == nil {
			t.Errorf("unescapeCopy(%q) = %q, want an error", field, got)
		}
	}
}

// The parser must not hand out slices of its own buffer.
func TestUnescapeCopyCopies(t *testing.T) {
	field := []byte("plain")
	got, err := unescapeCopy(field)
	if err != nil {
		t.Fatal(err)
	}
	field[0] = 'X'
	if string(got) != "plain" {
		t.Errorf("unescapeCopy result aliases its input: %q", got)
	}
}

type copyTestValue struct {
	null bool
	text string
}

func copyTestNull() copyTestValue         { return copyTestValue{null: true} }
func copyTestText(s string) copyTestValue { return copyTestValue{text: s} }

func copyTestCheckRow(t *testing.T, got []*havenpb.Datum, want []copyTestValue) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d values, want %d", len(got), len(want))
	}
	for i, d := range got {
		switch {
		case want[i].null && d.Kind != havenpb.DatumKind_DATUM_NULL:
			t.Errorf("value %d is %v %q, want NULL", i, d.Kind, d.Text)
		case !want[i].null && d.Kind != havenpb.DatumKind_DATUM_TEXT:
			t.Errorf("value %d is %v, want text %q", i, d.Kind, want[i].text)
		case !want[i].null && string(d.Text) != want[i].text:
			t.Errorf("value %d is %q, want %q", i, d.Text, want[i].text)
		}
	}
}

func TestParseCopyLine(t *testing.T) {
	tests := []struct {
		line    string
		columns int
		want    []copyTestValue
	}{
		{`\N`, 1, []copyTestValue{copyTestNull()}},
		{`\\N`, 1, []copyTestValue{copyTestText(`\N`)}},
		{`\Nx`, 1, []copyTestValue{copyTestText(`Nx`)}},
		{`x\N`, 1, []copyTestValue{copyTestText(`xN`)}},
		{``, 1, []copyTestValue{copyTestText(``)}},
		{"\t", 2, []copyTestValue{copyTestText(``), copyTestText(``)}},
		{"1\tZo\xc3\xab\t\\N\t12.50", 4, []copyTestValue{copyTestText("1"), copyTestText("Zoë"), copyTestNull(), copyTestText("12.50")}},
		{"\\N\t\\N", 2, []copyTestValue{copyTestNull(), copyTestNull()}},
		{"a\\tb\tc\\nd", 2, []copyTestValue{copyTestText("a\tb"), copyTestText("c\nd")}},
		{"\\\\x00ff\t\\\\", 2, []copyTestValue{copyTestText(`\x00ff`), copyTestText(`\`)}},
		{"{\"a\",\"b\"}", 1, []copyTestValue{copyTestText(`{"a","b"}`)}},
		{"\xff\xfe", 1, []copyTestValue{copyTestText("\xff\xfe")}},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%q", tt.line), func(t *testing.T) {
			got, err := parseCopyLine([]byte(tt.line), tt.columns)
			if err != nil {
				t.Fatalf("parseCopyLine: %v", err)
			}
			copyTestCheckRow(t, got, tt.want)
		})
	}
}

func TestParseCopyLineErrors(t *testing.T) {
	tests := []struct {
		line    string
		columns int
	}{
		{"a\tb", 1},
		{"a\tb", 3},
		{"", 2},
		{"a\\", 1},
		{"a\tb\\", 2},
		{"a\\\tb", 2}, // the backslash escapes nothing: the tab separates
	}
	for _, tt := range tests {
		if got, err := parseCopyLine([]byte(tt.line), tt.columns); err == nil {
			t.Errorf("parseCopyLine(%q, %d) = %v, want an error", tt.line, tt.columns, got)
		}
	}
}

// copyTestInput is COPY output of a three-column table, with escapes and
// NULLs placed so that split writes cut through them.
const copyTestInput = "1\tplain\t\\N\n" +
	"2\ttab\\there\\nnewline\t\\\\N\n" +
	"3\t\t\n" +
	"4\t\\x41\\101\\\\\t\xff\xfe\n" +
	"\\N\t\\N\t\\N\n"

var copyTestRows = [][]copyTestValue{
	{copyTestText("1"), copyTestText("plain"), copyTestNull()},
	{copyTestText("2"), copyTestText("tab\there\nnewline"), copyTestText(`\N`)},
	{copyTestText("3"), copyTestText(""), copyTestText("")},
	{copyTestText("4"), copyTestText(`AA\`), copyTestText("\xff\xfe")},
	{copyTestNull(), copyTestNull(), copyTestNull()},
}

// copyTestFeed writes input to a parser in pieces of the sizes next returns
// and collects the rows.
func copyTestFeed(t *testing.T, columns int, input []byte, next func() int) [][]*havenpb.Datum {
	t.Helper()
	var rows [][]*havenpb.Datum
	p := &copyRowParser{columns: columns, onRow: func(values []*havenpb.Datum) error {
		rows = append(rows, values)
		return nil
	}}
	for len(input) > 0 {
		n := min(next(), len(input))
		piece := bytes.Clone(input[:n])
		written, err := p.Write(piece)
		if err != nil {
			t.Fatalf("Write(%q): %v", piece, err)
		}
		if written != n {
			t.Fatalf("Write(%q) = %d", piece, written)
		}
		// The caller may reuse its buffer after Write returns.
		for i := range piece {
			piece[i] = '#'
		}
		input = input[n:]
	}
	if err := p.finish(); err != nil {
		t.Fatalf("finish: %v", err)
	}
	return rows
}

func TestCopyRowParserSplitWrites(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	splits := map[string]func() int{
		"whole":       func() int { return len(copyTestInput) },
		"one byte":    func() int { return 1 },
		"two bytes":   func() int { return 2 },
		"random 1-7":  func() int { return 1 + rng.IntN(7) },
		"random 1-40": func() int { return 1 + rng.IntN(40) },
	}
	for name, next := range splits {
		t.Run(name, func(t *testing.T) {
			for range 20 {
				rows := copyTestFeed(t, 3, []byte(copyTestInput), next)
				if len(rows) != len(copyTestRows) {
					t.Fatalf("%d rows, want %d", len(rows), len(copyTestRows))
				}
				for i := range rows {
					copyTestCheckRow(t, rows[i], copyTestRows[i])
				}
			}
		})
	}
}

func TestCopyRowParserEmptyInput(t *testing.T) {
	rows := copyTestFeed(t, 3, nil, func() int { return 1 })
	if len(rows) != 0 {
		t.Errorf("%d rows from no input", len(rows))
	}
}

func TestCopyRowParserFinishPartialLine(t *testing.T) {
	for _, input := range []string{"1\ta\t\\N", "1\ta\t\\N\n2", "\\"} {
		p := &copyRowParser{columns: 3, onRow: func([]*havenpb.Datum) error { return nil }}
		if _, err := p.Write([]byte(input)); err != nil {
			t.Fatalf("Write(%q): %v", input, err)
		}
		if err := p.finish(); err == nil {
			t.Errorf("finish after %q = nil, want an error", input)
		}
	}
}

func TestCopyRowParserErrors(t *testing.T) {
	t.Run("field count", func(t *testing.T) {
		p := &copyRowParser{columns: 3, onRow: func([]*havenpb.Datum) error { return nil }}
		if _, err := p.Write([]byte("1\ta\t\\N\n2\tb\n")); err == nil {
			t.Error("Write of a two-field row into three columns succeeded")
		}
	})
	t.Run("lone backslash", func(t *testing.T) {
		p := &copyRowParser{columns: 1, onRow: func([]*havenpb.Datum) error { return nil }}
		if _, err := p.Write([]byte("a\\\n")); err == nil {
			t.Error("Write of a row ending in a lone backslash succeeded")
		}
	})
	t.Run("onRow", func(t *testing.T) {
		stop := errors.New("stop")
		calls := 0
		p := &copyRowParser{columns: 1, onRow: func([]*havenpb.Datum) error {
			calls++
			return stop
		}}
		if _, err := p.Write([]byte("a\nb\n")); !errors.Is(err, stop) {
			t.Errorf("Write = %v, want onRow's error", err)
		}
		if calls != 1 {
			t.Errorf("onRow called %d times after failing", calls)
		}
	})
}

// copyTestEscapeMinimal escapes only what COPY TO must: backslash, newline,
// carriage return and tab.
func copyTestEscapeMinimal(b []byte) []byte {
	var out []byte
	for _, c := range b {
		switch c {
		case '\\':
			out = append(out, '\\', '\\')
		case '\n':
			out = append(out, '\\', 'n')
		case '\r':
			out = append(out, '\\', 'r')
		case '\t':
			out = append(out, '\\', 't')
		default:
			out = append(out, c)
		}
	}
	return out
}

// copyTestEscapePostgres escapes like PostgreSQL's CopyAttributeOutText,
// which also writes \b, \f and \v.
func copyTestEscapePostgres(b []byte) []byte {
	var out []byte
	for _, c := range b {
		switch c {
		case '\b':
			out = append(out, '\\', 'b')
		case '\f':
			out = append(out, '\\', 'f')
		case '\v':
			out = append(out, '\\', 'v')
		default:
			out = append(out, copyTestEscapeMinimal([]byte{c})...)
		}
	}
	return out
}

// copyTestRandomBytes favours the bytes COPY treats specially.
func copyTestRandomBytes(rng *rand.Rand) []byte {
	const special = "\\\n\r\t\b\f\vNx0178"
	b := make([]byte, rng.IntN(24))
	for i := range b {
		if rng.IntN(2) == 0 {
			b[i] = special[rng.IntN(len(special))]
		} else {
			b[i] = byte(1 + rng.IntN(255))
		}
	}
	return b
}

func TestCopyTextRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	escapes := map[string]func([]byte) []byte{"minimal": copyTestEscapeMinimal, "postgres": copyTestEscapePostgres}
	for name, escape := range escapes {
		t.Run(name, func(t *testing.T) {
			const columns = 3
			var input []byte
			var want [][]copyTestValue
			for range 2000 {
				var line [][]byte
				var values []copyTestValue
				for range columns {
					if rng.IntN(8) == 0 {
						line = append(line, []byte(`\N`))
						values = append(values, copyTestNull())
						continue
					}
					text := copyTestRandomBytes(rng)
					line = append(line, escape(text))
					values = append(values, copyTestText(string(text)))
				}
				input = append(input, bytes.Join(line, []byte{'\t'})...)
				input = append(input, '\n')
				want = append(want, values)
			}
			rows := copyTestFeed(t, columns, input, func() int { return 1 + rng.IntN(100) })
			if len(rows) != len(want) {
				t.Fatalf("%d rows, want %d", len(rows), len(want))
			}
			for i := range rows {
				copyTestCheckRow(t, rows[i], want[i])
			}
		})
	}
}

// FuzzCopyTextRoundTrip: any NUL-free text escaped the way COPY TO does
// parses back to itself, never as NULL.
func FuzzCopyTextRoundTrip(f *testing.F) {
	for _, s := range []string{"", `\N`, `\`, "a\tb\nc\r", "\\x41", "\xff\b\f\v", strings.Repeat(`\\`, 5)} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, text []byte) {
		if bytes.IndexByte(text, 0) >= 0 {
			t.Skip("COPY text cannot hold NUL")
		}
		for _, escape := range []func([]byte) []byte{copyTestEscapeMinimal, copyTestEscapePostgres} {
			got, err := parseCopyLine(escape(text), 1)
			if err != nil {
				t.Fatalf("parseCopyLine(%q): %v", escape(text), err)
			}
			if got[0].Kind != havenpb.DatumKind_DATUM_TEXT || !bytes.Equal(got[0].Text, text) {
				t.Fatalf("%q came back as %v %q", text, got[0].Kind, got[0].Text)
			}
		}
	})
}
