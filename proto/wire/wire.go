// Package wire frames haven chunks for the stream: it marshals a
// havenpb.Chunk, optionally compresses it, and on the reading side checks the
// encoding and the format version and validates the chunk's structure, so
// that the apply side never interprets a message it does not fully
// understand. Every decoding failure is an error, never a panic.
package wire

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"unicode/utf8"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/haven-dr/haven/proto/havenpb"
)

// FormatVersion is the wire-format version this build writes and the only
// one it reads.
const FormatVersion = 1

// Header names carried on every stream message.
const (
	// HeaderEncoding names the payload's encoding: EncodingProto,
	// EncodingProtoZstd or EncodingProtoS2.
	HeaderEncoding = "Haven-Encoding"
	// HeaderFormat carries the format version in decimal, so a reader can
	// reject a message without decoding it.
	HeaderFormat = "Haven-Format"
)

// Encodings of a payload.
const (
	EncodingProto     = "proto"
	EncodingProtoZstd = "proto+zstd"
	EncodingProtoS2   = "proto+s2"
)

// Codec is how Encode compresses a chunk.
type Codec int

const (
	// Plain: not compressed.
	Plain Codec = iota
	// Zstd compresses best: for links and brokers short of bandwidth or
	// space (the agent's --compress).
	Zstd
	// S2 compresses at a few GB/s per core and decompresses faster still,
	// for about half of zstd's gain on text: snapshot rows, whose bytes
	// the broker would otherwise write and send again in full.
	S2
)

// maxDecodedSize bounds a decompressed payload, so that a corrupt or hostile
// message cannot make the reader allocate without limit; Encode refuses a
// larger chunk.
const maxDecodedSize = 64 << 20

// ErrTooLarge marks a chunk larger than a reader decodes.
var ErrTooLarge = fmt.Errorf("chunk larger than a reader decodes (%d MiB)", maxDecodedSize>>20)

// ErrCorrupt marks a payload that is not a valid haven chunk.
var ErrCorrupt = errors.New("corrupt haven message")

// ErrUnsupported marks a message this build does not understand (unknown
// encoding or format version); upgrading haven on the reading side may help.
var ErrUnsupported = errors.New("unsupported haven message")

var (
	zstdEncoder = sync.OnceValue(func() *zstd.Encoder {
		enc, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1), zstd.WithEncoderLevel(zstd.SpeedFastest))
		if err != nil {
			panic(fmt.Sprintf("zstd encoder with static options: %v", err))
		}
		return enc
	})
	zstdDecoder = sync.OnceValue(func() *zstd.Decoder {
		dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(maxDecodedSize))
		if err != nil {
			panic(fmt.Sprintf("zstd decoder with static options: %v", err))
		}
		return dec
	})
)

// Encode marshals c and compresses it with codec. It returns the payload
// and the value of HeaderEncoding.
func Encode(c *havenpb.Chunk, codec Codec) (payload []byte, encoding string, err error) {
	if codec == Plain {
		raw, err := c.MarshalVT()
		if err != nil {
			return nil, "", fmt.Errorf("marshal chunk: %w", err)
		}
		if len(raw) > maxDecodedSize {
			return nil, "", fmt.Errorf("%w: %d bytes", ErrTooLarge, len(raw))
		}
		return raw, EncodingProto, nil
	}
	n := c.SizeVT()
	if n > maxDecodedSize {
		return nil, "", fmt.Errorf("%w: %d bytes", ErrTooLarge, n)
	}
	// What is compressed is marshalled into a buffer used again: a
	// snapshot chunk would otherwise take a megabyte of new memory, whose
	// pages the kernel clears first, each time.
	raw := pooledBuffer(n)
	defer putBuffer(raw)
	if _, err := c.MarshalToSizedBufferVT(*raw); err != nil {
		return nil, "", fmt.Errorf("marshal chunk: %w", err)
	}
	if codec == Zstd {
		return zstdEncoder().EncodeAll(*raw, make([]byte, 0, n/2)), EncodingProtoZstd, nil
	}
	compressed := pooledBuffer(s2.MaxEncodedLen(n))
	defer putBuffer(compressed)
	return bytes.Clone(s2.Encode(*compressed, *raw)), EncodingProtoS2, nil
}

var buffers = sync.Pool{New: func() any { return new([]byte) }}

// pooledBuffer returns a buffer of n bytes, for putBuffer once unused.
func pooledBuffer(n int) *[]byte {
	b := buffers.Get().(*[]byte)
	if cap(*b) < n {
		*b = make([]byte, n)
	}
	*b = (*b)[:n]
	return b
}

func putBuffer(b *[]byte) {
	if cap(*b) <= maxPooledBuffer {
		buffers.Put(b)
	}
}

// maxPooledBuffer: a larger buffer (a chunk of very large rows) is left to
// the garbage collector.
const maxPooledBuffer = 8 << 20

// Decode reverses Encode and validates the result (see Validate). format is
// the HeaderFormat value; an empty one is checked from the payload alone.
// The chunk's strings and bytes share an uncompressed payload's memory:
// payload must not change while the chunk is in use, and what outlives the
// message should be copied (strings.Clone) so as not to keep it alive.
func Decode(encoding, format string, payload []byte) (*havenpb.Chunk, error) {
	return decode(encoding, format, payload, nil)
}

// Decoder decodes as Decode does, and keeps the table descriptions it
// decoded: every chunk of a transaction describes the tables it touches,
// mostly the same few, byte for byte, and decoding them again cost a
// standby as much as the rows. The chunks it returns share those
// descriptions, which must not be changed. It also decodes row changes
// into a few arrays rather than one allocation per value (changes.go). A
// Decoder is for one goroutine.
type Decoder struct {
	relations map[string]*havenpb.Relation // by their encoding
}

// Decode is Decode with d's descriptions.
func (d *Decoder) Decode(encoding, format string, payload []byte) (*havenpb.Chunk, error) {
	return decode(encoding, format, payload, d)
}

// maxDecoderRelations bounds the descriptions a Decoder keeps.
const maxDecoderRelations = 4096

// relationsField is Chunk.relations' field number.
const relationsField = 13

// unmarshal decodes raw into c, taking its relation descriptions from d,
// and its changes from decodeChanges. The other fields are decoded in
// place, a run of them at a time: decoding a message's fields in parts is
// decoding the whole of it.
func (d *Decoder) unmarshal(c *havenpb.Chunk, raw []byte) error {
	var relations []*havenpb.Relation
	var changes [][]byte
	run := 0 // where the fields not yet decoded begin
	for i := 0; i < len(raw); {
		num, typ, n := protowire.ConsumeTag(raw[i:])
		m := -1
		if n > 0 {
			m = protowire.ConsumeFieldValue(num, typ, raw[i+n:])
		}
		if m < 0 {
			// What protowire refuses, the generated code may read
			// otherwise (a field number out of range): decode it whole,
			// as Decode does.
			c.Reset()
			return c.UnmarshalVTUnsafe(raw)
		}
		if (num != relationsField && num != changesField) || typ != protowire.BytesType {
			i += n + m
			continue
		}
		if err := c.UnmarshalVTUnsafe(raw[run:i]); err != nil {
			return err
		}
		value, _ := protowire.ConsumeBytes(raw[i+n:])
		i += n + m
		run = i
		if num == changesField {
			changes = append(changes, value)
			continue
		}
		r, ok := d.relations[string(value)]
		if !ok {
			r = &havenpb.Relation{}
			// Copied, not sharing the payload: it outlives the message.
			if err := r.UnmarshalVT(value); err != nil {
				return err
			}
			if d.relations == nil || len(d.relations) >= maxDecoderRelations {
				d.relations = map[string]*havenpb.Relation{}
			}
			d.relations[string(value)] = r
		}
		relations = append(relations, r)
	}
	if err := c.UnmarshalVTUnsafe(raw[run:]); err != nil {
		return err
	}
	c.Relations = append(c.Relations, relations...)
	if len(changes) > 0 {
		decoded, err := decodeChanges(changes)
		if err != nil {
			return err
		}
		c.Changes = decoded
	}
	return nil
}

func decode(encoding, format string, payload []byte, d *Decoder) (*havenpb.Chunk, error) {
	if format != "" && format != formatHeaderValue {
		return nil, fmt.Errorf("%w: format version %q, this haven reads %d: upgrade haven on this side", ErrUnsupported, format, FormatVersion)
	}
	raw := payload
	switch encoding {
	case EncodingProto:
	case EncodingProtoZstd:
		var err error
		raw, err = zstdDecoder().DecodeAll(payload, nil)
		if err != nil {
			return nil, fmt.Errorf("%w: zstd: %v", ErrCorrupt, err)
		}
	case EncodingProtoS2:
		n, err := s2.DecodedLen(payload)
		if err == nil && n > maxDecodedSize {
			err = fmt.Errorf("decodes to %d bytes, more than %d", n, maxDecodedSize)
		}
		if err == nil {
			raw, err = s2.Decode(nil, payload)
		}
		if err != nil {
			return nil, fmt.Errorf("%w: s2: %v", ErrCorrupt, err)
		}
	case "":
		return nil, fmt.Errorf("%w: no %s header: not a haven message", ErrCorrupt, HeaderEncoding)
	default:
		return nil, fmt.Errorf("%w: encoding %q (this haven knows %s, %s and %s): a newer agent may have written it; upgrade haven on this side",
			ErrUnsupported, encoding, EncodingProto, EncodingProtoZstd, EncodingProtoS2)
	}
	var c havenpb.Chunk
	unmarshal := c.UnmarshalVTUnsafe
	if d != nil {
		unmarshal = func(raw []byte) error { return d.unmarshal(&c, raw) }
	}
	if err := unmarshal(raw); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if err := Validate(&c); err != nil {
		return nil, err
	}
	return &c, nil
}

var formatHeaderValue = fmt.Sprint(FormatVersion)

// FormatHeader is the HeaderFormat value this build writes.
func FormatHeader() string { return formatHeaderValue }

// Validate checks what a reader relies on: the version, the kind, that every
// change names a relation the chunk describes, that rows have one value per
// column, and that every value says whether it is NULL, text or an unchanged
// TOAST placeholder.
func Validate(c *havenpb.Chunk) error {
	if c.GetFormatVersion() == 0 {
		return fmt.Errorf("%w: no format version: not a haven chunk", ErrCorrupt)
	}
	if c.GetFormatVersion() != FormatVersion {
		return fmt.Errorf("%w: format version %d, this haven reads %d: upgrade haven on this side", ErrUnsupported, c.GetFormatVersion(), FormatVersion)
	}
	switch c.GetKind() {
	case havenpb.Kind_KIND_TRANSACTION, havenpb.Kind_KIND_SNAPSHOT_BEGIN, havenpb.Kind_KIND_SNAPSHOT_ROWS, havenpb.Kind_KIND_SNAPSHOT_END:
	case havenpb.Kind_KIND_SNAPSHOT_COPY, havenpb.Kind_KIND_SNAPSHOT_COPY_BINARY:
		if err := validateCopy(c); err != nil {
			return fmt.Errorf("%w: %v", ErrCorrupt, err)
		}
	default:
		return fmt.Errorf("%w: chunk kind %d: a newer agent may have written it; upgrade haven on this side", ErrUnsupported, c.GetKind())
	}
	if c.GetGroup() == "" || c.GetSystemId() == 0 {
		return fmt.Errorf("%w: chunk without group or system id", ErrCorrupt)
	}
	if !validUTF8(c.GetGroup(), c.GetSlot()) {
		return fmt.Errorf("%w: group or slot name is not UTF-8", ErrCorrupt)
	}
	columns := make(map[uint32]int, len(c.GetRelations()))
	for _, r := range c.GetRelations() {
		if r.GetName() == "" || len(r.GetColumns()) == 0 {
			return fmt.Errorf("%w: relation %d without name or columns", ErrCorrupt, r.GetId())
		}
		if !validUTF8(r.GetSchema(), r.GetName(), r.GetReplicaIdentity()) {
			return fmt.Errorf("%w: relation %d has a name that is not UTF-8", ErrCorrupt, r.GetId())
		}
		for _, col := range r.GetColumns() {
			if col.GetName() == "" || col.GetType() == "" {
				return fmt.Errorf("%w: relation %s.%s has a column without name or type", ErrCorrupt, r.GetSchema(), r.GetName())
			}
			if !validUTF8(col.GetName(), col.GetType()) {
				return fmt.Errorf("%w: relation %s.%s has a column name or type that is not UTF-8", ErrCorrupt, r.GetSchema(), r.GetName())
			}
		}
		columns[r.GetId()] = len(r.GetColumns())
	}
	for _, v := range c.GetHeartbeat().GetSequences() {
		if !validUTF8(v.GetSchema(), v.GetName()) {
			return fmt.Errorf("%w: heartbeat names a sequence that is not UTF-8", ErrCorrupt)
		}
	}
	for i, ch := range c.GetChanges() {
		if op := ch.GetOp(); op > havenpb.Op_OP_BACKFILL {
			return fmt.Errorf("%w: change %d has op %d: a newer agent may have written it; upgrade haven on this side", ErrUnsupported, i, op)
		}
		if err := validateChange(ch, columns); err != nil {
			return fmt.Errorf("%w: change %d: %v", ErrCorrupt, i, err)
		}
	}
	return nil
}

// validateCopy checks a COPY chunk: one relation, and whole rows, as many
// as it says.
func validateCopy(c *havenpb.Chunk) error {
	if len(c.GetRelations()) != 1 || len(c.GetChanges()) != 0 {
		return fmt.Errorf("COPY chunk with %d relations and %d changes, expected one relation and no changes", len(c.GetRelations()), len(c.GetChanges()))
	}
	var rows int
	if c.GetKind() == havenpb.Kind_KIND_SNAPSHOT_COPY {
		text := c.GetCopyText()
		if len(text) > 0 && text[len(text)-1] != '\n' {
			return errors.New("COPY chunk does not end with a whole row")
		}
		rows = bytes.Count(text, []byte{'\n'})
	} else {
		rel := c.GetRelations()[0]
		if c.GetSourceVersion() == 0 {
			return errors.New("binary COPY chunk without the source's version")
		}
		for _, col := range rel.GetColumns() {
			if !BinaryCopyable(col.GetTypeOid()) {
				return fmt.Errorf("binary COPY chunk of %s.%s: column %q is of type %q (OID %d), which may not travel in binary", rel.GetSchema(), rel.GetName(), col.GetName(), col.GetType(), col.GetTypeOid())
			}
		}
		data := c.GetCopyBinary()
		n, count, ended, err := ScanCopyBinary(data, len(rel.GetColumns()))
		switch {
		case err != nil:
			return err
		case ended:
			return errors.New("binary COPY chunk holds the format's trailer")
		case n != len(data):
			return errors.New("binary COPY chunk does not end with a whole row")
		}
		rows = count
	}
	if uint64(rows) != c.GetCopyRows() {
		return fmt.Errorf("COPY chunk holds %d rows, says %d", rows, c.GetCopyRows())
	}
	return nil
}

func validateChange(ch *havenpb.Change, columns map[uint32]int) error {
	if ch.GetOp() == havenpb.Op_OP_BACKFILL {
		b := ch.GetBackfill()
		if b.GetName() == "" || (b.GetPhase() != havenpb.Backfill_PHASE_BEGIN && b.GetPhase() != havenpb.Backfill_PHASE_END) {
			return errors.New("backfill without table or phase")
		}
		if !validUTF8(b.GetSchema(), b.GetName()) {
			return errors.New("backfill of a table whose name is not UTF-8")
		}
		return nil
	}
	if ch.GetOp() == havenpb.Op_OP_TRUNCATE {
		if len(ch.GetTruncateRelationIds()) == 0 {
			return errors.New("truncate without relations")
		}
		for _, id := range ch.GetTruncateRelationIds() {
			if _, ok := columns[id]; !ok {
				return fmt.Errorf("truncate of undescribed relation %d", id)
			}
		}
		return nil
	}
	n, ok := columns[ch.GetRelationId()]
	if !ok {
		return fmt.Errorf("undescribed relation %d", ch.GetRelationId())
	}
	switch ch.GetOp() {
	case havenpb.Op_OP_INSERT, havenpb.Op_OP_UPSERT:
		if ch.GetNew() == nil {
			return fmt.Errorf("%s without new row", ch.GetOp())
		}
	case havenpb.Op_OP_UPDATE:
		if ch.GetNew() == nil {
			return errors.New("update without new row")
		}
	case havenpb.Op_OP_DELETE:
		if ch.GetOld() == nil {
			return errors.New("delete without old row")
		}
	default:
		return fmt.Errorf("op %d", ch.GetOp())
	}
	for _, row := range []*havenpb.Row{ch.GetOld(), ch.GetNew()} {
		if row == nil {
			continue
		}
		if len(row.GetValues()) != n {
			return fmt.Errorf("row has %d values, relation has %d columns", len(row.GetValues()), n)
		}
		for _, d := range row.GetValues() {
			switch d.GetKind() {
			case havenpb.DatumKind_DATUM_NULL, havenpb.DatumKind_DATUM_TEXT:
			case havenpb.DatumKind_DATUM_UNCHANGED_TOAST:
				// Only an update can leave a TOASTed value out.
				if row == ch.GetOld() || ch.GetOp() != havenpb.Op_OP_UPDATE {
					return fmt.Errorf("unchanged-TOAST marker in the %s row of a %s", rowName(row == ch.GetOld()), ch.GetOp())
				}
			default:
				return fmt.Errorf("value kind %d", d.GetKind())
			}
		}
	}
	return nil
}

// validUTF8 checks names the fast decoder does not (proto3 strings must be
// UTF-8): a reader quotes them into SQL and logs.
func validUTF8(names ...string) bool {
	for _, s := range names {
		if !utf8.ValidString(s) {
			return false
		}
	}
	return true
}

func rowName(old bool) string {
	if old {
		return "old"
	}
	return "new"
}
