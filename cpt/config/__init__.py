"""The recipe schema: typed configs, loading (includes, --set) and cross-field checks.

Nothing here imports torch, transformers or deepspeed, so `cpt validate` stays fast.
"""
