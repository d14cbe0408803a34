package wire

import (
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/haven-dr/haven/proto/havenpb"
)

// A Decoder decodes a chunk's row changes into a few arrays, one of each
// message type, instead of one allocation per value: the generated code's
// allocations were a fifth of the standby's CPU in catch-up. A change of
// any other shape than an insert, update or delete whose fields are all
// known and appear once (a truncate, a backfill mark, a field from a newer
// agent, a malformed one) is decoded by the generated code, which decides
// what it means or refuses it.

// changesField is Chunk.changes' field number.
const changesField = 14

// Field numbers of Change, Row and Datum.
const (
	changeOpField       = 1
	changeRelationField = 2
	changeOldField      = 3
	changeNewField      = 4
	rowValuesField      = 1
	datumKindField      = 1
	datumTextField      = 2
)

// changeArrays is where decodeChange puts what it decodes.
type changeArrays struct {
	rows   []havenpb.Row
	datums []havenpb.Datum
	values []*havenpb.Datum // the rows' Values
}

// decodeChanges decodes the encodings of changes, in order.
func decodeChanges(raw [][]byte) ([]*havenpb.Change, error) {
	plain := make([]bool, len(raw))
	var changes, rows, values int
	for i, b := range raw {
		if r, v, ok := countChange(b); ok {
			plain[i] = true
			changes, rows, values = changes+1, rows+r, values+v
		}
	}
	a := &changeArrays{rows: make([]havenpb.Row, 0, rows), datums: make([]havenpb.Datum, 0, values),
		values: make([]*havenpb.Datum, 0, values)}
	decoded := make([]havenpb.Change, changes)
	out := make([]*havenpb.Change, len(raw))
	for i, b := range raw {
		if plain[i] {
			ch := &decoded[0]
			decoded = decoded[1:]
			if decodeChange(b, ch, a) {
				out[i] = ch
				continue
			}
		}
		ch := &havenpb.Change{}
		if err := ch.UnmarshalVTUnsafe(b); err != nil {
			return nil, err
		}
		out[i] = ch
	}
	return out, nil
}

// countChange says how many rows and values a change has, and whether it
// may be of the plain shape (decodeChange has the last word on its values).
func countChange(b []byte) (rows, values int, ok bool) {
	var seenOld, seenNew bool
	for len(b) > 0 {
		num, typ, n := tag(b)
		if n < 0 {
			return 0, 0, false
		}
		b = b[n:]
		switch {
		case (num == changeOpField || num == changeRelationField) && typ == protowire.VarintType:
			_, n = uvarint(b)
		case (num == changeOldField && !seenOld || num == changeNewField && !seenNew) && typ == protowire.BytesType:
			seenOld, seenNew = seenOld || num == changeOldField, seenNew || num == changeNewField
			var row []byte
			row, n = lengthPrefixed(b)
			for rows++; n >= 0 && len(row) > 0; values++ {
				num, typ, m := tag(row)
				if m < 0 || num != rowValuesField || typ != protowire.BytesType {
					return 0, 0, false
				}
				_, k := lengthPrefixed(row[m:])
				if k < 0 {
					return 0, 0, false
				}
				row = row[m+k:]
			}
		default:
			return 0, 0, false
		}
		if n < 0 {
			return 0, 0, false
		}
		b = b[n:]
	}
	return rows, values, true
}

// decodeChange decodes a change that countChange counted into ch, and its
// rows and values into a; false: a value is not of the plain shape.
func decodeChange(b []byte, ch *havenpb.Change, a *changeArrays) bool {
	for len(b) > 0 {
		num, _, n := tag(b)
		b = b[n:]
		switch num {
		case changeOpField, changeRelationField:
			v, n := uvarint(b)
			b = b[n:]
			if num == changeOpField {
				ch.Op = havenpb.Op(int32(v))
			} else {
				ch.RelationId = uint32(v)
			}
		default: // old or new
			v, n := lengthPrefixed(b)
			b = b[n:]
			a.rows = append(a.rows, havenpb.Row{})
			row := &a.rows[len(a.rows)-1]
			if num == changeOldField {
				ch.Old = row
			} else {
				ch.New = row
			}
			if !decodeRow(v, row, a) {
				return false
			}
		}
	}
	return true
}

// decodeRow decodes a row that countChange counted.
func decodeRow(b []byte, row *havenpb.Row, a *changeArrays) bool {
	first := len(a.values)
	for len(b) > 0 {
		_, _, n := tag(b)
		v, m := lengthPrefixed(b[n:])
		b = b[n+m:]
		a.datums = append(a.datums, havenpb.Datum{})
		d := &a.datums[len(a.datums)-1]
		a.values = append(a.values, d)
		if !decodeDatum(v, d) {
			return false
		}
	}
	if len(a.values) > first {
		row.Values = a.values[first:len(a.values):len(a.values)]
	}
	return true
}

// decodeDatum decodes a value with only known fields into d, as the
// generated code does: the last of a repeated field wins, and the text
// shares b. False: an unknown field, or a malformed one.
func decodeDatum(b []byte, d *havenpb.Datum) bool {
	for len(b) > 0 {
		num, typ, n := tag(b)
		if n < 0 {
			return false
		}
		b = b[n:]
		switch {
		case num == datumKindField && typ == protowire.VarintType:
			v, n := uvarint(b)
			if n < 0 {
				return false
			}
			b = b[n:]
			d.Kind = havenpb.DatumKind(int32(v))
		case num == datumTextField && typ == protowire.BytesType:
			v, n := lengthPrefixed(b)
			if n < 0 {
				return false
			}
			b = b[n:]
			d.Text = v
		default:
			return false
		}
	}
	return true
}

// tag reads a one-byte field tag (fields 1 to 15, all the plain shape
// has); n < 0 for any other.
func tag(b []byte) (num protowire.Number, typ protowire.Type, n int) {
	if len(b) == 0 || b[0] >= 0x80 {
		return 0, 0, -1
	}
	return protowire.Number(b[0] >> 3), protowire.Type(b[0] & 7), 1
}

// uvarint is protowire.ConsumeVarint, one-byte varints inline.
func uvarint(b []byte) (uint64, int) {
	if len(b) > 0 && b[0] < 0x80 {
		return uint64(b[0]), 1
	}
	return protowire.ConsumeVarint(b)
}

// lengthPrefixed reads a length-prefixed value; n < 0 when b is malformed
// or too short.
func lengthPrefixed(b []byte) (v []byte, n int) {
	l, n := uvarint(b)
	if n < 0 || l > uint64(len(b)-n) {
		return nil, -1
	}
	return b[n : n+int(l) : n+int(l)], n + int(l)
}
