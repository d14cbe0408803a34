package agent

import (
	"github.com/haven-dr/haven/proto/havenpb"
)

// perValueOverhead approximates the protobuf framing of one value, so that a
// chunk's estimated size stays an upper bound of its encoded size.
const perValueOverhead = 12

// chunkBuilder gathers changes into a chunk until it reaches its size bound.
type chunkBuilder struct {
	limit     int
	chunk     *havenpb.Chunk
	size      int
	described map[uint32]bool
}

func newChunkBuilder(limit int, header *havenpb.Chunk) *chunkBuilder {
	b := &chunkBuilder{limit: limit}
	b.reset(header)
	return b
}

// reset starts a new chunk with header's identity fields.
func (b *chunkBuilder) reset(header *havenpb.Chunk) {
	b.chunk = header
	b.size = 256
	b.described = map[uint32]bool{}
}

// describe adds rel to the chunk's descriptors on its first use.
func (b *chunkBuilder) describe(rel *havenpb.Relation) {
	if !b.described[rel.Id] {
		b.described[rel.Id] = true
		b.chunk.Relations = append(b.chunk.Relations, rel)
		b.size += relationSize(rel)
	}
}

// add appends a change of rel (nil: the caller described its relations).
func (b *chunkBuilder) add(rel *havenpb.Relation, ch *havenpb.Change) {
	if rel != nil {
		b.describe(rel)
	}
	b.chunk.Changes = append(b.chunk.Changes, ch)
	b.size += changeSize(ch)
}

func (b *chunkBuilder) empty() bool { return len(b.chunk.Changes) == 0 }

// full reports whether the next change could push the chunk past its bound.
func (b *chunkBuilder) full() bool { return b.size >= b.limit }

func relationSize(r *havenpb.Relation) int {
	n := len(r.Schema) + len(r.Name) + 16
	for _, c := range r.Columns {
		n += len(c.Name) + len(c.Type) + 32
	}
	return n
}

func changeSize(ch *havenpb.Change) int {
	n := 16 + 8*len(ch.TruncateRelationIds)
	for _, row := range []*havenpb.Row{ch.Old, ch.New} {
		if row == nil {
			continue
		}
		for _, d := range row.Values {
			n += len(d.Text) + perValueOverhead
		}
	}
	return n
}
