"""Build (or reuse) the model zoo: ``build_zoo(root)`` trains what is missing."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .training import read_json, set_threads, write_json

FAMILIES = ("vision", "language")
SIZES = ("quick", "full", "tiny")
BUILDING = ".mixcli-zoo"  # written first into a family folder being built: a partial build is ours to redo


def check_replaceable(root: Path, families) -> None:
    """Refuse, before anything is built, a family folder under ``root`` that the zoo build did
    not make (no manifest, no mark of a partial build): it is the user's, never removed."""
    from mixcli.errors import MixcliError

    for family in families:
        out = Path(root) / family
        if not out.exists() or (out / "manifest.json").is_file() or (out / BUILDING).is_file():
            continue
        if out.is_dir() and not any(out.iterdir()):
            continue
        raise MixcliError(f"{out} exists and was not built by mixcli (no manifest.json); mixcli never "
                          "removes it: choose another --root or move it away")


def _version(family: str) -> str:
    if family == "vision":
        from .vision import VERSION
    else:
        from .language import VERSION
    return VERSION


def build_zoo(root: Path, size: str = "full", seed: int = 0, families=FAMILIES, log=print,
              threads: int | None = None) -> dict:
    """Build the zoo under ``root`` and return ``{family: manifest}``.

    A family is rebuilt only when ``root/<family>/manifest.json`` is missing or records a
    different size, seed or code version; otherwise its manifest is returned as is. All
    paths in manifests are relative to ``root``.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")
    root = Path(root)
    # full: 2 threads (the target machine's cores). quick and tiny: 1 thread, since their
    # 64- and 32-wide matrices gain little from intra-op threads and oversubscribed cores
    # (other work running) make spinning OpenMP threads 5-20x slower. ``threads`` (the demo's
    # --threads) or MIXCLI_ZOO_THREADS overrides; a different thread count may change the
    # low-order bits of the trained weights.
    set_threads(threads or int(os.environ.get("MIXCLI_ZOO_THREADS", 2 if size == "full" else 1)))
    from mixcli.progress import quiet_libraries

    quiet_libraries()  # our bars show the training; transformers' "Writing model shards" would not
    result = {}
    check_replaceable(root, families)
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}")
        out = root / family
        key = {"size": size, "seed": seed, "version": _version(family)}
        mpath = out / "manifest.json"
        if mpath.exists():
            manifest = read_json(mpath)
            if all(manifest.get(k) == v for k, v in key.items()):
                log(f"{family}: cached ({size}, seed {seed})")
                result[family] = manifest
                continue
        if out.exists():
            shutil.rmtree(out)  # stale or partial (check_replaceable: ours): start clean so no old file survives
        out.mkdir(parents=True)
        (out / BUILDING).write_text("a mixcli model zoo family, being built\n")
        log(f"{family}: building ({size}, seed {seed})")
        t0 = time.time()
        if family == "vision":
            from .vision import build_vision as build
        else:
            from .language import build_language as build
        manifest = build(out, size, seed, log=log)
        manifest = _relative_to_root(manifest, family)
        manifest.update(key)
        manifest["build_seconds"] = round(time.time() - t0, 1)
        write_json(mpath, manifest)  # written last: its presence marks a complete build
        log(f"{family}: done in {time.time() - t0:.0f}s")
        result[family] = manifest
    return result


def _relative_to_root(obj, family: str):
    """Prefix the family folder to every path the family builder returned."""
    if isinstance(obj, dict):
        return {k: (f"{family}/{v}" if k in ("path", "base", "train", "validation", "test", "corpus") and isinstance(v, str)
                    else _relative_to_root(v, family)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative_to_root(v, family) for v in obj]
    return obj


def main(argv=None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description="Build the mixcli model zoo.")
    p.add_argument("root", type=Path)
    p.add_argument("--size", default="full", choices=SIZES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", default=",".join(FAMILIES))
    a = p.parse_args(argv)
    from mixcli.errors import MixcliError

    try:
        m = build_zoo(a.root, a.size, a.seed, tuple(f for f in a.families.split(",") if f))
    except MixcliError as error:
        raise SystemExit(f"Error: {error}") from None
    print(json.dumps({f: m[f].get("build_seconds") for f in m}))


if __name__ == "__main__":
    main()
