"""Cross-tokenizer distillation: serve one teacher cache to students with any tokenizer (see `pipeline`)."""
