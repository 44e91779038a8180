"""Student-side data: cache datasets, collator, target builders (direct and cross-tokenizer)."""
