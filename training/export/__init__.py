"""Model export: seekflow release checkpoints ↔ Hugging Face DeepseekV3 directories (`python -m training.export`)."""
from training.export.convert import ExportError
from training.export.hf import export_hf, import_hf

__all__ = ["ExportError", "export_hf", "import_hf"]
