package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// COPY's binary format, as snapshot chunks of KIND_SNAPSHOT_COPY_BINARY
// carry it: rows only, never the header or trailer, so that each chunk
// loads on its own (CopyBinaryHeader, the rows, CopyBinaryTrailer).

// FirstGenbkiObjectID is where the OIDs that initdb assigns as it goes
// begin (those of information_schema, for one, which differ between
// versions): a type below it is built in, with the same OID everywhere.
const FirstGenbkiObjectID = 10000

// regTypes are the reg* types and their arrays: their binary form is an
// OID, which names another object on another server, or none.
var regTypes = map[uint32]bool{24: true, 1008: true, 2202: true, 2203: true, 2204: true, 2205: true, 2206: true, 2207: true,
	2208: true, 2209: true, 2210: true, 2211: true, 3734: true, 3735: true, 3769: true, 3770: true, 4089: true, 4090: true,
	4096: true, 4097: true, 4191: true, 4192: true}

// BinaryCopyable says whether values of the type with this OID may travel
// in COPY's binary format as far as the OID tells (the agent also asks the
// source's catalog).
func BinaryCopyable(oid uint32) bool {
	return oid != 0 && oid < FirstGenbkiObjectID && !regTypes[oid]
}

// CopyBinaryHeader opens a COPY binary stream: the signature, no flags, no
// header extension.
var CopyBinaryHeader = []byte("PGCOPY\n\xff\r\n\x00\x00\x00\x00\x00\x00\x00\x00\x00")

// CopyBinaryTrailer ends a COPY binary stream: a field count of -1.
var CopyBinaryTrailer = []byte{0xff, 0xff}

// errCopyBinaryEnd: ScanCopyBinary met the trailer.
var errCopyBinaryEnd = errors.New("trailer")

// ScanCopyBinary reads whole rows of columns fields from the start of data:
// it returns the length of those rows and how many there are, stopping at
// a row that data holds only part of. It fails on a row with another
// number of fields, a length below -1 and, with ended, the trailer (the
// stream ends there, so whatever follows it is not a row).
func ScanCopyBinary(data []byte, columns int) (n, rows int, ended bool, err error) {
	for {
		end, err := copyBinaryRow(data[n:], columns)
		switch {
		case errors.Is(err, errCopyBinaryEnd):
			return n, rows, true, nil
		case err != nil:
			return n, rows, false, fmt.Errorf("COPY binary row %d: %w", rows+1, err)
		case end == 0:
			return n, rows, false, nil
		}
		n += end
		rows++
	}
}

// AppendCopyBinaryRow appends a row in COPY's binary format, the one
// ScanCopyBinary reads, to dst; a nil field is NULL.
func AppendCopyBinaryRow(dst []byte, fields ...[]byte) []byte {
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(fields)))
	for _, f := range fields {
		if f == nil {
			dst = binary.BigEndian.AppendUint32(dst, 0xffffffff)
			continue
		}
		dst = binary.BigEndian.AppendUint32(dst, uint32(len(f)))
		dst = append(dst, f...)
	}
	return dst
}

// copyBinaryRow returns the length of the row at the start of data, or 0
// when data does not hold all of it.
func copyBinaryRow(data []byte, columns int) (int, error) {
	if len(data) < 2 {
		return 0, nil
	}
	fields := int16(binary.BigEndian.Uint16(data))
	if fields == -1 {
		return 0, errCopyBinaryEnd
	}
	if int(fields) != columns {
		return 0, fmt.Errorf("%d fields, the table has %d columns", fields, columns)
	}
	p := 2
	for range columns {
		if len(data) < p+4 {
			return 0, nil
		}
		size := int32(binary.BigEndian.Uint32(data[p:]))
		p += 4
		if size < -1 {
			return 0, fmt.Errorf("field length %d", size)
		}
		if size > 0 {
			if len(data)-p < int(size) {
				return 0, nil
			}
			p += int(size)
		}
	}
	return p, nil
}
