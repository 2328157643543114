"""Generation stages. Each reads plain inputs, writes JSONL records in its own directory and
returns a manifest dict (counts, drops, model, seeds, sampling settings)."""
