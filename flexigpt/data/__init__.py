"""Data: text sources (local files or a hub snapshot) and their packing into the token splits."""
