"""The model: the architecture seam (arch), FlexiGPT blocks (flexi), the compact checkpoint format,
the importer, and the forward helpers every phase shares (forward)."""
