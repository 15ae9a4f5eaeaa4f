"""Database-level guard of statements: triggers refuse to change what a statement says (number,
period, document, total, hash, issue data), to delete a statement, or to take back ``paid``.
Only ``status``/``paid_ms`` and the e-mail bookkeeping may change. Installed (idempotently) by
:func:`hub.migrate.after_generate` on SQLite and PostgreSQL."""

from __future__ import annotations

from hub.db import Database

IMMUTABLE = ("number", "target", "site", "since_ms", "until_ms", "currency", "total", "document", "content_hash",
             "issued_ms", "issued_by")

_SQLITE = f"""
CREATE TRIGGER IF NOT EXISTS "statement_immutable" BEFORE UPDATE OF {", ".join(f'"{c}"' for c in IMMUTABLE)}
ON "statement" BEGIN SELECT RAISE(ABORT, 'statements are immutable'); END;
CREATE TRIGGER IF NOT EXISTS "statement_no_delete" BEFORE DELETE ON "statement"
BEGIN SELECT RAISE(ABORT, 'statements cannot be deleted'); END;
CREATE TRIGGER IF NOT EXISTS "statement_status" BEFORE UPDATE OF "status" ON "statement"
WHEN NEW."status" NOT IN ('issued', 'paid') OR (OLD."status" = 'paid' AND NEW."status" <> 'paid')
BEGIN SELECT RAISE(ABORT, 'a statement goes from issued to paid only'); END;
"""

_OLD = ", ".join(f'OLD."{c}"' for c in IMMUTABLE)
_NEW = ", ".join(f'NEW."{c}"' for c in IMMUTABLE)
_POSTGRES = f"""
CREATE OR REPLACE FUNCTION statement_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'statements cannot be deleted';
    END IF;
    IF ROW({_NEW}) IS DISTINCT FROM ROW({_OLD}) THEN
        RAISE EXCEPTION 'statements are immutable';
    END IF;
    IF NEW."status" NOT IN ('issued', 'paid') OR (OLD."status" = 'paid' AND NEW."status" <> 'paid') THEN
        RAISE EXCEPTION 'a statement goes from issued to paid only';
    END IF;
    RETURN NEW;
END $$;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'statement_guard'
                   AND tgrelid = 'statement'::regclass) THEN
        CREATE TRIGGER statement_guard BEFORE UPDATE OR DELETE ON "statement"
        FOR EACH ROW EXECUTE FUNCTION statement_guard();
    END IF;
END $$;
"""


async def install(db: Database) -> None:
    """Create the triggers if they are missing."""
    with db.activate():
        await db.conn.execute_script(_POSTGRES if db.dialect == "postgres" else _SQLITE)
