"""The orders database: a SQLite file built from seed data, and the read-only connection the bot's SQL runs on.

`create_database` writes customers, orders and items from `seed.json` into a new file. The bot's
queries go through `ReadOnlyDatabase.query`, which has three layers, each enough on its own for
writes: the query is checked by `sql_guard.check_select` (one SELECT, allowed tables, a LIMIT); the
file is opened with `mode=ro`; and an authorizer lets SQLite run nothing but SELECT, reads of
allowed tables and allowed functions. For reads, every table the query names is rewritten into its
scope in `CUSTOMER_SCOPES`, with the signed-in customer's id bound as `:customer_id`: a query sees
that customer's row, orders and items and nobody else's, and with no customer (None, bound as NULL)
it sees no rows at all. The application's own lookups (`order_owner`, `customer_email`) use bound
parameters, never text from the model.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from alignkit.errors import AlignkitError

from .sql_guard import ALLOWED_FUNCTIONS, SQLRefused, check_select

SEED_FILE = Path(__file__).with_name("seed.json")
ALLOWED_TABLES = frozenset({"customers", "orders", "items"})
MAX_ROWS = 20
CUSTOMER_SCOPES = {
    "customers": "SELECT * FROM customers WHERE id = :customer_id",
    "orders": "SELECT * FROM orders WHERE customer_id = :customer_id",
    "items": "SELECT * FROM items WHERE order_id IN (SELECT id FROM orders WHERE customer_id = :customer_id)",
}
"""What a model-written query reads in place of each table: the signed-in customer's rows only.
`= :customer_id` with NULL bound (no customer signed in) matches nothing."""
assert set(CUSTOMER_SCOPES) == ALLOWED_TABLES  # every table a query may name has a scope

SCHEMA = """
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL UNIQUE);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                     placed TEXT NOT NULL, status TEXT NOT NULL);
CREATE TABLE items (id INTEGER PRIMARY KEY, order_id INTEGER NOT NULL REFERENCES orders(id),
                    name TEXT NOT NULL, price REAL NOT NULL, quantity INTEGER NOT NULL);
"""


def load_seed(path: Path = SEED_FILE) -> dict:
    """The seed data: {"customers": [...], "orders": [...], "items": [...]}."""
    try:
        seed = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AlignkitError(f"{path}: cannot read the seed data: {e}") from None
    missing = [k for k in ("customers", "orders", "items") if k not in seed]
    if missing:
        raise AlignkitError(f"{path}: the seed data has no '{missing[0]}' list")
    return seed


def create_database(path: Path, seed: dict | None = None) -> Path:
    """Write a new orders database at `path` (replacing any file there) and return the path."""
    seed = seed or load_seed()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    try:
        con.executescript(SCHEMA)
        con.executemany("INSERT INTO customers VALUES (:id, :name, :email)", seed["customers"])
        con.executemany("INSERT INTO orders VALUES (:id, :customer_id, :placed, :status)", seed["orders"])
        con.executemany("INSERT INTO items VALUES (:id, :order_id, :name, :price, :quantity)", seed["items"])
        con.commit()
    finally:
        con.close()
    tmp.replace(path)  # a half-built database is never left under the real name
    return path


def authorize(action: int, arg1, arg2, db_name, trigger):
    # Called by SQLite for every operation a statement would perform, after our parser accepted it.
    if action == sqlite3.SQLITE_SELECT:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_READ:
        return sqlite3.SQLITE_OK if (arg1 or "").lower() in ALLOWED_TABLES else sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_OK if (arg2 or "").lower() in ALLOWED_FUNCTIONS | {"like", "glob"} else sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_DENY


class ReadOnlyDatabase:
    """The orders database as the bot sees it: checked SELECTs on a read-only connection."""

    def __init__(self, path: Path, *, max_rows: int = MAX_ROWS):
        self.path = Path(path)
        if not self.path.is_file():
            raise AlignkitError(f"{self.path}: no such database; create it with create_database()")
        self.max_rows = max_rows
        self._con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                    check_same_thread=False)
        self._con.row_factory = sqlite3.Row

    def query(self, sql: str, customer_id: int | None) -> list[dict]:
        """Rows of a model-written query as dicts, as seen by `customer_id` (the signed-in customer, from
        the session; None: no rows); SQLRefused when the query is not allowed or fails."""
        checked = check_select(sql, ALLOWED_TABLES, self.max_rows, CUSTOMER_SCOPES)
        self._con.set_authorizer(authorize)
        try:
            return [dict(row) for row in self._con.execute(checked, {"customer_id": customer_id}).fetchall()]
        except sqlite3.DatabaseError as e:  # includes "not authorized" and "readonly database"
            raise SQLRefused(f"the query failed: {e}") from None
        finally:
            self._con.set_authorizer(None)

    def _lookup(self, sql: str, params: tuple) -> sqlite3.Row | None:
        return self._con.execute(sql, params).fetchone()

    def order_owner(self, order_id: int) -> int | None:
        """The customer id an order belongs to; None when there is no such order."""
        row = self._lookup("SELECT customer_id FROM orders WHERE id = ?", (order_id,))
        return None if row is None else row["customer_id"]

    def customer_email(self, customer_id: int) -> str | None:
        """A customer's e-mail address; None when there is no such customer."""
        row = self._lookup("SELECT email FROM customers WHERE id = ?", (customer_id,))
        return None if row is None else row["email"]

    def close(self) -> None:
        self._con.close()
