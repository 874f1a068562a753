"""Turn the things a user points RAG at (files, folders, CSV, SQLite tables and queries) into clean text blocks.

Every reader yields `Document`s made of `Block`s: a block is a paragraph, list item, code block,
table row or PDF page paragraph, and carries the heading path it sits under and a locator
("line 12", "row 7", "page 3") so a chunk can be cited. Anything unreadable becomes a `Skipped`
entry with a reason a person can act on; the caller carries on with the next source.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

MARKDOWN_SUFFIXES = {".md", ".markdown", ".mdx"}
TEXT_SUFFIXES = {".txt", ".text", ".rst"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
SUPPORTED_SUFFIXES = MARKDOWN_SUFFIXES | TEXT_SUFFIXES | HTML_SUFFIXES | {".pdf", ".csv"}

# A source that reads rows bigger than this is cut off (and says so): a query is untrusted input
# and `SELECT * FROM huge_table` should not fill the disk with chunks by accident.
DEFAULT_MAX_ROWS = 200_000


@dataclass(frozen=True)
class Block:
    """One structural unit of a document: a paragraph, list item, code block, table row or page paragraph."""

    text: str
    heading_path: tuple[str, ...]
    locator: int
    """Line number (markdown, text), block number (HTML), row number (CSV, SQL) or page number (PDF); 1-based."""
    record: bool = False
    """True for a table row: it becomes a chunk of its own, never merged with its neighbours."""


@dataclass
class Document:
    """A readable source after extraction: what gets chunked, hashed and stored."""

    source: str
    """Absolute file path, or a normalised `sqlite:///...?table=` / `?query=` spec."""
    kind: str
    """markdown, text, html, pdf, csv or sqlite."""
    root: str
    """The source the user named (a folder, a file or a spec); a folder's vanished files are deleted by it."""
    content_hash: str
    """sha256 of the raw bytes (files) or of the row texts (SQL): unchanged hash, unchanged document."""
    blocks: list[Block]
    locator_unit: str
    """What `Block.locator` counts: line, block, row or page."""
    encoding: str = "utf-8"
    """The text encoding it was read with; anything but utf-8 is charset-normalizer's guess, and the
    ingest summary names it."""


@dataclass(frozen=True)
class Skipped:
    """A source, or part of one, that was not ingested, and why."""

    source: str
    reason: str
    location: str = ""
    """Where inside the source (e.g. "row 7"); empty when the whole source was skipped."""


@dataclass
class SourceScan:
    """One named source being read: its documents, read lazily one at a time, and what was skipped so far."""

    root: str
    documents: Iterator[Document] = field(default_factory=lambda: iter(()))
    """Read on demand, so a folder of any size never sits in memory at once."""
    skipped: list[Skipped] = field(default_factory=list)
    """Grows while `documents` is consumed."""
    complete: bool = True
    """False when the root itself is missing; then nothing indexed from it is deleted."""


Retriever = Callable[[str], list[str]]
"""A custom source: question -> passages, fused with the index at query time (see retrieve.search)."""


def scan_source(spec: str | os.PathLike, max_rows: int = DEFAULT_MAX_ROWS) -> SourceScan:
    """Read one named source: a file, a folder (walked recursively) or a `sqlite:///` spec."""
    if isinstance(spec, str) and spec.startswith("sqlite:"):
        return _scan_sqlite(spec, max_rows)
    path = Path(spec).expanduser().resolve()
    scan = SourceScan(root=str(path))
    if path.is_dir() or path.is_file():
        files = _walk(path) if path.is_dir() else iter([path])
        scan.documents = (
            doc for doc in (_read_file(file, scan.root, scan.skipped, max_rows) for file in files) if doc is not None
        )
    else:
        scan.complete = False
        scan.skipped.append(Skipped(str(path), "not found: no such file or folder"))
    return scan


def _walk(root: Path) -> Iterator[Path]:
    # Hidden entries (.git, .venv, editor swap files) are tooling, not documents; links are not
    # followed so a link back up the tree cannot loop.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _read_file(path: Path, root: str, skipped: list[Skipped], max_rows: int) -> Document | None:
    source = str(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        skipped.append(Skipped(source, f"unsupported file type {suffix or '(no suffix)'!r}"))
        return None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        skipped.append(Skipped(source, f"unreadable: {exc.strerror or exc}"))
        return None
    content_hash = hashlib.sha256(raw).hexdigest()
    if suffix == ".pdf":
        return _read_pdf(path, raw, content_hash, root, skipped)
    if b"\x00" in raw[:8192] and not raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        skipped.append(Skipped(source, "binary file (contains NUL bytes), not text"))
        return None
    try:
        text, encoding = _decode(raw, html=suffix in HTML_SUFFIXES)
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start : exc.start + 1].hex()
        reason = (f"bad encoding: not valid UTF-8 (byte 0x{bad} at offset {exc.start}) and no other encoding "
                  "fits; re-save the file as UTF-8")
        skipped.append(Skipped(source, reason))
        return None
    if suffix in MARKDOWN_SUFFIXES:
        kind, unit, blocks = "markdown", "line", markdown_blocks(text)
    elif suffix in TEXT_SUFFIXES:
        kind, unit, blocks = "text", "line", text_blocks(text)
    elif suffix in HTML_SUFFIXES:
        kind, unit, blocks = "html", "block", html_blocks(text)
    else:
        kind, unit = "csv", "row"
        blocks = _csv_blocks(text, path.stem, source, skipped, max_rows)
    return _unless_empty(Document(source, kind, root, content_hash, blocks, unit, encoding), skipped)


def _unless_empty(doc: Document, skipped: list[Skipped]) -> Document | None:
    if not any(b.text.strip() for b in doc.blocks):
        skipped.append(Skipped(doc.source, "empty document: no text after extraction"))
        return None
    return doc


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_\-:.]+)""", re.IGNORECASE)


def _decode(raw: bytes, html: bool) -> tuple[str, str]:
    """(text, encoding): UTF-8 (with or without BOM); for HTML the charset its <meta> tag declares;
    else the encoding charset-normalizer finds most plausible. UnicodeDecodeError (UTF-8's) when
    nothing fits, as for most binary files."""
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as exc:
        utf8_error = exc
    if html:
        declared = _META_CHARSET.search(raw[:4096])
        if declared:
            name = declared.group(1).decode("ascii")
            try:
                return raw.decode(name), name
            except (LookupError, UnicodeDecodeError):
                pass
    guessed = _guess_encoding(raw)
    if guessed is None:
        raise utf8_error
    return raw.decode(guessed), guessed


def _guess_encoding(raw: bytes) -> str | None:
    """charset-normalizer's guess. Short texts fit many single-byte code pages equally well (it
    cannot tell "café" in cp1252 from the same bytes in a Hebrew or Greek code page); among the
    equally plausible ones we take cp1252, the encoding of most old Windows exports, when it fits."""
    from charset_normalizer import from_bytes

    matches = list(from_bytes(raw))
    if not matches:
        return None
    best = min((m.chaos, -m.coherence) for m in matches)
    tied = [m for m in matches if (m.chaos, -m.coherence) == best]
    # A match stands for every code page that decodes the bytes to the same text.
    return "cp1252" if any("cp1252" in m.could_be_from_charset for m in tied) else tied[0].encoding


# ---------------------------------------------------------------- markdown and plain text

_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```+|~~~+)")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_LIST_ITEM = re.compile(r"^ {0,3}([-*+]|\d{1,9}[.)])[ \t]+")


def markdown_blocks(text: str) -> list[Block]:
    """Split Markdown into paragraph / list-item / code blocks under their ATX or setext heading path."""
    lines = text.splitlines()
    start = 0
    # YAML front matter is metadata for static-site tools, not prose to retrieve.
    if lines and lines[0].strip() == "---":
        for i in range(1, len(lines)):
            if lines[i].strip() in ("---", "..."):
                start = i + 1
                break
    blocks: list[Block] = []
    path: list[tuple[int, str]] = []  # (level, title) of the open headings
    para: list[str] = []
    para_line = 0
    fence: str | None = None

    def heading_path() -> tuple[str, ...]:
        return tuple(title for _, title in path)

    def flush() -> None:
        nonlocal para
        body = "\n".join(para).strip()
        if body:
            blocks.append(Block(body, heading_path(), para_line))
        para = []

    def open_heading(level: int, title: str) -> None:
        while path and path[-1][0] >= level:
            path.pop()
        if title:
            path.append((level, title))

    for number, line in enumerate(lines[start:], start=start + 1):
        if fence is not None:
            para.append(line)
            if line.strip().startswith(fence):
                fence = None
                flush()
            continue
        fence_match = _FENCE.match(line)
        if fence_match:
            flush()
            fence = fence_match.group(1)
            para, para_line = [line], number
            continue
        heading = _ATX_HEADING.match(line)
        if heading:
            flush()
            open_heading(len(heading.group(1)), heading.group(2).strip())
            continue
        setext = _SETEXT.match(line)
        if setext and len(para) == 1 and not _LIST_ITEM.match(para[0]):
            # "Title\n=====" is a level-1 heading, "Title\n-----" level 2.
            title = para[0].strip()
            para = []
            open_heading(1 if setext.group(1)[0] == "=" else 2, title)
            continue
        if not line.strip() or setext:
            # A rule under a longer paragraph (or after a blank line) is a thematic break.
            flush()
            continue
        if _LIST_ITEM.match(line) and para:
            # Each list item is its own block so a long list can be split between items.
            flush()
        if not para:
            para_line = number
        para.append(line)
    flush()
    return blocks


def text_blocks(text: str) -> list[Block]:
    """Plain text: paragraphs are separated by blank lines; there are no headings."""
    blocks: list[Block] = []
    para: list[str] = []
    para_line = 0
    for number, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip():
            if not para:
                para_line = number
            para.append(line.rstrip())
        elif para:
            blocks.append(Block("\n".join(para).strip(), (), para_line))
            para = []
    return blocks


# ---------------------------------------------------------------- HTML

# Content of these elements is page furniture (menus, banners, scripts), never an answer.
_DROPPED_TAGS = {
    "script", "style", "nav", "header", "footer", "aside", "noscript", "template",
    "svg", "iframe", "button", "select", "head", "form",
}
_DROPPED_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search"}
_VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
_BLOCK_TAGS = {
    "p", "div", "li", "ul", "ol", "pre", "blockquote", "table", "tr", "dt", "dd",
    "dl", "section", "article", "main", "figure", "figcaption", "br", "hr", "caption", "details",
    "summary", "body", "html",
}
_HEADING_TAGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}


class _HtmlExtractor(HTMLParser):
    """Collects visible text as blocks; drops furniture; keeps only <main> when a page has one."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, drops content, is main)
        self.dropped_depth = 0
        self.main_depth = 0
        self.pre_depth = 0
        self.heading: tuple[int, list[str]] | None = None
        self.path: list[tuple[int, str]] = []
        self.buffer: list[str] = []
        self.blocks: list[tuple[Block, bool]] = []  # (block, inside main)
        self.saw_main = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        drops = (
            tag in _DROPPED_TAGS
            or (attributes.get("role") or "") in _DROPPED_ROLES
            or "hidden" in attributes
            or (attributes.get("aria-hidden") or "") == "true"
        )
        is_main = tag == "main" or attributes.get("role") == "main"
        if tag in _BLOCK_TAGS or tag in _HEADING_TAGS:
            self._flush()
        if tag in _VOID_TAGS:
            return
        self.stack.append((tag, drops, is_main))
        self.dropped_depth += drops
        self.main_depth += is_main
        self.saw_main |= is_main
        self.pre_depth += tag == "pre"
        if tag in _HEADING_TAGS and not self.dropped_depth:
            self.heading = (_HEADING_TAGS[tag], [])
        if tag in ("td", "th") and "".join(self.buffer).strip():
            # Cells of one table row stay one block, like a CSV row.
            self.buffer.append(" | ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_TAGS or not any(open_tag == tag for open_tag, _, _ in self.stack):
            return
        if tag in _BLOCK_TAGS:
            # Before popping: the text belongs to the element being closed (and to <main> if inside it).
            self._flush()
        # Close everything up to the matching tag: real pages leave <p> and <li> unclosed.
        while self.stack:
            open_tag, drops, is_main = self.stack.pop()
            self.dropped_depth -= drops
            self.main_depth -= is_main
            self.pre_depth -= open_tag == "pre"
            if open_tag in _HEADING_TAGS and self.heading is not None:
                level, parts = self.heading
                self.heading = None
                title = " ".join("".join(parts).split())
                while self.path and self.path[-1][0] >= level:
                    self.path.pop()
                if title:
                    self.path.append((level, title))
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self.dropped_depth:
            return
        if self.heading is not None:
            self.heading[1].append(data)
        else:
            self.buffer.append(data)

    def _flush(self) -> None:
        raw = "".join(self.buffer)
        self.buffer = []
        text = raw.strip("\n") if self.pre_depth else " ".join(raw.split())
        if text.strip():
            heading_path = tuple(title for _, title in self.path)
            block = Block(text, heading_path, len(self.blocks) + 1)
            self.blocks.append((block, self.main_depth > 0))

    def result(self) -> list[Block]:
        self._flush()
        if self.saw_main:
            return [b for b, in_main in self.blocks if in_main]
        return [b for b, _ in self.blocks]


def html_blocks(html: str) -> list[Block]:
    """Visible article text of an HTML page, without navigation, header, footer, aside, script or style."""
    parser = _HtmlExtractor()
    parser.feed(html)
    parser.close()
    return parser.result()


# ---------------------------------------------------------------- PDF


def _read_pdf(path: Path, raw: bytes, content_hash: str, root: str, skipped: list[Skipped]) -> Document | None:
    source = str(path)
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        skipped.append(
            Skipped(source, "PDF support needs the optional package pypdf (pip install 'pypdf>=7.1,<8')")
        )
        return None
    try:
        reader = PdfReader(io.BytesIO(raw))
        if reader.is_encrypted:
            skipped.append(Skipped(source, "encrypted PDF: decrypt it first"))
            return None
        blocks: list[Block] = []
        for number, page in enumerate(reader.pages, start=1):
            page_text = page.extract_text() or ""
            for para in re.split(r"\n\s*\n", page_text):
                if para.strip():
                    blocks.append(Block(" ".join(para.split()), (), number))
    except (PdfReadError, ValueError, KeyError, OSError) as exc:
        skipped.append(Skipped(source, f"unreadable PDF: {exc}"))
        return None
    return _unless_empty(Document(source, "pdf", root, content_hash, blocks, "page"), skipped)


# ---------------------------------------------------------------- tables


def row_text(columns: list[str], values: list[object]) -> str:
    """A table row as text with its column names, e.g. "order_id: 17; customer: Ada; total: 23.5"."""
    return "; ".join(f"{c}: {'' if v is None else v}" for c, v in zip(columns, values))


def _csv_blocks(text: str, name: str, source: str, skipped: list[Skipped], max_rows: int) -> list[Block]:
    """Rows as blocks. A row the parser cannot read costs only itself: after a quote that never
    closes (or closes lines later, swallowing the rows between), the lines after the row's first
    line are read again as rows of their own, and the broken line is named in `skipped`."""
    sample = text[:8192]
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    lines = text.splitlines(keepends=True)
    blocks: list[Block] = []
    header: list[str] | None = None
    offset = 0  # lines before the one the current reader started on
    while offset < len(lines):
        reader = csv.reader(iter(lines[offset:]), dialect, strict=True)
        resume_after = None
        while resume_after is None:
            first_line = offset + reader.line_num + 1  # where the next row starts
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                skipped.append(Skipped(source, f"broken CSV row: {exc}; the lines after it were read on their own",
                                       f"line {first_line}"))
                resume_after = first_line
                continue
            last_line = offset + reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [h.strip() or f"column_{i + 1}" for i, h in enumerate(row)]
                continue
            if len(row) != len(header):
                if last_line > first_line:
                    reason = (f"broken CSV row: a quote opened here closes only on line {last_line}; the lines "
                              "after it were read on their own")
                    skipped.append(Skipped(source, reason, f"line {first_line}"))
                    resume_after = first_line
                    continue
                skipped.append(Skipped(source, f"broken CSV row: expected {len(header)} fields like the header, "
                                               f"got {len(row)}", f"line {last_line}"))
                continue
            if len(blocks) + 1 > max_rows:
                skipped.append(Skipped(source, f"row limit {max_rows} reached; later rows not read",
                                       f"line {last_line}"))
                return blocks
            blocks.append(Block(row_text(header, row), (name,), last_line, record=True))
        if resume_after is None:
            break
        offset = resume_after
    return blocks


def parse_sqlite_spec(spec: str) -> tuple[Path, str, str]:
    """`sqlite:///rel.db?table=t` or `sqlite:////abs/x.db?query=SELECT ...` -> (path, "table"|"query", value).

    As in SQLAlchemy URLs, three slashes then a relative path, four for an absolute one. The query is
    percent-decoded but "+" is kept literally, since it is an SQL operator.
    """
    if not spec.startswith("sqlite:///"):
        raise ValueError(f"{spec!r}: a SQLite source looks like sqlite:///path.db?table=NAME or ?query=SELECT ...")
    rest = spec[len("sqlite:///"):]
    location, sep, params = rest.partition("?")
    key, eq, value = params.partition("=")
    if not sep or not eq or key not in ("table", "query") or not value:
        raise ValueError(f"{spec!r}: name what to read with ?table=NAME or ?query=SELECT ...")
    return Path(unquote(location)).expanduser().resolve(), key, unquote(value)


def sqlite_spec(path: Path, key: str, value: str) -> str:
    """The normalised (absolute-path) spec under which a SQLite source is stored."""
    return f"sqlite:///{path}?{key}={value}"


def _scan_sqlite(spec: str, max_rows: int) -> SourceScan:
    try:
        path, key, value = parse_sqlite_spec(spec)
    except ValueError as exc:
        scan = SourceScan(root=spec, complete=False)
        scan.skipped.append(Skipped(spec, str(exc)))
        return scan
    source = sqlite_spec(path, key, value)
    scan = SourceScan(root=source)
    if not path.is_file():
        scan.skipped.append(Skipped(source, f"SQLite database not found: {path.name}"))
        return scan
    try:
        # mode=ro: a source database is never written; query_only also refuses writes that a
        # crafted query might try through a function or pragma.
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        scan.skipped.append(Skipped(source, f"cannot open SQLite database: {exc}"))
        return scan
    try:
        connection.execute("PRAGMA query_only = 1")
        if key == "table":
            exists = connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?", (value,)
            ).fetchone()
            if not exists:
                tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
                scan.skipped.append(Skipped(source, f"no table {value!r} in {path.name}; tables: {', '.join(tables) or 'none'}"))
                return scan
            quoted = '"' + value.replace('"', '""') + '"'
            cursor = connection.execute(f"SELECT * FROM {quoted}")
            heading = value
        else:
            if not value.lstrip().lower().startswith(("select", "with")):
                scan.skipped.append(Skipped(source, "only a single SELECT (or WITH ... SELECT) query is allowed"))
                return scan
            cursor = connection.execute(value)
            heading = "query"
        columns = [d[0] for d in cursor.description or []]
        rows = cursor.fetchmany(max_rows + 1)
    except sqlite3.Error as exc:
        scan.skipped.append(Skipped(source, f"SQL error: {exc}"))
        return scan
    finally:
        connection.close()
    if len(rows) > max_rows:
        scan.skipped.append(Skipped(source, f"row limit {max_rows} reached; later rows not read", f"row {max_rows + 1}"))
        rows = rows[:max_rows]
    blocks = [Block(row_text(columns, list(r)), (heading,), i, record=True) for i, r in enumerate(rows, start=1)]
    digest = hashlib.sha256()
    for block in blocks:
        digest.update(block.text.encode("utf-8") + b"\n")
    doc = _unless_empty(Document(source, "sqlite", source, digest.hexdigest(), blocks, "row"), scan.skipped)
    scan.documents = iter([doc] if doc else [])
    return scan
