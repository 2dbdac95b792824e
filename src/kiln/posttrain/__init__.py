"""Post-training on the one trainer: SFT, DPO/APO, RLVR (see commands.py), chat templates, verifiable rewards."""
