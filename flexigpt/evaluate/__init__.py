"""Evaluation: perplexity under labelled protocols, lm-eval zero-shot tasks, cost accounting.

Never imports :mod:`flexigpt.compress` (checked by ../shared/tools/import_graph.py --all)."""
