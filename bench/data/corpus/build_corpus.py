"""Rebuild this corpus from the files it was cut from (Debian 12 + Python 3.11 + Perl 5.36 here).

Run from the repository root: ``python bench/data/corpus/build_corpus.py``. Each document is the
start of one source file (at most ``MAX_CHARS`` characters, cut at a line end), in one of four
kinds; ``manifest.json`` lists each with its source, licence and split. Licences are in
``LICENSES.md``. The split is by document, fixed here, never by window: a document is wholly in
the tuning part or wholly in the report part. The prose that every earlier lever was tuned on
(Gardiner) is all in the tuning part.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_CHARS = 9000
PERL = "/usr/share/perl/5.36.0"
VIM = "/usr/share/vim/vim90/doc"
PY = "/usr/lib/python3.11"
CMAKE = "/usr/share/cmake-3.25/Help/manual"
GARDINER = HERE.parent / "gardiner_french_revolution.txt"

# (kind, name, source, licence, split)
SOURCES = [
    ("prose", "gardiner-1", f"{GARDINER}#0", "public-domain", "tune"),
    ("prose", "gardiner-2", f"{GARDINER}#1", "public-domain", "tune"),
    ("prose", "gardiner-3", f"{GARDINER}#2", "public-domain", "tune"),
    ("prose", "gardiner-4", f"{GARDINER}#3", "public-domain", "tune"),
    ("prose", "tpj13-1", f"{PERL}/Locale/Maketext/TPJ13.pod#0", "perl", "report"),
    ("prose", "tpj13-2", f"{PERL}/Locale/Maketext/TPJ13.pod#1", "perl", "report"),
    ("prose", "tpj13-3", f"{PERL}/Locale/Maketext/TPJ13.pod#2", "perl", "report"),
    ("prose", "test-tutorial", f"{PERL}/Test/Tutorial.pod#0", "perl", "report"),
    ("docs", "vim-usr_03", f"{VIM}/usr_03.txt#0", "vim", "tune"),
    ("docs", "vim-usr_10", f"{VIM}/usr_10.txt#0", "vim", "tune"),
    ("docs", "cmake-buildsystem", f"{CMAKE}/cmake-buildsystem.7.rst#0", "bsd-3-cmake", "tune"),
    ("docs", "vim-usr_04", f"{VIM}/usr_04.txt#0", "vim", "report"),
    ("docs", "vim-usr_05", f"{VIM}/usr_05.txt#0", "vim", "report"),
    ("docs", "vim-usr_20", f"{VIM}/usr_20.txt#0", "vim", "report"),
    ("docs", "vim-usr_41", f"{VIM}/usr_41.txt#0", "vim", "report"),
    ("docs", "cmake-presets", f"{CMAKE}/cmake-presets.7.rst#0", "bsd-3-cmake", "report"),
    ("code", "py-textwrap", f"{PY}/textwrap.py#0", "psf-2.0", "tune"),
    ("code", "py-heapq", f"{PY}/heapq.py#0", "psf-2.0", "tune"),
    ("code", "py-shlex", f"{PY}/shlex.py#0", "psf-2.0", "tune"),
    ("code", "py-fractions", f"{PY}/fractions.py#0", "psf-2.0", "report"),
    ("code", "py-difflib", f"{PY}/difflib.py#0", "psf-2.0", "report"),
    ("code", "py-calendar", f"{PY}/calendar.py#0", "psf-2.0", "report"),
    ("code", "py-statistics", f"{PY}/statistics.py#0", "psf-2.0", "report"),
    ("code", "py-argparse", f"{PY}/argparse.py#0", "psf-2.0", "report"),
    ("chat", "libnet-faq", f"{PERL}/Net/libnetFAQ.pod#chat", "perl", "tune"),
    ("chat", "makemaker-faq-1", f"{PERL}/ExtUtils/MakeMaker/FAQ.pod#chat0", "perl", "report"),
    ("chat", "makemaker-faq-2", f"{PERL}/ExtUtils/MakeMaker/FAQ.pod#chat1", "perl", "report"),
]


def _cut(text: str, part: int) -> str:
    """The ``part``-th piece of at most MAX_CHARS characters, cut at line ends."""
    out, pieces, cur = [], [], 0
    for line in text.splitlines(keepends=True):
        if cur + len(line) > MAX_CHARS and out:
            pieces.append("".join(out))
            out, cur = [], 0
        out.append(line)
        cur += len(line)
    pieces.append("".join(out))
    return pieces[part]


def _chat(pod: str) -> list[str]:
    """A POD FAQ as a ChatML conversation (SmolLM2-Instruct's template): each question (a
    ``=head2``/``=item`` heading) is a user turn, the text under it the assistant's answer."""
    turns, question, answer = [], None, []
    for line in pod.splitlines():
        m = re.match(r"^=(?:head2|item)\s+(.*)", line)
        if m:
            if question and "".join(answer).strip():
                turns.append((question, "\n".join(answer).strip()))
            question, answer = m.group(1).strip(), []
        elif line.startswith("="):
            continue
        elif question is not None:
            answer.append(line)
    if question and "".join(answer).strip():
        turns.append((question, "\n".join(answer).strip()))
    convs, cur = [], ""
    for q, a in turns:
        turn = f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
        if len(cur) + len(turn) > MAX_CHARS and cur:
            convs.append(cur)
            cur = ""
        cur += turn
    convs.append(cur)
    system = "<|im_start|>system\nYou are a helpful assistant who answers questions about Perl modules.<|im_end|>\n"
    return [system + c for c in convs]


def main() -> None:
    docs = []
    for kind, name, source, licence, split in SOURCES:
        path, _, part = source.partition("#")
        text = Path(path).read_text("utf-8")
        body = _chat(text)[int(part[4:] or 0)] if part.startswith("chat") else _cut(text, int(part))
        out = HERE / kind / f"{name}.txt"
        out.parent.mkdir(exist_ok=True)
        out.write_text(body, "utf-8")
        rel = path.replace(str(HERE.parent) + "/", "bench/data/")
        docs.append(
            {
                "kind": kind,
                "name": name,
                "file": f"{kind}/{name}.txt",
                "source": f"{rel}#{part}",
                "licence": licence,
                "split": split,
                "chars": len(body),
            }
        )
    (HERE / "manifest.json").write_text(json.dumps({"documents": docs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
