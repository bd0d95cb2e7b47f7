"""One shard of a `scripts/builtin_data.py` folder: every N-th document, so the data fits a GPU call.

A device call carries at most 64 MiB (tracked tree + carried paths). Data v5's train.npz is 34.8 MB and the installed
model's safetensors 39 MB, so a continuation of the installed model cannot carry all of v5 at once; N shards can,
one per call (each continuing the previous call's model). Shard K of N holds documents K, K + N, K + 2N, ... of
train.npz (their tokens, targets, kinds and sources unchanged); the other files (tokenizer, held-out text and chat
requests, licences) are copied as they are, and summary.json gains "shard": {"index": K, "of": N, "documents",
"tokens"}. The shards of one folder partition its documents exactly (tests/test_builtin_v2.py).
`--whole SOURCE` keeps every document of that source in the shard as well (for annealing on a small package).
Usage: PYTHONPATH=. python3 scripts/data_shard.py DATA OUT --shard K --of N [--whole SOURCE[,SOURCE]]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from builtin_data import load_documents, load_sources, save_documents

COPIED = ("tokenizer.json", "heldout.py.txt", "heldout_chat.json", "licences.json")


def shard(data: Path, out: Path, index: int, of: int, whole: tuple[str, ...] = ()) -> dict:
    """Shard `index` of `of`; every document of the sources in `whole` goes into every shard (an annealing run on a
    small package, e.g. `algorithms`, then sees all of it whichever shard it carries)."""
    if of < 1 or not 0 <= index < of:
        raise ValueError(f"shard {index} of {of}: need 0 <= K < N")
    docs, kinds = load_documents(data / "train.npz")
    try:
        sources = load_sources(data / "train.npz")
    except ValueError:                                  # data before v4 records no sources: shard without them
        sources = None
    if whole and sources is None:
        raise ValueError(f"--whole {','.join(whole)}: {data / 'train.npz'} records no document sources")
    unknown = sorted(set(whole) - set(sources or ()))
    if unknown:
        raise ValueError(f"--whole: no document comes from {unknown}; the sources are {sorted(set(sources))}")
    keep = [i for i in range(len(docs)) if i % of == index or (whole and sources[i] in whole)]
    out.mkdir(parents=True, exist_ok=True)
    save_documents([docs[i] for i in keep], [int(kinds[i]) for i in keep], out / "train.npz",
                   [sources[i] for i in keep] if sources else None)
    for name in COPIED:
        if (data / name).exists():
            shutil.copy(data / name, out / name)
    summary = json.loads((data / "summary.json").read_text()) if (data / "summary.json").exists() else {}
    summary["shard"] = {"index": index, "of": of, "whole": list(whole), "documents": len(keep),
                        "tokens": int(sum(len(docs[i].ids) for i in keep))}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary["shard"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="a scripts/builtin_data.py output folder")
    ap.add_argument("out", type=Path)
    ap.add_argument("--shard", type=int, required=True, help="K: this shard's index, 0 .. N-1")
    ap.add_argument("--of", type=int, required=True, help="N: the number of shards")
    ap.add_argument("--whole", default="", metavar="SOURCE[,SOURCE]",
                    help="sources whose every document goes into this shard (e.g. algorithms)")
    args = ap.parse_args(argv)
    whole = tuple(w.strip() for w in args.whole.split(",") if w.strip())
    try:
        info = shard(args.data, args.out, args.shard, args.of, whole)
    except ValueError as e:
        ap.error(str(e))
    size = (args.out / "train.npz").stat().st_size
    print(f"{args.out}: shard {info['index']} of {info['of']}, {info['documents']} documents, {info['tokens']:,} "
          f"tokens, train.npz {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
