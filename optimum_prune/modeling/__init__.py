"""Portable model code: PruningConfig, architecture adapters, surgery and the Pruned* classes.

Everything in this sub-package imports only torch and transformers, because it is copied beside
pruned weights so that ``trust_remote_code=True`` loads them where optimum-prune is not installed.
"""
