"""Export for inference engines: GGUF files that llama.cpp (and ollama, LM Studio) load and run exactly."""

from .gguf import DTYPES, GGUFExport, export_gguf, normalize_dtype
from .plan import GGUFExportError, GGUFPlan, LayerPlan, plan_export
from .quantize import LlamaCppCrashError

__all__ = ["DTYPES", "GGUFExport", "GGUFExportError", "GGUFPlan", "LayerPlan", "LlamaCppCrashError",
           "export_gguf", "normalize_dtype", "plan_export"]
