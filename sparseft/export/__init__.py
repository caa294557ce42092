"""What leaves a run: merged Hugging Face directories, the compressed (bitmask) format and its remote
code, structured shrink, 2:4 conversion, adapters, the model card and the sparsity report.

Plain PyTorch and transformers, no Lightning: it reads a model that :mod:`sparseft.sparse` sparsified.
"""

from sparseft.export.compressed import load_compressed
from sparseft.export.pretrained import export_pretrained
from sparseft.export.report import build_report
from sparseft.export.semi_structured import to_semi_structured

__all__ = ["build_report", "export_pretrained", "load_compressed", "to_semi_structured"]
