"""Where artifacts live: the artifact store (local and shared), fingerprints, .npy files."""
