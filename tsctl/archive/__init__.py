"""The .mar model archive: manifest, streaming writer, and safe reader/extractor."""
