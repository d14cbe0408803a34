package wire

// RowsDigest is the query, a template for PostgreSQL's format() with the
// table's columns in name order (quoted, comma-separated), its schema and
// its name, that describes a table's rows: their number, and the sum of
// the first 64 bits of an md5 of each row's text. The agent records it for
// a table a DDL rewrote, and the standby compares it with DR's after
// replaying that DDL. Both run it under the same settings, so that values
// print the same on both sides.
const RowsDigest = `SELECT count(*), coalesce(sum(('x' || left(md5(ROW(%s)::text), 16))::bit(64)::bigint), 0)::text FROM ONLY %I.%I`
