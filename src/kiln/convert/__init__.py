"""Converting between kiln checkpoints and other formats (Hugging Face folders)."""
