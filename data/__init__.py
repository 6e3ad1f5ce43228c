"""Data for Parameter Golf: the official shard format, tokenizer + shard builder, the official
downloader and the offline embedded corpus (built from the docs inside the user's own Python)."""
