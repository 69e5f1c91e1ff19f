"""Loading diffusion models: model families, the loader, the embedded miniature model, offline tokenizers."""
