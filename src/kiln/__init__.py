"""kiln: pretrain, post-train and serve small and mid-size language models from scratch."""

__version__ = "0.1.0"
