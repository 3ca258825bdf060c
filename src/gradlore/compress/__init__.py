"""WeLore compression (arXiv 2407.11239, "From GaLore to WeLore"): per-matrix ranks from one global threshold on
min-max-normalised singular values, factored low-rank components, perplexity evaluation and LRC-only fine-tuning.

`gradlore.compress(model, remove=...)` and `gradlore.load_compressed(dir)` come from :mod:`gradlore.compress.welore`.
"""
