#!/usr/bin/env python
"""Train the marks pretext once and cache the detector for the ``*_context_pretext`` configs.

    python tools/pretrain_context.py                         # -> datasets/generated/pretrained/
    python tools/pretrain_context.py SEED 1                  # overrides for the pretext run
    python tools/pretrain_context.py --pretext marks_colours # keys also labelled by colour

The pretext (``configs/context/pretext_marks.yaml``) is the context baseline trained to detect
every disc and key tile of ``pair``-like images by its kind and mark; its labels name neither a
colour nor which key belongs to which disc (docs/evidence.md). Like the generated data, the
result is made once: the run goes to ``<cache>.run/`` (log, ``metrics.json``, evaluation) and its
``model_final.pth`` is copied into the cache file atomically, so an interrupted run leaves no
cache behind and is started again. With a cache file there, nothing is trained.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from nl_detectron.atomic_files import atomic_write
from nl_detectron.data.context import PRETEXT_CLASSES

REPO = Path(__file__).resolve().parents[1]


def cache_of(pretext: str) -> Path:
    """Where a pretext's detector is cached (the *_context_pretext configs read ``marks``'s)."""
    return REPO / "datasets" / "generated" / "pretrained" / f"context_{pretext}.pth"


def ensure_pretrained(
    pretext: str = "marks", opts: list[str] | None = None, cache: Path | None = None
) -> Path:
    """The cached detector of ``pretext`` (configs/context/pretext_<pretext>.yaml), trained
    first if it is not there yet; ``cache`` defaults to :func:`cache_of` the pretext."""
    cache = cache_of(pretext) if cache is None else cache
    if cache.is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    run = cache.with_name(cache.stem + ".run")
    shutil.rmtree(run, ignore_errors=True)  # a run that did not finish
    command = [
        sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file",
        str(REPO / "configs" / "context" / f"pretext_{pretext}.yaml"),
        *(opts or []), "OUTPUT_DIR", str(run),
    ]  # fmt: skip
    print(
        f"Training the {pretext} pretext into {run} (about as long as one context run)", flush=True
    )
    proc = subprocess.run(command, cwd=REPO)
    final = run / "model_final.pth"
    if proc.returncode != 0 or not final.is_file():
        raise SystemExit(
            f"the pretext run failed (exit status {proc.returncode}); see {run}/log.txt"
        )
    with open(final, "rb") as source:
        atomic_write(cache, lambda f: shutil.copyfileobj(source, f))
    return cache


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretext", choices=list(PRETEXT_CLASSES), default="marks")
    parser.add_argument("--output", type=Path, help="the cache file (default: the pretext's)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pretext overrides")
    args = parser.parse_args(argv)
    print(ensure_pretrained(args.pretext, args.opts, args.output))


if __name__ == "__main__":
    main()
