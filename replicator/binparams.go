package replicator

import (
	"encoding/binary"
)

// Parameters in binary: the stream carries values in their text form, and
// DR's input functions parse them again. For a few types that parse is
// costly or common enough to matter: a timestamp's text took about a fifth
// of DR's apply backend during catch-up (ParseDateTime, strtod for the
// fractional seconds). Where DR reads a parameter as one of these types
// (as the prepared statement's description says), the standby sends it in
// the type's binary form instead, decoded from the text form under
// wire.TextFormatSettings (DateStyle ISO, as both sides run). Only forms
// that parse exactly are converted; any other (infinity, BC dates, years
// past 9999, a text in another style) goes as text, for DR to read as it
// always has.

// PostgreSQL type OIDs of the parameters sent in binary.
const (
	int2OID        = 21
	int4OID        = 23
	int8OID        = 20
	dateOID        = 1082
	timestampOID   = 1114
	timestamptzOID = 1184
)

// binaryEncoder appends the binary form of a value's text form to dst,
// reporting false when the text is not in the one form it converts.
type binaryEncoder func(dst, text []byte) ([]byte, bool)

// binaryEncoders are the types sent in binary, by OID; each appends at
// most maxBinaryParam bytes.
var binaryEncoders = map[uint32]binaryEncoder{
	int2OID:        func(dst, text []byte) ([]byte, bool) { return appendInt(dst, text, 2) },
	int4OID:        func(dst, text []byte) ([]byte, bool) { return appendInt(dst, text, 4) },
	int8OID:        func(dst, text []byte) ([]byte, bool) { return appendInt(dst, text, 8) },
	dateOID:        appendDate,
	timestampOID:   func(dst, text []byte) ([]byte, bool) { return appendTimestamp(dst, text, false) },
	timestamptzOID: func(dst, text []byte) ([]byte, bool) { return appendTimestamp(dst, text, true) },
}

const maxBinaryParam = 8

// binaryParam is a parameter of a prepared statement sent in binary.
type binaryParam struct {
	index  int
	encode binaryEncoder
}

// binaryParams lists the parameters of a statement, of the types DR reads
// them as, that go in binary.
func binaryParams(paramOIDs []uint32) []binaryParam {
	var params []binaryParam
	for i, oid := range paramOIDs {
		if enc := binaryEncoders[oid]; enc != nil {
			params = append(params, binaryParam{index: i, encode: enc})
		}
	}
	return params
}

// paramEncoding holds one statement's parameters as sent: reused from one
// statement to the next (the connection copies what it sends).
type paramEncoding struct {
	values  [][]byte
	formats []int16
	buf     []byte
}

// encode returns params with those of binary in binary, and their format
// codes.
func (e *paramEncoding) encode(params [][]byte, binary []binaryParam) ([][]byte, []int16) {
	e.values = append(e.values[:0], params...)
	e.formats = append(e.formats[:0], make([]int16, len(params))...)
	if need := maxBinaryParam * len(binary); cap(e.buf) < need {
		e.buf = make([]byte, 0, need)
	}
	// Room for every value is made above: appending never moves buf, so
	// the values already sliced from it stay valid.
	buf := e.buf[:0]
	for _, p := range binary {
		text := params[p.index]
		if text == nil { // NULL
			continue
		}
		at := len(buf)
		out, ok := p.encode(buf, text)
		if !ok {
			continue
		}
		buf = out
		e.values[p.index] = buf[at:len(buf):len(buf)]
		e.formats[p.index] = 1
	}
	return e.values, e.formats
}

// appendInt converts an integer's text form (optionally signed decimal
// digits) to a big-endian integer of size bytes.
func appendInt(dst, text []byte, size int) ([]byte, bool) {
	neg := false
	digits := text
	if len(digits) > 0 && (digits[0] == '-' || digits[0] == '+') {
		neg = digits[0] == '-'
		digits = digits[1:]
	}
	if len(digits) == 0 || len(digits) > 19 {
		return dst, false
	}
	var v uint64
	for _, c := range digits {
		if c < '0' || c > '9' {
			return dst, false
		}
		v = v*10 + uint64(c-'0') // 19 digits do not overflow a uint64
	}
	limit := uint64(1) << (8*size - 1) // the magnitude of the type's minimum
	if v > limit || (v == limit && !neg) {
		return dst, false
	}
	n := int64(v)
	if neg {
		n = -n
	}
	switch size {
	case 2:
		return binary.BigEndian.AppendUint16(dst, uint16(n)), true
	case 4:
		return binary.BigEndian.AppendUint32(dst, uint32(n)), true
	default:
		return binary.BigEndian.AppendUint64(dst, uint64(n)), true
	}
}

// appendDate converts a date's ISO text form (YYYY-MM-DD, years 1 to 9999)
// to PostgreSQL's binary form: days since 2000-01-01, as an int4.
func appendDate(dst, text []byte) ([]byte, bool) {
	days, ok := isoDate(text)
	if !ok || len(text) != 10 {
		return dst, false
	}
	return binary.BigEndian.AppendUint32(dst, uint32(int32(days))), true
}

// appendTimestamp converts a timestamp's ISO text form, YYYY-MM-DD
// HH:MM:SS with up to six digits of fractional seconds, and for
// timestamptz the UTC offset (±HH, ±HH:MM or ±HH:MM:SS), to PostgreSQL's
// binary form: microseconds since 2000-01-01 00:00:00 (UTC for
// timestamptz), as an int8.
func appendTimestamp(dst, text []byte, withZone bool) ([]byte, bool) {
	days, ok := isoDate(text)
	if !ok || len(text) < 19 || text[10] != ' ' || text[13] != ':' || text[16] != ':' {
		return dst, false
	}
	h, ok1 := twoDigits(text[11:13])
	m, ok2 := twoDigits(text[14:16])
	s, ok3 := twoDigits(text[17:19])
	if !ok1 || !ok2 || !ok3 || h > 23 || m > 59 || s > 59 {
		return dst, false
	}
	usec := int64(0)
	rest := text[19:]
	if len(rest) > 0 && rest[0] == '.' {
		n := 1
		for n < len(rest) && rest[n] >= '0' && rest[n] <= '9' {
			n++
		}
		frac := rest[1:n]
		if len(frac) == 0 || len(frac) > 6 {
			return dst, false
		}
		for i := range 6 {
			usec *= 10
			if i < len(frac) {
				usec += int64(frac[i] - '0')
			}
		}
		rest = rest[n:]
	}
	var offset int64 // seconds east of UTC
	if withZone {
		var ok bool
		if offset, ok = utcOffset(rest); !ok {
			return dst, false
		}
	} else if len(rest) != 0 {
		return dst, false
	}
	secs := days*86400 + int64(h)*3600 + int64(m)*60 + int64(s) - offset
	return binary.BigEndian.AppendUint64(dst, uint64(secs*1_000_000+usec)), true
}

// utcOffset reads an offset of ±HH, ±HH:MM or ±HH:MM:SS, the whole of
// text, as seconds east of UTC.
func utcOffset(text []byte) (int64, bool) {
	if (len(text) != 3 && len(text) != 6 && len(text) != 9) || (text[0] != '+' && text[0] != '-') {
		return 0, false
	}
	var secs int64
	for i, unit := range []int64{3600, 60, 1} {
		at := 1 + 3*i
		if at >= len(text) {
			break
		}
		if i > 0 && text[at-1] != ':' {
			return 0, false
		}
		v, ok := twoDigits(text[at : at+2])
		if !ok || (i == 0 && v > 15) || (i > 0 && v > 59) { // PostgreSQL's range
			return 0, false
		}
		secs += int64(v) * unit
	}
	if text[0] == '-' {
		secs = -secs
	}
	return secs, true
}

// isoDate reads the YYYY-MM-DD that text starts with (years 1 to 9999) as
// days since 2000-01-01.
func isoDate(text []byte) (int64, bool) {
	if len(text) < 10 || text[4] != '-' || text[7] != '-' {
		return 0, false
	}
	hi, ok1 := twoDigits(text[0:2])
	lo, ok2 := twoDigits(text[2:4])
	month, ok3 := twoDigits(text[5:7])
	day, ok4 := twoDigits(text[8:10])
	year := hi*100 + lo
	if !ok1 || !ok2 || !ok3 || !ok4 || year < 1 || month < 1 || month > 12 || day < 1 || day > daysIn(year, month) {
		return 0, false
	}
	return daysFromCivil(int64(year), int64(month), int64(day)) - daysFrom1970To2000, true
}

func twoDigits(b []byte) (int, bool) {
	if b[0] < '0' || b[0] > '9' || b[1] < '0' || b[1] > '9' {
		return 0, false
	}
	return int(b[0]-'0')*10 + int(b[1]-'0'), true
}

func daysIn(year, month int) int {
	switch month {
	case 2:
		if year%4 == 0 && (year%100 != 0 || year%400 == 0) {
			return 29
		}
		return 28
	case 4, 6, 9, 11:
		return 30
	}
	return 31
}

const daysFrom1970To2000 = 10957

// daysFromCivil counts the days from 1970-01-01 to a date of the proleptic
// Gregorian calendar (as PostgreSQL's dates are), for years from 1.
func daysFromCivil(y, m, d int64) int64 {
	if m <= 2 {
		y--
	}
	era := y / 400 // y >= 0 here
	yoe := y - era*400
	mp := (m + 9) % 12 // March is 0
	doy := (153*mp+2)/5 + d - 1
	doe := yoe*365 + yoe/4 - yoe/100 + doy
	return era*146097 + doe - 719468
}
