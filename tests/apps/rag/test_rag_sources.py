"""Source readers: clean HTML text, Markdown structure, CSV and SQLite rows, PDF, and clear reasons for bad input."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

from alignkit.apps.rag.sources import html_blocks, markdown_blocks, parse_sqlite_spec, scan_source

PAGE = """<!DOCTYPE html><html><head><title>T</title><style>p { color: red }</style>
<script>var tracking = "SCRIPT NOISE";</script></head><body>
<header>Site banner</header><nav><a href="/">Home</a> | <a href="/x">Menu item</a></nav>
<div role="navigation">Breadcrumbs</div>
<main><h1>Refunds</h1><p>Refunds take <b>5 days</b>.<p>Contact&nbsp;support &amp; wait.</p>
<h2>Exceptions</h2><ul><li>Gift cards<li>Sale items</ul>
<table><tr><th>Item</th><th>Days</th></tr><tr><td>Shoes</td><td>30</td></tr></table>
<p hidden>hidden text</p><aside>Related links</aside></main>
<footer>Copyright</footer><script>more()</script></body></html>"""


def test_html_keeps_article_text_and_drops_page_furniture():
    blocks = html_blocks(PAGE)
    texts = [b.text for b in blocks]
    assert texts == ["Refunds take 5 days.", "Contact support & wait.", "Gift cards", "Sale items", "Item | Days", "Shoes | 30"]
    assert blocks[0].heading_path == ("Refunds",)
    assert blocks[2].heading_path == ("Refunds", "Exceptions")
    joined = " ".join(texts)
    for noise in ("SCRIPT NOISE", "color", "banner", "Menu item", "Breadcrumbs", "hidden text", "Related", "Copyright"):
        assert noise not in joined


def test_html_without_main_keeps_body_text():
    blocks = html_blocks("<body><nav>menu</nav><div><h2>Title</h2><p>Body text</p></div><footer>f</footer></body>")
    assert [(b.text, b.heading_path) for b in blocks] == [("Body text", ("Title",))]


def test_markdown_headings_code_fences_and_front_matter():
    text = "---\ntitle: x\n---\nIntro\n\nSetup\n=====\n\n- one\n- two\n\n```\n# not a heading\n```\n### Deep ###\ntext"
    blocks = markdown_blocks(text)
    assert [(b.text, b.heading_path, b.locator) for b in blocks] == [
        ("Intro", (), 4),
        ("- one", ("Setup",), 9),
        ("- two", ("Setup",), 10),
        ("```\n# not a heading\n```", ("Setup",), 12),
        ("text", ("Setup", "Deep"), 16),
    ]


def test_bad_files_are_skipped_with_reasons_and_the_rest_is_read(tmp_path):
    (tmp_path / "good.md").write_text("# Good\n\nReadable text.", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "empty.md").write_text("   \n\n", encoding="utf-8")
    (tmp_path / "nav-only.html").write_text("<nav>menu</nav><script>x()</script>", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "broken.csv").write_text('id,name\n1,ok\n2,too,many\n"3,unterminated\n', encoding="utf-8")
    (tmp_path / ".hidden.md").write_text("ignored", encoding="utf-8")
    scan = scan_source(tmp_path)
    documents = list(scan.documents)
    assert sorted(d.source.rsplit("/", 1)[1] for d in documents) == ["broken.csv", "good.md", "latin1.txt"]
    reasons = {(s.source.rsplit("/", 1)[1], s.location): s.reason for s in scan.skipped}
    assert not any(file == "latin1.txt" for file, _ in reasons)
    latin1 = next(d for d in documents if d.source.endswith("latin1.txt"))
    assert latin1.encoding == "cp1252" and latin1.blocks[0].text == "café au lait"
    assert reasons[("blob.txt", "")] == "binary file (contains NUL bytes), not text"
    assert reasons[("empty.md", "")] == "empty document: no text after extraction"
    assert reasons[("nav-only.html", "")] == "empty document: no text after extraction"
    assert reasons[("image.png", "")] == "unsupported file type '.png'"
    assert reasons[("broken.csv", "line 3")] == "broken CSV row: expected 2 fields like the header, got 3"
    assert reasons[("broken.csv", "line 4")].startswith("broken CSV row: unexpected end of data")
    csv_doc = next(d for d in documents if d.kind == "csv")
    assert [b.text for b in csv_doc.blocks] == ["id: 1; name: ok"]


def test_missing_source_is_reported_not_raised(tmp_path):
    scan = scan_source(tmp_path / "nope")
    assert not list(scan.documents) and not scan.complete
    assert scan.skipped[0].reason == "not found: no such file or folder"


@pytest.fixture
def shop_db(tmp_path):
    path = tmp_path / "shop.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE orders (id INTEGER, customer TEXT, total REAL)")
        db.executemany("INSERT INTO orders VALUES (?, ?, ?)", [(1, "Ada", 23.5), (2, "Grace", None), (3, "Alan", 9.0)])
    return path


def test_sqlite_table_and_query_rows_become_text_with_column_names(shop_db):
    table = scan_source(f"sqlite:///{shop_db}?table=orders")
    [doc] = table.documents
    assert doc.source == f"sqlite:///{shop_db}?table=orders" and doc.kind == "sqlite"
    assert [b.text for b in doc.blocks] == [
        "id: 1; customer: Ada; total: 23.5", "id: 2; customer: Grace; total: ", "id: 3; customer: Alan; total: 9.0",
    ]
    assert all(b.record and b.heading_path == ("orders",) for b in doc.blocks)
    query = scan_source(f"sqlite:///{shop_db}?query=SELECT%20customer%2C%20total%20FROM%20orders%20WHERE%20total+1%20%3E%2020")
    assert [b.text for b in next(query.documents).blocks] == ["customer: Ada; total: 23.5"]


def test_sqlite_problems_are_reported(shop_db, tmp_path):
    missing_table = scan_source(f"sqlite:///{shop_db}?table=invoices")
    assert missing_table.skipped[0].reason == "no table 'invoices' in shop.db; tables: orders"
    missing_db = scan_source(f"sqlite:///{tmp_path}/other.db?table=orders")
    assert missing_db.skipped[0].reason == "SQLite database not found: other.db"
    bad_sql = scan_source(f"sqlite:///{shop_db}?query=SELECT nope FROM orders")
    assert bad_sql.skipped[0].reason.startswith("SQL error: no such column: nope")
    write = scan_source(f"sqlite:///{shop_db}?query=DELETE FROM orders")
    assert write.skipped[0].reason == "only a single SELECT (or WITH ... SELECT) query is allowed"
    sneaky = scan_source(f"sqlite:///{shop_db}?query=WITH x AS (SELECT 1) DELETE FROM orders")
    assert sneaky.skipped[0].reason.startswith("SQL error")  # the read-only connection refuses it
    assert len(next(scan_source(f"sqlite:///{shop_db}?table=orders").documents).blocks) == 3
    with pytest.raises(ValueError, match="table=NAME"):
        parse_sqlite_spec(f"sqlite:///{shop_db}")


def test_sqlite_spec_paths_follow_sqlalchemy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_sqlite_spec("sqlite:///data/x.db?table=t") == (tmp_path / "data" / "x.db", "table", "t")
    assert parse_sqlite_spec("sqlite:////abs/x.db?query=SELECT+1") == (Path("/abs/x.db"), "query", "SELECT+1")


def _tiny_pdf(text: str) -> bytes:
    """A one-page PDF that draws `text` in Helvetica, with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_pdf_text_by_page(tmp_path):
    (tmp_path / "manual.pdf").write_bytes(_tiny_pdf("Hold the reset button for ten seconds."))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    scan = scan_source(tmp_path)
    [doc] = scan.documents
    assert doc.kind == "pdf" and doc.locator_unit == "page"
    assert [(b.text, b.locator) for b in doc.blocks] == [("Hold the reset button for ten seconds.", 1)]
    [skip] = scan.skipped
    assert skip.source.endswith("broken.pdf") and skip.reason.startswith("unreadable PDF")


def test_pdf_without_pypdf_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pypdf", None)  # makes `import pypdf` raise ImportError
    (tmp_path / "manual.pdf").write_bytes(_tiny_pdf("text"))
    scan = scan_source(tmp_path / "manual.pdf")
    assert list(scan.documents) == []
    [skip] = scan.skipped
    assert "optional package pypdf" in skip.reason and "pip install" in skip.reason


def test_csv_quote_that_never_closes_costs_only_its_line(tmp_path):
    """Line 3 opens a quote it never closes: rows 2, 4 and 5 are read, line 3 is named."""
    (tmp_path / "t.csv").write_text('city,note\nOslo,cold\nBergen,"rainy\nTromso,dark\nParis,warm\n', encoding="utf-8")
    scan = scan_source(tmp_path / "t.csv")
    (doc,) = list(scan.documents)
    assert [(b.text, b.locator) for b in doc.blocks] == [
        ("city: Oslo; note: cold", 2), ("city: Tromso; note: dark", 4), ("city: Paris; note: warm", 5)]
    assert [(s.location, s.reason.split(";")[0]) for s in scan.skipped] == [
        ("line 3", "broken CSV row: unexpected end of data")]


def test_csv_quote_that_closes_lines_later_gives_back_the_rows_it_swallowed(tmp_path):
    """The quote opened on line 2 closes on line 4 and makes one row of four fields of lines 2-4;
    line 3 is a good row of its own and comes back."""
    (tmp_path / "t.csv").write_text('id,name,total\n1,"Ada,5\n2,Bob,7\n3,Cy",9,x\n4,Di,1\n', encoding="utf-8")
    scan = scan_source(tmp_path / "t.csv")
    (doc,) = list(scan.documents)
    assert [b.text for b in doc.blocks] == ["id: 2; name: Bob; total: 7", "id: 4; name: Di; total: 1"]
    assert [s.location for s in scan.skipped] == ["line 2", "line 4"]
    assert "closes only on line 4" in scan.skipped[0].reason and "got 4" in scan.skipped[1].reason


@pytest.mark.parametrize("text,encoding,expected", [
    ("Grüße aus München, schöne Straße.", "latin-1", "cp1252"),
    ("Привет, как дела? Это тест кодировки.", "cp1251", "cp1251"),
])
def test_non_utf8_text_is_read_with_a_detected_encoding(tmp_path, text, encoding, expected):
    (tmp_path / "old.txt").write_bytes(text.encode(encoding))
    (doc,) = list(scan_source(tmp_path / "old.txt").documents)
    assert (doc.encoding, doc.blocks[0].text) == (expected, text)


def test_binary_without_nul_bytes_is_still_refused(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xd8" + bytes(range(128, 256)))
    scan = scan_source(tmp_path / "x.txt")
    assert list(scan.documents) == [] and scan.skipped[0].reason.startswith("bad encoding: not valid UTF-8")
