"""Direct preference optimisation (DPO) and its loss variants."""
