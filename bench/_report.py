"""Shared by the benchmark scripts: each writes its own section of docs/benchmarks.md."""
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(name, text):
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` (append the section
    when it is not there yet); the other sections stay as they are."""
    begin, end = "<!-- %s:begin -->" % name, "<!-- %s:end -->" % name
    cur = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = "%s\n%s\n%s" % (begin, text.strip(), end)
    if begin in cur and end in cur:
        cur = cur[:cur.index(begin)] + block + cur[cur.index(end) + len(end):]
    else:
        cur = cur.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(cur)


def publish(name, text, write=True):
    """Print a benchmark's section and, unless write is false (--no-write), put it in docs/benchmarks.md."""
    print(text)
    if write:
        write_section(name, text)
