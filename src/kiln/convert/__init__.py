"""Conversions between kiln checkpoints and other formats (GGUF for llama.cpp, Hugging Face imports)."""
