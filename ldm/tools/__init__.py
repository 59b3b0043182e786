"""What only scripts use: the encoder comparison, the resumable pipeline runner, benchmarking helpers.

Nothing in the library (``ldm`` outside this package, ``autoencoder``) imports from here."""
