package agent

import (
	"math/rand/v2"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/wire"
)

// chunkTestHeader is a transaction header with every identity field at a
// realistic, wide value.
func chunkTestHeader(index uint32) *havenpb.Chunk {
	return &havenpb.Chunk{FormatVersion: wire.FormatVersion, Kind: havenpb.Kind_KIND_TRANSACTION,
		SystemId: 7312345678901234567, Group: "customer_relationship_management_prod", Slot: "haven_customer_relationship_management_prod",
		Epoch: 12, Xid: 3123456789, CommitLsn: 0x3A_1B2C3D4E, CommitTimeUs: 1735689600123456, ChunkIndex: index}
}

// chunkTestRelations are tables as pgoutput describes them: typmod -1 for
// most types, user-defined types with high OIDs, key and NOT NULL flags.
func chunkTestRelations() []*havenpb.Relation {
	return []*havenpb.Relation{
		{Id: 16390, Schema: "public", Name: "customers", ReplicaIdentity: "d", Columns: []*havenpb.Column{
			{Name: "id", Type: "bigint", TypeOid: 20, TypeModifier: -1, Key: true, NotNull: true},
			{Name: "email", Type: "character varying(320)", TypeOid: 1043, TypeModifier: 324, NotNull: true},
			{Name: "name", Type: "text", TypeOid: 25, TypeModifier: -1},
			{Name: "status", Type: "customer_status", TypeOid: 16402, TypeModifier: -1, NotNull: true},
			{Name: "balance", Type: "numeric(12,2)", TypeOid: 1700, TypeModifier: 786438},
			{Name: "profile", Type: "jsonb", TypeOid: 3802, TypeModifier: -1},
			{Name: "created_at", Type: "timestamp with time zone", TypeOid: 1184, TypeModifier: -1, NotNull: true},
		}},
		{Id: 2147483650, Schema: "billing", Name: "invoice_lines", ReplicaIdentity: "f", Columns: []*havenpb.Column{
			{Name: "invoice_id", Type: "uuid", TypeOid: 2950, TypeModifier: -1, Key: true, NotNull: true},
			{Name: "line", Type: "integer", TypeOid: 23, TypeModifier: -1, Key: true, NotNull: true},
			{Name: "sku", Type: "text", TypeOid: 25, TypeModifier: -1, Key: true},
			{Name: "amount", Type: "numeric", TypeOid: 1700, TypeModifier: -1, Key: true},
		}},
	}
}

// chunkTestBytes backs every test value: only the length matters here.
var chunkTestBytes = []byte(strings.Repeat("x", 64<<10))

func chunkTestText(n int) *havenpb.Datum {
	return &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT, Text: chunkTestBytes[:n:n]}
}

// chunkTestSize draws value sizes the way tables hold them: mostly short,
// some medium, a few large (TOASTed) values.
func chunkTestSize(rng *rand.Rand) int {
	switch r := rng.IntN(100); {
	case r < 70:
		return rng.IntN(40)
	case r < 95:
		return 40 + rng.IntN(2000)
	default:
		return 2000 + rng.IntN(40000)
	}
}

func chunkTestChange(rng *rand.Rand, rel *havenpb.Relation) *havenpb.Change {
	newRow := &havenpb.Row{}
	for range rel.Columns {
		switch r := rng.IntN(10); {
		case r == 0:
			newRow.Values = append(newRow.Values, &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_NULL})
		case r == 1:
			newRow.Values = append(newRow.Values, &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT, Text: []byte{}})
		default:
			newRow.Values = append(newRow.Values, chunkTestText(chunkTestSize(rng)))
		}
	}
	switch rng.IntN(4) {
	case 0:
		return &havenpb.Change{Op: havenpb.Op_OP_INSERT, RelationId: rel.Id, New: newRow}
	case 1:
		for i := range newRow.Values {
			if !rel.Columns[i].Key && rng.IntN(3) == 0 {
				newRow.Values[i] = &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_UNCHANGED_TOAST}
			}
		}
		return &havenpb.Change{Op: havenpb.Op_OP_UPDATE, RelationId: rel.Id, New: newRow}
	case 2:
		old := proto.Clone(newRow).(*havenpb.Row)
		return &havenpb.Change{Op: havenpb.Op_OP_UPDATE, RelationId: rel.Id, Old: old, New: newRow}
	default:
		return &havenpb.Change{Op: havenpb.Op_OP_DELETE, RelationId: rel.Id, Old: newRow}
	}
}

func TestChunkBuilderDescribesRelationOncePerChunk(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	rels := chunkTestRelations()
	b := newChunkBuilder(1<<20, chunkTestHeader(0))
	for _, rel := range []*havenpb.Relation{rels[0], rels[0], rels[1], rels[0], rels[1]} {
		b.add(rel, chunkTestChange(rng, rel))
	}
	if got := len(b.chunk.Relations); got != 2 {
		t.Fatalf("%d relations described, want 2", got)
	}
	if b.chunk.Relations[0].Id != rels[0].Id || b.chunk.Relations[1].Id != rels[1].Id {
		t.Errorf("relations described in order %d, %d; want first use order", b.chunk.Relations[0].Id, b.chunk.Relations[1].Id)
	}
	if got := len(b.chunk.Changes); got != 5 {
		t.Errorf("%d changes, want 5", got)
	}
	if err := wire.Validate(b.chunk); err != nil {
		t.Errorf("built chunk is invalid: %v", err)
	}

	// A new chunk describes its relations again: it must stand alone.
	b.reset(chunkTestHeader(1))
	b.add(rels[1], chunkTestChange(rng, rels[1]))
	if got := len(b.chunk.Relations); got != 1 || b.chunk.Relations[0].Id != rels[1].Id {
		t.Fatalf("after reset, relations = %v, want only %d", b.chunk.Relations, rels[1].Id)
	}
	if err := wire.Validate(b.chunk); err != nil {
		t.Errorf("chunk after reset is invalid: %v", err)
	}
}

func TestChunkBuilderTruncateDescribesNothing(t *testing.T) {
	b := newChunkBuilder(1<<20, chunkTestHeader(0))
	b.add(nil, &havenpb.Change{Op: havenpb.Op_OP_TRUNCATE, TruncateRelationIds: []uint32{16390}})
	if len(b.chunk.Relations) != 0 || len(b.chunk.Changes) != 1 || b.empty() {
		t.Errorf("after a change without relation: %d relations, %d changes", len(b.chunk.Relations), len(b.chunk.Changes))
	}
}

func TestChunkBuilderFull(t *testing.T) {
	const limit = 4096
	rel := chunkTestRelations()[0]
	b := newChunkBuilder(limit, chunkTestHeader(0))
	if b.full() || !b.empty() {
		t.Fatalf("new builder: full %v, empty %v", b.full(), b.empty())
	}
	value := &havenpb.Datum{Kind: havenpb.DatumKind_DATUM_TEXT, Text: []byte(strings.Repeat("v", 50))}
	values := make([]*havenpb.Datum, len(rel.Columns))
	for i := range values {
		values[i] = value
	}
	added := 0
	for !b.full() {
		if added > limit {
			t.Fatal("builder never became full")
		}
		b.add(rel, &havenpb.Change{Op: havenpb.Op_OP_INSERT, RelationId: rel.Id, New: &havenpb.Row{Values: values}})
		added++
		if b.empty() {
			t.Fatal("empty after add")
		}
	}
	if added < 2 {
		t.Errorf("full after %d changes of a %d-byte limit", added, limit)
	}
	if b.size < limit {
		t.Errorf("full at an estimated %d bytes, below the %d limit", b.size, limit)
	}
	// The estimate passed the limit with the last change, not before.
	last := b.chunk.Changes[len(b.chunk.Changes)-1]
	if before := b.size - changeSize(last); before >= limit {
		t.Errorf("estimate was %d before the last change, already at the %d limit", before, limit)
	}
	// More changes keep it full.
	b.add(rel, &havenpb.Change{Op: havenpb.Op_OP_INSERT, RelationId: rel.Id, New: &havenpb.Row{Values: values}})
	if !b.full() {
		t.Error("no longer full after another change")
	}

	b.reset(chunkTestHeader(1))
	if b.full() || !b.empty() || len(b.chunk.Relations) != 0 || len(b.chunk.Changes) != 0 || len(b.described) != 0 {
		t.Errorf("after reset: full %v, empty %v, %d relations, %d changes, %d described",
			b.full(), b.empty(), len(b.chunk.Relations), len(b.chunk.Changes), len(b.described))
	}
	if b.chunk.ChunkIndex != 1 {
		t.Errorf("after reset, chunk index %d, want the new header's 1", b.chunk.ChunkIndex)
	}
}

// chunkTestFramedSize is what one element of a repeated message field adds
// to its chunk's encoding.
func chunkTestFramedSize(m proto.Message, field protowire.Number) int {
	return protowire.SizeTag(field) + protowire.SizeBytes(proto.Size(m))
}

// The limit guards the stream's maximum message size, so the estimate must
// never be below what the chunk really encodes to.
func TestChunkBuilderEstimateIsUpperBound(t *testing.T) {
	const (
		relationsField = 13
		changesField   = 14
	)
	finished := func(c *havenpb.Chunk) *havenpb.Chunk {
		// flushChunk sets these on the last chunk; they count too.
		c.LastChunk = true
		c.Heartbeat = &havenpb.Heartbeat{EmittedAtUs: 1735689600123456, WalLsn: 0x3A_1B2C3D4E}
		return c
	}
	for seed := range uint64(5) {
		rng := rand.New(rand.NewPCG(seed, 99))
		rels := chunkTestRelations()
		b := newChunkBuilder(256<<10, finished(chunkTestHeader(0)))
		// The encoded size, kept up to date change by change: proto.Size
		// of the whole chunk after every change would be quadratic.
		encoded := proto.Size(b.chunk)
		chunks, minSlack := 0, b.size
		for range 2000 {
			rel := rels[rng.IntN(len(rels))]
			described := len(b.chunk.Relations)
			ch := chunkTestChange(rng, rel)
			b.add(rel, ch)
			if len(b.chunk.Relations) > described {
				encoded += chunkTestFramedSize(rel, relationsField)
			}
			encoded += chunkTestFramedSize(ch, changesField)
			if encoded > b.size {
				t.Fatalf("seed %d: chunk of %d changes encodes to %d bytes, estimate %d", seed, len(b.chunk.Changes), encoded, b.size)
			}
			minSlack = min(minSlack, b.size-encoded)
			if b.full() {
				payload, _, err := wire.Encode(b.chunk, wire.Plain)
				if err != nil {
					t.Fatal(err)
				}
				if len(payload) != encoded {
					t.Fatalf("seed %d: test bookkeeping says %d bytes, wire.Encode gives %d", seed, encoded, len(payload))
				}
				chunks++
				b.reset(finished(chunkTestHeader(uint32(chunks))))
				encoded = proto.Size(b.chunk)
			}
		}
		if chunks < 3 {
			t.Fatalf("seed %d: only %d chunks filled", seed, chunks)
		}
		t.Logf("seed %d: %d chunks, estimate at least %d bytes above the encoded size", seed, chunks, minSlack)
	}
}
