"""The checks a model-written SQL query passes before it reaches the orders database.

Generated SQL is untrusted input. `check_select` parses it with sqlglot and accepts exactly one
plain SELECT that reads only allowed tables and calls only allowed functions; it returns the query
rewritten with a LIMIT of at most `max_rows`. Anything else raises `SQLRefused`, whose message is
shown to the model as the observation of its step.

Given `scopes` (table name -> a SELECT on that table with a bound parameter, see `db.CUSTOMER_SCOPES`),
`check_select` also rewrites every table reference into that subquery, under the alias the query
used (or the table's own name), so a query sees only the rows the scope lets through, however it
joins, filters or nests. The value of the parameter is bound when the query runs, never written
into the SQL text, and the query may not carry parameters of its own.

Parsing is the first line only. The connection that runs the query is opened read-only and carries
an authorizer (`db.py`), so a query that slipped past the parser could still neither write nor
read outside the allowed tables.
"""

from __future__ import annotations

import sqlglot
from sqlglot import exp

from alignkit.apps.agents.tools import ToolError

ALLOWED_FUNCTIONS = frozenset({
    "count", "sum", "min", "max", "avg", "lower", "upper", "length", "coalesce", "ifnull", "round",
    "abs", "substr", "trim", "date", "strftime",
})
"""Functions a query may call: aggregates and plain string, number and date helpers. Nothing that
touches the file system, the schema or extensions (load_extension, readfile, ...)."""


class SQLRefused(ToolError):
    """A query that is not a single, read-only SELECT on the allowed tables; the message says why."""


def _statements(sql: str) -> list[exp.Expression]:
    try:
        statements = [s for s in sqlglot.parse(sql, read="sqlite") if s is not None]
    except sqlglot.errors.ParseError as e:
        first = str(e).splitlines()[0]
        raise SQLRefused(f"the SQL does not parse: {first}") from None
    if not statements:
        raise SQLRefused("the SQL is empty; write one SELECT statement")
    return statements


def scope_tables(query: exp.Select, scopes: dict[str, str]) -> exp.Select:
    """`query` with every table reference replaced by its scoping subquery, keeping the alias.

    `FROM orders o` becomes `FROM (<scopes["orders"]>) AS o`, `JOIN items` becomes
    `JOIN (<scopes["items"]>) AS items`, in subqueries too, so `o.id` and `items.name` still resolve.
    A table without a scope is refused: nothing is read unscoped.
    """
    scoping = {name.lower(): sqlglot.parse_one(text, read="sqlite") for name, text in scopes.items()}
    for table in list(query.find_all(exp.Table)):  # listed first: the subqueries' own tables stay as they are
        scope = scoping.get(table.name.lower())
        if scope is None:
            raise SQLRefused(f"table '{table.name}' is not available")
        alias = table.args.get("alias")
        if alias is not None and alias.columns:
            raise SQLRefused(f"'{table.sql('sqlite')}': column lists in a table alias are not allowed")
        name = alias.this if alias is not None else table.this  # identifiers, quoting kept
        replacement = exp.Subquery(this=scope.copy(), alias=exp.TableAlias(this=name.copy()))
        table.replace(replacement)
    return query


def check_select(sql: str, allowed_tables: frozenset[str], max_rows: int,
                 scopes: dict[str, str] | None = None) -> str:
    """The query as it will run (with a LIMIT of at most `max_rows`, and every table read through its
    scope when `scopes` is given); SQLRefused when it is not allowed."""
    statements = _statements(sql)
    if len(statements) > 1:
        raise SQLRefused(f"only one statement is allowed, found {len(statements)} (separated by ';')")
    query = statements[0]
    if isinstance(query, exp.SetOperation):
        raise SQLRefused(f"{query.key.upper()} is not allowed; write one SELECT")
    if not isinstance(query, exp.Select):
        kind = type(query).__name__.upper()
        raise SQLRefused(f"only SELECT queries are allowed, not {kind}; the database is read-only")
    if query.find(exp.CTE):
        raise SQLRefused("WITH (common table expressions) is not allowed; write a plain SELECT")
    # Every table anywhere in the tree, subqueries included: a UNION or a subquery on sqlite_master
    # is caught here, not only the FROM clause.
    for table in query.find_all(exp.Table):
        if table.name.lower() not in allowed_tables:
            raise SQLRefused(f"table '{table.name}' is not available; the tables are "
                             f"{', '.join(sorted(allowed_tables))}")
        if table.args.get("db") or table.args.get("catalog"):
            raise SQLRefused(f"'{table.sql('sqlite')}': name tables without a schema prefix")
    for node in query.find_all(exp.Union, exp.Intersect, exp.Except):
        raise SQLRefused(f"{type(node).__name__.upper()} is not allowed; write one SELECT")
    # Functions sqlglot does not know come out as Anonymous: load_extension, readfile, ... The
    # authorizer refuses unknown functions too; this gives the model a clearer message.
    for func in query.find_all(exp.Anonymous):
        if func.name.lower() not in ALLOWED_FUNCTIONS:
            raise SQLRefused(f"function '{func.name}' is not allowed")
    # The only parameters are the ones the scopes bind; a query's own (?, :name, @name) are refused.
    for _ in query.find_all(exp.Placeholder, exp.Parameter):
        raise SQLRefused("parameters (?, :name) are not allowed; write values as literals")
    if scopes is not None:
        query = scope_tables(query, scopes)
    limit = query.args.get("limit")
    current = limit.expression if limit is not None else None
    if not (isinstance(current, exp.Literal) and current.is_int and int(current.this) <= max_rows):
        query = query.limit(max_rows)  # no LIMIT, a larger one, or an expression: the cap applies
    return query.sql(dialect="sqlite")
