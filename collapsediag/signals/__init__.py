"""Signals: what is measured on a model, edited or not; each returns numbers or tables, never a saved run.

``evaluate`` (efficacy, paraphrase and neighborhood scores), ``fluency`` (perplexity, generation entropy),
``spectral`` (σ₁ of an edited matrix, tracked per edit), ``downstream`` and ``downstream_score`` (few-shot task
accuracy) and ``scan`` (the pre-edit risk scan of a set of records). Imports the core and ``editors`` only.
"""
