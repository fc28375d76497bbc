"""Extract the demo model's corpus from the running Python's own documentation (reproducibly).

Sources, both shipped with CPython: `pydoc_data.topics` (the language reference's help topics) and
the docstrings of the pure-Python standard library, read with `ast` (nothing is imported, so no
module's side effects run). From them come plain documents and short chat dialogues (question ->
the subject's name, then the first sentences of its text: the name gives even a tiny model something
to copy from the question, so its answer depends on what was asked). Every record goes to the train
or the held-out split by a hash of its source name, so the split does not depend on the order of
extraction.

pydoc_data and the docstrings differ between Python releases: corpus.json records the version and
the sha256 of corpus.jsonl.gz's uncompressed text. The committed corpus is what train.py reads.

    python tools/demo_model/corpus.py            # writes tools/demo_model/corpus.jsonl.gz + corpus.json
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import platform
import random
import re
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.jsonl.gz"
MANIFEST = HERE / "corpus.json"
HELDOUT_PERCENT = 5
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "ensurepip", "site-packages", "turtledemo", "tkinter",
             "distutils", "config-3.11-x86_64-linux-gnu", "__pycache__", "lib-dynload", "encodings"}
MAX_DOC_CHARS = 1200
MAX_ANSWER_CHARS = 360
GREETINGS = ("Hello", "Hi", "Hello!", "Hi there", "Hey", "Good morning", "Who are you?", "What are you?",
             "What can you do?", "Hello, who are you?")
SELF_INTRO = ("Hello! I am a small demo model in the architecture of Kimi K2, trained on the Python "
              "documentation. Ask me about Python, for example: what does the assert statement do?")
QUESTIONS = ("What is {}?", "What does {} do?", "Tell me about {}.", "Explain {}.", "What is {} for?")


def split_of(source: str) -> str:
    h = int(hashlib.sha256(source.encode()).hexdigest()[:8], 16)
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def clean(text: str) -> str:
    """Docstring / topic text -> plain prose: reST markup dropped, blank-line paragraphs kept."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)        # :func:`x` -> x
    text = text.replace("``", '"').replace("**", "").replace("*", "")
    lines = [ln.rstrip() for ln in text.splitlines()]
    out = "\n".join(ln for ln in lines if not re.fullmatch(r"[=\-~^*#]{3,}", ln.strip()))
    return re.sub(r"\n{3,}", "\n\n", out).strip()


def first_sentences(text: str, limit: int = MAX_ANSWER_CHARS) -> str:
    """The first paragraph, as one line, cut after the last full sentence within limit chars."""
    para = " ".join(text.split("\n\n", 1)[0].split())
    if len(para) <= limit:
        return para
    cut = para[:limit]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    return cut[: end + 1] if end > 40 else cut.rsplit(" ", 1)[0] + "."


def topic_records() -> list[dict]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        body = clean(topics[key])
        title, _, rest = body.partition("\n")
        title = title.strip().replace('"', "")
        rest = rest.strip()
        if not rest:
            continue
        src = f"topic:{key}"
        out.append({"source": src, "kind": "doc", "text": f"{title}\n\n{rest[: 4 * MAX_DOC_CHARS]}"})
        answer = first_sentences(rest)
        name = title[0].lower() + title[1:] if title[:4] == "The " else title
        out += [{"source": src, "kind": "chat", "user": q.format(name), "assistant": f"{title}: {answer}"}
                for q in QUESTIONS[:3]]
    return out


def _public_defs(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node.name, node
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_"):
                        yield f"{node.name}.{sub.name}", sub


def module_files(stdlib: Path):
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(p in SKIP_DIRS or p.startswith("_") for p in rel.parts[:-1]) or rel.name.startswith("_"):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts and not rel.name.startswith("_"):
            yield ".".join(parts), path


def docstring_records(stdlib: Path) -> list[dict]:
    out = []
    for module, path in module_files(stdlib):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        items = [(module, tree)] + [(f"{module}.{n}", node) for n, node in _public_defs(tree)]
        for name, node in items:
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 40:
                continue
            doc = clean(doc)
            src = f"doc:{name}"
            out.append({"source": src, "kind": "doc", "text": f"{name}\n\n{doc[:MAX_DOC_CHARS]}"})
            q = QUESTIONS[int(hashlib.sha256(name.encode()).hexdigest()[:4], 16) % 2 + 1]
            out.append({"source": src, "kind": "chat", "user": q.format(name),
                        "assistant": f"{name}: {first_sentences(doc)}"})
    return out


def greeting_records() -> list[dict]:
    return [{"source": "greeting", "kind": "chat", "user": g, "assistant": SELF_INTRO} for g in GREETINGS]


def build() -> list[dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    records = topic_records() + docstring_records(stdlib) + greeting_records()
    for r in records:
        r["split"] = "train" if r["source"] == "greeting" else split_of(r["source"])
    random.Random(0).shuffle(records)
    return records


def main() -> int:
    records = build()
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    data = text.encode("utf-8")
    with open(CORPUS, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)          # mtime 0, no name: the same text gives the same .gz bytes
    counts: dict[str, int] = {}
    for r in records:
        k = f"{r['split']}/{r['kind']}"
        counts[k] = counts.get(k, 0) + 1
    manifest = {"python": platform.python_version(), "implementation": sys.implementation.name,
                "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "records": counts,
                "heldout_percent": HELDOUT_PERCENT}
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(manifest))
    return 0


def load(path: Path = CORPUS) -> list[dict]:
    """The committed corpus (train.py and the test read it through this)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


if __name__ == "__main__":
    sys.exit(main())
