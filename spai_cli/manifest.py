"""`spai manifest`: its flags, and the call into the library."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "manifest",
        help="build a Parquet manifest from GenImage folders, SPAI CSVs or real/fake folders",
        description="Build one Parquet manifest (uri, label, split, generator, source, group) from a dataset "
        "layout on disk or under an s3:// prefix, and write a JSON sidecar with counts. "
        "Run `spai validate` on it next to find corrupt or duplicated images.",
    )
    kinds = p.add_subparsers(dest="layout", required=True, metavar="LAYOUT")
    gen = kinds.add_parser("genimage", help="<root>/<generator>/{train,val}/{ai,nature} (all 8 generators)")
    gen.add_argument("root", help="GenImage root directory or s3:// prefix")
    gen.add_argument("--generators", nargs="*", default=None,
                     help="generator folders to include, by folder or short name (sdv5, glide...; default: all)")
    gen.add_argument("--val-fraction", type=float, default=0.0,
                     help="move this fraction of each generator's train groups to val (GenImage's val is used as test)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction split")
    csv = kinds.add_parser("csv", help="official SPAI CSV (image,class,split; extra columns kept)")
    csv.add_argument("csv", help="CSV file (local or s3://)")
    csv.add_argument("--root", default=None, help="root dir for relative image paths (default: the CSV's folder)")
    csv.add_argument("--generator", default=None, help="generator name for all rows (default: a `generator` column "
                     "if present, else 'real' for class 0 and 'unknown' for class 1)")
    fold = kinds.add_parser("folders", help="real and fake folders, searched recursively")
    fold.add_argument("--real", nargs="+", required=True, help="folder(s) or s3:// prefixes of real images")
    fold.add_argument("--fake", nargs="+", required=True,
                      help="folder(s) of generated images; NAME=PATH names the generator (default: folder name), "
                      "and folders given one name are one generator")
    fold.add_argument("--balance", action="store_true", help="subsample reals to the number of fakes")
    fold.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions, split by group (seeded)")
    fold.add_argument("--seed", type=int, default=0, help="seed of the split (and of --balance)")
    fold.add_argument("--group-by", choices=["stem", "folder"], default="stem",
                      help="what never straddles splits: the file stem minus generator tags (beach_sdxl.png -> beach), "
                      "or the parent folder")
    for k in (gen, csv, fold):
        k.add_argument("--output", "-o", required=True, help="manifest path (directory) or s3:// URI")
        k.add_argument("--source", default=None, help="dataset name for the `source` column")
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.data.manifest import main

    return int(main(args) or 0)
