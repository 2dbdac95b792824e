"""Conversions between kiln checkpoints and other formats: Hugging Face folders (import; export in
kiln.export) and GGUF files for llama.cpp."""
