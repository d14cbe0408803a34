package agent

import (
	"bytes"
	"fmt"

	"github.com/haven-dr/haven/proto/havenpb"
)

// copyRowParser turns the text-format output of COPY … TO STDOUT into rows
// of values in PostgreSQL text form. It is an io.Writer so that pgconn's
// CopyTo streams through it: a table of any size is never held whole.
type copyRowParser struct {
	columns int
	pending []byte
	onRow   func([]*havenpb.Datum) error
}

func (p *copyRowParser) Write(b []byte) (int, error) {
	p.pending = append(p.pending, b...)
	for {
		i := bytes.IndexByte(p.pending, '\n')
		if i < 0 {
			break
		}
		row, err := parseCopyLine(p.pending[:i], p.columns)
		if err != nil {
			return 0, err
		}
		if err := p.onRow(row); err != nil {
			return 0, err
		}
		p.pending = p.pending[i+1:]
	}
	// Keep the unfinished line, compacted, so the buffer does not grow.
	p.pending = append(p.pending[:0:0], p.pending...)
	return len(b), nil
}

// finish reports a trailing partial line, which COPY never sends.
func (p *copyRowParser) finish() error {
	if len(p.pending) > 0 {
		return fmt.Errorf("COPY output ended inside a row (%d bytes)", len(p.pending))
	}
	return nil
}

// parseCopyLine splits one COPY text line into values, undoing COPY's
// backslash escapes; \N is NULL.
func parseCopyLine(line []byte, columns int) ([]*havenpb.Datum, error) {
	values := make([]*havenpb.Datum, 0, columns)
	for field := range bytes.SplitSeq(line, []byte{'\t'}) {
		if len(field) == 2 && field[0] == '\\' && field[1] == 'N' {
			values = append(values, &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_NULL})
			continue
		}
		text, err := unescapeCopy(field)
		if err != nil {
			return nil, err
		}
		values = append(values, &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT, Text: text})
	}
	if len(values) != columns {
		return nil, fmt.Errorf("COPY row has %d fields, table has %d columns", len(values), columns)
	}
	return values, nil
}

func unescapeCopy(field []byte) ([]byte, error) {
	if bytes.IndexByte(field, '\\') < 0 {
		return bytes.Clone(field), nil
	}
	out := make([]byte, 0, len(field))
	for i := 0; i < len(field); i++ {
		c := field[i]
		if c != '\\' {
			out = append(out, c)
			continue
		}
		i++
		if i == len(field) {
			return nil, fmt.Errorf("COPY field ends with a lone backslash")
		}
		switch e := field[i]; e {
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'v':
			out = append(out, '\v')
		case 'x':
			v, n := 0, 0
			for n < 2 && i+1 < len(field) && isHex(field[i+1]) {
				i++
				v = v*16 + hexValue(field[i])
				n++
			}
			if n == 0 {
				out = append(out, 'x')
			} else {
				out = append(out, byte(v))
			}
		case '0', '1', '2', '3', '4', '5', '6', '7':
			v := int(e - '0')
			for n := 1; n < 3 && i+1 < len(field) && field[i+1] >= '0' && field[i+1] <= '7'; n++ {
				i++
				v = v*8 + int(field[i]-'0')
			}
			out = append(out, byte(v))
		default:
			out = append(out, e)
		}
	}
	return out, nil
}

func isHex(c byte) bool {
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}

func hexValue(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	default:
		return int(c-'A') + 10
	}
}
