"""The OFA selector: the frozen image-text space, k-means, the selector MLP."""
