package replicator

import (
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/haven-dr/haven/internal/pgtest"
	"github.com/haven-dr/haven/proto/wire"
)

// TestBinaryParamsMeanWhatTheirTextMeans: every text form PostgreSQL
// prints for the types sent in binary converts, and DR reads the binary
// value as the same value as the text; forms outside the converted ones go
// as text.
func TestBinaryParamsMeanWhatTheirTextMeans(t *testing.T) {
	pg := pgtest.New(t)
	cfg, err := pgx.ParseConfig(pg.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range wire.TextFormatSettings {
		cfg.RuntimeParams[k] = v
	}
	conn, err := pgx.ConnectConfig(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(t.Context())

	// same converts text as a parameter of type oid and reports whether DR
	// reads it as the text's value.
	same := func(t *testing.T, oid uint32, text string) (converted bool) {
		t.Helper()
		bin, ok := binaryEncoders[oid](nil, []byte(text))
		if !ok {
			return false
		}
		res := conn.PgConn().ExecParams(t.Context(), "SELECT $1 = $2", [][]byte{bin, []byte(text)}, []uint32{oid, oid}, []int16{1, 0}, nil).Read()
		if res.Err != nil {
			t.Fatalf("%q as %d: %v", text, oid, res.Err)
		}
		if got := string(res.Rows[0][0]); got != "t" {
			t.Errorf("%q as type %d: DR reads its binary form (% x) as another value", text, oid, bin)
		}
		return true
	}

	// Text forms as PostgreSQL prints them, under the time zones given.
	printed := []struct {
		oid   uint32
		zones []string
		sql   string
	}{
		{timestamptzOID, []string{"UTC", "Asia/Kolkata", "America/St_Johns", "Europe/Amsterdam", "Pacific/Chatham"},
			`SELECT (timestamptz '0001-01-01 00:00:00+00' + random() * interval '3652000 days')::text FROM generate_series(1, 400)
			 UNION ALL SELECT (timestamptz '1900-01-01' + g * interval '1 year 17 days 3 hours 0.5 seconds')::text FROM generate_series(0, 200) g
			 UNION ALL VALUES ('2000-01-01 00:00:00+00'), ('9999-12-31 23:59:59.999999+00'), ('0001-01-01 00:00:00+00'), ('2024-02-29 12:00:00.1+00')`},
		{timestampOID, []string{"UTC"},
			`SELECT (timestamp '0001-01-01' + random() * interval '3652000 days')::text FROM generate_series(1, 400)
			 UNION ALL VALUES ('2000-01-01 00:00:00'), ('1999-12-31 23:59:59.000001'), ('9999-12-31 23:59:59.999999'), ('1600-02-29 00:00:00')`},
		{dateOID, []string{"UTC"},
			`SELECT (date '0001-01-01' + (random() * 3652000)::int)::text FROM generate_series(1, 400)
			 UNION ALL VALUES ('2000-01-01'), ('1999-12-31'), ('0001-01-01'), ('9999-12-31'), ('2000-02-29'), ('1900-02-28')`},
		{int2OID, []string{"UTC"}, `SELECT ((random() - 0.5) * 65535)::int2::text FROM generate_series(1, 200) UNION ALL VALUES ('-32768'), ('32767'), ('0')`},
		{int4OID, []string{"UTC"}, `SELECT ((random() - 0.5) * 4294967295)::int4::text FROM generate_series(1, 200) UNION ALL VALUES ('-2147483648'), ('2147483647')`},
		{int8OID, []string{"UTC"}, `SELECT ((random() - 0.5) * 1.8e19)::int8::text FROM generate_series(1, 200) UNION ALL VALUES ('-9223372036854775808'), ('9223372036854775807')`},
	}
	for _, p := range printed {
		for _, zone := range p.zones {
			t.Run(fmt.Sprintf("%d in %s", p.oid, zone), func(t *testing.T) {
				if _, err := conn.Exec(t.Context(), "SET TimeZone = "+pgx.Identifier{zone}.Sanitize()+"; SELECT setseed(0.5)"); err != nil {
					t.Fatal(err)
				}
				rows, err := conn.Query(t.Context(), p.sql)
				if err != nil {
					t.Fatal(err)
				}
				texts, err := pgx.CollectRows(rows, pgx.RowTo[string])
				if err != nil {
					t.Fatal(err)
				}
				for _, text := range texts {
					if !same(t, p.oid, text) {
						t.Errorf("%q (type %d) goes as text: every form PostgreSQL prints for years 1 to 9999 should convert", text, p.oid)
					}
				}
			})
		}
	}
	if _, err := conn.Exec(t.Context(), "SET TimeZone = 'UTC'"); err != nil {
		t.Fatal(err)
	}

	// Forms that go as text, and a few valid ones next to them.
	for _, c := range []struct {
		oid     uint32
		text    string
		convert bool
	}{
		{timestamptzOID, "infinity", false},
		{timestamptzOID, "-infinity", false},
		{timestamptzOID, "0001-01-01 00:00:00+00 BC", false},
		{timestamptzOID, "10000-01-01 00:00:00+00", false},
		{timestamptzOID, "2024-01-01 00:00:00", false}, // no offset: DR's TimeZone decides
		{timestamptzOID, "2024-01-01 24:00:00+00", false},
		{timestamptzOID, "2024-01-01 12:00:60+00", false},
		{timestamptzOID, "2024-01-01 12:00:00.1234567+00", false},
		{timestamptzOID, "2024-01-01 12:00:00.+00", false},
		{timestamptzOID, "2024-01-01 12:00:00+5", false},
		{timestamptzOID, "2024-01-01 12:00:00+05:3", false},
		{timestamptzOID, "2024-01-01 12:00:00+16", false},
		{timestamptzOID, "2024-01-01 12:00:00-15:59:59", true},
		{timestamptzOID, "2024-01-01T12:00:00+00", false},
		{timestamptzOID, "2023-02-29 12:00:00+00", false},
		{timestamptzOID, "2024-01-01 12:00:00-09:30", true},
		{timestamptzOID, "2024-01-01 12:00:00.5+14:00", true},
		{timestamptzOID, "1850-06-01 00:00:00+00:19:32", true},
		{timestampOID, "2024-01-01 12:00:00+00", false},
		{timestampOID, "01/02/2024 12:00:00", false},
		{timestampOID, "2024-12-31 23:59:59.5", true},
		{dateOID, "2024-01-01 BC", false},
		{dateOID, "2024-13-01", false},
		{dateOID, "2024-04-31", false},
		{dateOID, "20240101", false},
		{dateOID, "infinity", false},
		{int2OID, "32768", false},
		{int2OID, "-32769", false},
		{int2OID, "+12", true},
		{int4OID, "2147483648", false},
		{int8OID, "9223372036854775808", false},
		{int8OID, "-9223372036854775809", false},
		{int8OID, "99999999999999999999", false},
		{int8OID, "1.0", false},
		{int8OID, "1e3", false},
		{int8OID, " 1", false},
		{int8OID, "-", false},
		{int8OID, "", false},
		{int8OID, "-0", true},
	} {
		if got := same(t, c.oid, c.text); got != c.convert {
			t.Errorf("%q as type %d: converted %v, want %v", c.text, c.oid, got, c.convert)
		}
	}
}

// TestParamEncodingKeepsEarlierValues: values converted into the shared
// buffer stay what they were while later ones are added, NULLs stay NULL,
// and values that do not convert stay text.
func TestParamEncodingKeepsEarlierValues(t *testing.T) {
	var e paramEncoding
	oids := []uint32{int8OID, 25, timestamptzOID, int8OID, int4OID}
	binary := binaryParams(oids)
	if len(binary) != 4 {
		t.Fatalf("binary params of %v: %d, want 4", oids, len(binary))
	}
	for round := range 3 {
		params := [][]byte{[]byte(fmt.Sprint(round + 1)), []byte("text"), []byte("2000-01-01 00:00:01+00"), nil, []byte("x")}
		values, formats := e.encode(params, binary)
		want := [][]byte{{0, 0, 0, 0, 0, 0, 0, byte(round + 1)}, []byte("text"), {0, 0, 0, 0, 0, 0x0f, 0x42, 0x40}, nil, []byte("x")}
		wantFormats := []int16{1, 0, 1, 0, 0}
		for i := range want {
			if string(values[i]) != string(want[i]) || (values[i] == nil) != (want[i] == nil) || formats[i] != wantFormats[i] {
				t.Errorf("round %d, param %d: % x format %d, want % x format %d", round, i, values[i], formats[i], want[i], wantFormats[i])
			}
		}
		if string(params[0]) != fmt.Sprint(round+1) {
			t.Errorf("the statement's own parameters changed: %q", params[0])
		}
	}
}
