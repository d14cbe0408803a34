package e2e

import (
	"testing"
	"time"
)

// TestAwkwardNamesReplicate: schemas, tables, columns and types whose names
// need quoting (spaces, upper case, quotes, reserved words, non-ASCII)
// arrive through the snapshot and the stream, keys updated included, and
// schema changes under such names are replayed on DR.
func TestAwkwardNamesReplicate(t *testing.T) {
	s := newSite(t)
	primary := connect(t, s.primaryURL())
	mustExec(t, primary, `
CREATE SCHEMA "Sales Team";
CREATE TYPE "Sales Team"."Deal Stage" AS ENUM ('new', 'won', 'lost');
CREATE TABLE "Sales Team"."Deal ""Big"" Ones" ("ID" bigint PRIMARY KEY, "Amount $" numeric(12,2), "select" text,
	"naïve note" text, "Stage" "Sales Team"."Deal Stage", "MixedCase" int);
CREATE TABLE "Sales Team"."Regions" ("Region" text, "Code" int, "Name" text, PRIMARY KEY ("Region", "Code"));
CREATE TABLE marker (id bigint PRIMARY KEY);
INSERT INTO "Sales Team"."Deal ""Big"" Ones"
	SELECT g, g * 1.5, 'sel ' || g, 'naïve ' || g, (ARRAY['new', 'won', 'lost'])[1 + g % 3]::"Sales Team"."Deal Stage", g FROM generate_series(1, 50) g;
INSERT INTO "Sales Team"."Regions" SELECT 'R' || (g % 5), g, 'region ' || g FROM generate_series(1, 30) g;`)

	startHaven(t, "agent", s.agentArgs()...)
	startHaven(t, "standby", s.standbyArgs()...)
	dr := connect(t, s.drURL())
	waitCaughtUp(t, primary, dr, 1, 60*time.Second)

	mustExec(t, primary, `
INSERT INTO "Sales Team"."Deal ""Big"" Ones" SELECT g, g * 2.5, 'new ' || g, 'ü ' || g, 'new', -g FROM generate_series(51, 80) g;
UPDATE "Sales Team"."Deal ""Big"" Ones" SET "Amount $" = "Amount $" + 1, "Stage" = 'won' WHERE "ID" % 4 = 0;
UPDATE "Sales Team"."Deal ""Big"" Ones" SET "ID" = "ID" + 1000 WHERE "ID" % 10 = 3;
DELETE FROM "Sales Team"."Deal ""Big"" Ones" WHERE "ID" % 7 = 0;
UPDATE "Sales Team"."Regions" SET "Region" = 'X' || "Region" WHERE "Code" % 3 = 0;
UPDATE "Sales Team"."Regions" SET "Name" = "Name" || ' (renamed)' WHERE "Code" % 3 = 1;
DELETE FROM "Sales Team"."Regions" WHERE "Code" % 5 = 2;`)
	// Schema changes under such names are replayed on DR.
	mustExec(t, primary, `ALTER TABLE "Sales Team"."Deal ""Big"" Ones" ADD COLUMN "Closed ""At""" timestamptz`)
	mustExec(t, primary, `ALTER TYPE "Sales Team"."Deal Stage" ADD VALUE 'on hold'`)
	mustExec(t, primary, `UPDATE "Sales Team"."Deal ""Big"" Ones" SET "Closed ""At""" = '2026-11-30 12:00+00', "Stage" = 'on hold' WHERE "ID" < 20`)
	waitCaughtUp(t, primary, dr, 2, 60*time.Second)
	assertEqual(t, primary, dr, map[string]string{
		`"Sales Team"."Deal ""Big"" Ones"`: `"ID"`,
		`"Sales Team"."Regions"`:           `"Region", "Code"`,
	})
}
