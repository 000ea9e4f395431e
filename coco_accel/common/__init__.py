"""What every stage uses and that imports nothing of the package: files and paths, processes and
collectives, keyed randomness, tokenizer folders."""
